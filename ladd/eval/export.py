"""`ladd export RUN --out DIR`: a diffusers ZImagePipeline folder with the student in the teacher's place.

    ladd export runs/toy --out runs/toy-4step            # latest checkpoint, raw student weights
    ladd export runs/toy --out runs/toy-4step --ema      # the EMA weights
    ladd export runs/toy/checkpoints/step-00000300 --out runs/toy-300

The folder is the teacher's pipeline (same text encoder, tokenizer, VAE) with the student's
transformer and `student_scheduler(timesteps)` — FlowMatchEulerDiscreteScheduler with the shift that
takes ZImagePipeline's default N-step sigmas, linspace(1, 1/N, N), onto the training timesteps: shift 1
for 1, .75, .5, .25, shift 3 for 1, .9, .75, .5 (timesteps no shift reaches need `sigmas=`). Use it as

    pipe = ZImagePipeline.from_pretrained("runs/toy-4step")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=0.0).images[0]

guidance_scale=0.0 must be passed: ZImagePipeline's default is 5.0 (CFG, twice the compute, and not
what the student was trained for). Its images equal `ladd generate`'s for the same prompts and seeds
(`generator=torch.Generator("cpu").manual_seed(seed)`); a test pins it. Weights are written as
safetensors only; `ladd_export.json` records the source checkpoint, EMA or raw, and the timesteps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ladd.data.shards import teacher_fingerprint
from ladd.eval.samplers import (
    EXPORT_INFO,
    find_checkpoint,
    run_teacher_dir,
    student_transformer,
    student_weights,
)
from ladd.flow import default_call_shift, student_scheduler
from ladd.models.loading import load_pipeline

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_student(run_or_checkpoint: str | Path, out: str | Path, *, ema: bool = False, dtype: str = "fp32",
                   lora: bool = False, overwrite: bool = False) -> Path:
    """Write the student of a run (latest checkpoint) or a checkpoint as a ZImagePipeline folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    ckpt = find_checkpoint(run_or_checkpoint)
    weights, config = student_weights(ckpt, ema)
    if lora and config["model"].get("student") != "lora":
        raise ValueError(f"{ckpt} is a full student: export it as a pipeline folder (drop --lora)")
    teacher_dir = run_teacher_dir(ckpt)
    pipe = load_pipeline(teacher_dir, "cpu", torch.float32)
    timesteps = [float(t) for t in config["method"]["student_timesteps"]]
    n = len(timesteps)
    by_default = default_call_shift(timesteps) is not None  # the default N-step call visits them

    from diffusers import ZImagePipeline

    if lora:
        return export_lora(ckpt, weights, config, out, pipe)
    student = student_transformer(pipe.transformer, weights, partial=ema, config=config).to(DTYPES[dtype])
    exported = ZImagePipeline(scheduler=student_scheduler(timesteps), vae=pipe.vae, text_encoder=pipe.text_encoder,
                              tokenizer=pipe.tokenizer, transformer=student)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    exported.save_pretrained(tmp, safe_serialization=True)
    step = json.loads((ckpt / "meta.json").read_text())["step"]
    info = {
        "source_checkpoint": str(ckpt), "step": step, "weights": "ema" if ema else "raw", "dtype": dtype,
        "teacher": str(teacher_dir), "teacher_fingerprint": teacher_fingerprint(teacher_dir),
        "timesteps": timesteps, "num_inference_steps": n, "guidance_scale": 0.0,
        "call": (f"pipe(prompt, num_inference_steps={n}, guidance_scale=0.0)" if by_default else
                 f"pipe(prompt, sigmas={timesteps}, guidance_scale=0.0)"),
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    if not by_default:
        print(f"note: no scheduler shift takes linspace(1, 1/{n}, {n}) to the student's timesteps {timesteps}; "
              f"the default call does not visit them — call {info['call']}")
    print(f"exported {ckpt} ({info['weights']} weights, step {step}) to {out}; use "
          f"ZImagePipeline.from_pretrained({str(out)!r}) then {info['call']}")
    return out


def export_lora(ckpt: Path, weights: dict, config: dict, out: Path, pipe) -> Path:
    """A LoRA student's adapters as `pytorch_lora_weights.safetensors`, which
    `ZImagePipeline.load_lora_weights(out)` applies to the teacher pipeline."""
    from diffusers import ZImagePipeline

    from ladd.models.lora import add_lora, lora_state_dict

    add_lora(pipe.transformer, config["model"]["lora_rank"], config["model"]["lora_alpha"])
    pipe.transformer.load_state_dict(weights, strict=False)
    out.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(out, transformer_lora_layers=lora_state_dict(pipe.transformer),
                                     safe_serialization=True)
    print(f"exported the LoRA adapters of {ckpt} to {out}; use pipe.load_lora_weights({str(out)!r}) on the "
          f"teacher pipeline, with {_lora_call(config)}")
    return out


def _lora_call(config: dict) -> str:
    """How to call the teacher pipeline with the adapters loaded, in words."""
    timesteps = [float(t) for t in config["method"]["student_timesteps"]]
    shift = default_call_shift(timesteps)
    if shift is None:
        return f"scheduler shift 1, sigmas={timesteps} and guidance_scale=0.0"
    return (f"FlowMatchEulerDiscreteScheduler(shift={shift:g}), num_inference_steps={len(timesteps)} and "
            f"guidance_scale=0.0")
