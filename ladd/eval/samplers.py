"""What gets evaluated: a few-step sampler for a student, the untrained baseline, or the teacher.

    pipe = load_pipeline(teacher_dir)                          # text encoder + VAE (+ teacher weights)
    s = run_sampler(pipe, "runs/toy", ema=True)                # the run's latest checkpoint, EMA weights
    s = untrained_sampler(pipe)                                # teacher weights, the student's 4 steps
    s = teacher_sampler(pipe, steps=50, guidance=5.0)          # the teacher at its own steps, with CFG
    s = exported_sampler("runs/toy-export")                    # a `ladd export` folder
    latents = s.latents(prompts, seeds, (80, 48))              # == ZImagePipeline(..., width=80, height=48,
                                                               #    output_type="latent")
    images = s.images(latents)                                 # (N, H, W, 3) uint8

Few-step sampling is `initial_noise` (the pipeline's own per-seed noise) + `euler_sample` through the
adapter at `student_sigmas` (1, .75, .5, .25, then 0 for 4 steps) with guidance 0 — exactly what the
student was trained for and what an exported pipeline's default 4-step call does.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ladd.images import to_uint8
from ladd.flow import image_seq_len, student_sigmas, teacher_sigmas
from ladd.models.loading import load_pipeline, resolve_pipeline
from ladd.models.text import encode_prompts
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import decode, euler_sample, initial_noise
from ladd.train.checkpoint import Checkpointer, load_weights, read_config

EXPORT_INFO = "ladd_export.json"  # written by `ladd export` beside model_index.json


def dtype_for(name: str, device: torch.device) -> torch.dtype:
    """'auto' = bf16 on GPU (the 6B model), fp32 on CPU (where tests pin exactness)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def few_step_timesteps(steps: int, trained: list[float] | tuple[float, ...] | None = None) -> list[float]:
    """The student's training timesteps when their count is `steps`; else linspace(1, 1/N, N) — the
    sigmas ZImagePipeline's default N-step call visits with a shift-1 scheduler."""
    if trained is not None and len(trained) == steps:
        return [float(t) for t in trained]
    return torch.linspace(1.0, 1.0 / steps, steps).tolist()


@dataclass
class Sampler:
    label: str
    kind: str  # "student" | "exported" | "untrained" | "teacher"
    pipe: object  # the ZImagePipeline whose text encoder and VAE are used
    adapter: ZImageAdapter
    sigmas: Tensor
    guidance: float = 0.0
    negative_prompt: str = ""
    info: dict = field(default_factory=dict)
    shifted: bool = False  # the teacher's schedule: the pipeline's sigmas for each size's token count

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def sigmas_at(self, latent_hw: tuple[int, int]) -> Tensor:
        if not self.shifted:
            return self.sigmas
        return teacher_sigmas(self.pipe.scheduler, self.steps, image_seq_len(*latent_hw))

    @torch.no_grad()
    def latents(self, prompts: list[str], seeds: list[int], size: int | tuple[int, int],
                batch_size: int = 8) -> Tensor:
        """Float32 latents (N, C, h, w) on the CPU at `size` = (width, height) pixels (an int: a square);
        prompt i starts from the pipeline's noise for seeds[i]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        device, dtype = self.pipe.transformer.device, self.adapter.dtype
        neg = None
        if self.guidance > 0:
            neg = encode_prompts(self.pipe, [self.negative_prompt], device=device)[0].to(dtype)
        out = []
        with tqdm(total=len(prompts), desc=f"sample {self.label}", unit="img", leave=False) as bar:
            for i in range(0, len(prompts), batch_size):
                caps = [c.to(dtype) for c in encode_prompts(self.pipe, prompts[i : i + batch_size], device=device)]
                noise = initial_noise(self.pipe, seeds[i : i + batch_size], size).to(device)
                negs = None if neg is None else [neg] * len(caps)
                sigmas = self.sigmas_at(tuple(noise.shape[-2:])).to(device)
                out.append(euler_sample(self.adapter, noise, sigmas, caps, negs, self.guidance).cpu())
                bar.update(len(caps))
        return torch.cat(out)

    @torch.no_grad()
    def images(self, latents: Tensor, batch_size: int = 8) -> np.ndarray:
        device = self.pipe.vae.device
        return np.concatenate([to_uint8(decode(self.pipe, latents[i : i + batch_size].to(device)))
                               for i in range(0, len(latents), batch_size)])


# --------------------------------------------------------------------------------------------------
# the teacher's own weights: the untrained baseline and the teacher at its steps


def untrained_sampler(pipe, steps: int = 4, timesteps: list[float] | None = None, compile: bool = False) -> Sampler:
    """The teacher's weights sampled like the student (its N steps, guidance 0): the step-0 student.
    `compile`: compiled transformer blocks (ladd/models/compile.py), here and in every sampler below."""
    ts = few_step_timesteps(steps, timesteps)
    return Sampler(f"untrained ({steps} steps)", "untrained", pipe, ZImageAdapter(pipe.transformer, compile=compile),
                   student_sigmas(ts), info={"timesteps": ts})


def teacher_sampler(pipe, steps: int, guidance: float, negative_prompt: str = "", compile: bool = False) -> Sampler:
    """The teacher at its own steps with CFG, on the pipeline's own schedule (shifted for each size as
    the pipeline does when its scheduler shifts dynamically)."""
    side = 2 * (pipe.vae.config.sample_size // (pipe.vae_scale_factor * 2))
    sigmas = teacher_sigmas(pipe.scheduler, steps, image_seq_len(side, side))
    return Sampler(f"teacher ({steps} steps, cfg {guidance:g})", "teacher", pipe,
                   ZImageAdapter(pipe.transformer, compile=compile), sigmas, guidance, negative_prompt, shifted=True)


# --------------------------------------------------------------------------------------------------
# students: from a training run or checkpoint, or an exported folder


def find_checkpoint(path: str | Path) -> Path:
    """A finished checkpoint folder, or a run folder's latest one."""
    path = Path(path)
    if (path / "COMPLETE").is_file():
        return path
    latest = Checkpointer(path / "checkpoints", None).latest()
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a finished checkpoint nor a run folder with one "
                                "(checkpoints/step-*/COMPLETE)")
    return latest


def student_weights(checkpoint: Path, ema: bool = False) -> tuple[dict[str, Tensor], dict]:
    """(transformer state dict, resolved config) of a checkpoint; `ema` picks the EMA weights.
    For a LoRA student the dict holds only the adapter weights."""
    config = read_config(checkpoint)
    if ema and not config["train"].get("ema_decay", 0) > 0:
        raise ValueError(f"{checkpoint} was trained without EMA (train.ema_decay = 0): drop --ema")
    return load_weights(checkpoint, "ema" if ema else "student"), config


def student_transformer(teacher_transformer, weights: dict[str, Tensor], partial: bool = False,
                        config: dict | None = None):
    """A copy of the teacher's transformer carrying the student's weights (EMA dicts may be partial:
    only trained parameters are averaged, the frozen rest is the teacher's). A LoRA student's adapters
    are attached and merged into the copy's weights, so it runs at the teacher's speed."""
    model = copy.deepcopy(teacher_transformer)
    lora = (config or {}).get("model", {}).get("student") == "lora"
    if lora:
        from ladd.models.lora import add_lora

        add_lora(model, config["model"]["lora_rank"], config["model"]["lora_alpha"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (missing and not (partial or lora)):
        raise ValueError(f"checkpoint weights do not fit the teacher's transformer: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]})")
    if lora:
        model.fuse_lora()
        model.unload_lora()
    return model.requires_grad_(False).eval()


def run_sampler(pipe, run_or_checkpoint: str | Path, ema: bool = False, steps: int = 4,
                compile: bool = False) -> Sampler:
    """The student of a run (latest checkpoint) or of one checkpoint, on the teacher pipeline `pipe`."""
    ckpt = find_checkpoint(run_or_checkpoint)
    weights, config = student_weights(ckpt, ema)
    ts = few_step_timesteps(steps, config["method"]["student_timesteps"])
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    transformer = student_transformer(pipe.transformer, weights, partial=ema, config=config)
    label = f"{Path(run_or_checkpoint).name} step {step}{' ema' if ema else ''} ({steps} steps)"
    return Sampler(label, "student", pipe, ZImageAdapter(transformer, compile=compile), student_sigmas(ts),
                   info={"checkpoint": str(ckpt), "step": step, "ema": ema, "timesteps": ts})


def run_teacher_dir(run_or_checkpoint: str | Path) -> Path:
    """The teacher pipeline folder a run was trained from (its resolved config's model.pipeline)."""
    return resolve_pipeline(read_config(find_checkpoint(run_or_checkpoint))["model"]["pipeline"])


def exported_sampler(folder: str | Path, steps: int = 4, device=None, dtype: str = "auto",
                     compile: bool = False) -> Sampler:
    """A `ladd export` folder (any ZImagePipeline folder works; its own scheduler is not used)."""
    device = torch.device(device) if device else default_device()
    pipe = load_pipeline(folder, device, dtype_for(dtype, device))
    info_file = Path(folder) / EXPORT_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    ts = few_step_timesteps(steps, info.get("timesteps"))
    return Sampler(f"{Path(folder).name} (exported, {steps} steps)", "exported", pipe,
                   ZImageAdapter(pipe.transformer, compile=compile), student_sigmas(ts),
                   info={**info, "timesteps": ts})


def load_sampler(source: str, path: str | Path | None, *, ema: bool = False, steps: int = 4, device=None,
                 dtype: str = "auto", pipe=None, compile: bool = False) -> Sampler:
    """source: "run" / "checkpoint" (path = run or checkpoint folder), "exported" (path = folder),
    "untrained" (path = teacher pipeline; or `pipe`). The teacher pipeline is loaded unless given."""
    device = torch.device(device) if device else default_device()
    if source == "exported":
        return exported_sampler(path, steps, device, dtype, compile)
    if source in ("run", "checkpoint"):
        pipe = pipe or load_pipeline(run_teacher_dir(path), device, dtype_for(dtype, device))
        return run_sampler(pipe, path, ema, steps, compile)
    if source == "untrained":
        pipe = pipe or load_pipeline(path, device, dtype_for(dtype, device))
        return untrained_sampler(pipe, steps, compile=compile)
    raise ValueError(f"unknown model source {source!r}: run, checkpoint, exported or untrained")
