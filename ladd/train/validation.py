"""Validation from step 0: fixed prompts and seeds, the student's few-step images beside the teacher's.

The prompts are the data's first samples, so the teacher's reference is the precomputed latent itself
(50 steps, CFG) — decoded once. Work is split over ranks (every rank runs the same number of
forwards, as FSDP requires) and gathered as latents; no weights are ever gathered. Validation has its
own random streams, so it never changes what training draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ladd import distributed
from ladd.config import Config
from ladd.distributed import Dist, print0
from ladd.flow import image_seq_len, interpolate, latent_mse, student_sigmas, teacher_sigmas
from ladd.images import tile, to_uint8, write_png
from ladd.sampling import decode, euler_sample
from ladd.train.health import diversity_ratio, drift_ratio


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    """(N, 3, H, W) images in [0, 1] -> one PNG, row-major."""
    write_png(tile(to_uint8(images), cols), path)


class Validator:
    """The validation set (the data's first `num_prompts` samples) and how to score a student on it.

    Holds what it needs, nothing more: the pipeline (VAE decodes, scheduler), the data, the validation
    and method configs, the rank layout, the run's validation folder and whether autocast is on.
    """

    def __init__(self, pipe, data, cfg: Config, dist: Dist, out_dir: Path, bf16: bool, log_schedule: bool = True):
        self.pipe, self.dist, self.bf16 = pipe, dist, bf16
        self.student_timesteps = cfg.method.student_timesteps
        self.dir = out_dir / "validation"
        n = min(cfg.validation.num_prompts, len(data))
        samples = [data[i] for i in range(n)]
        self.n = n
        self.mse_untrained: float | None = None
        self.caps = [s["cap_feats"].to(dist.device) for s in samples]
        self.teacher_latents = torch.stack([s["latents"] for s in samples]).to(dist.device)
        shape = self.teacher_latents.shape[1:]
        self.noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(cfg.validation.seed + i)) for i in range(n)
        ]).to(dist.device)
        self.sigmas = student_sigmas(cfg.method.student_timesteps, device=dist.device)
        per_rank = math.ceil(n / dist.world_size)
        self.mine = [(dist.rank + k * dist.world_size) % n for k in range(per_rank)]  # equal work on every rank
        if dist.is_main:
            save_grid(decode(pipe, self.teacher_latents), self.dir / "teacher.png")
            if log_schedule:
                self.log_schedule()

    def log_schedule(self) -> None:
        """Once at start: the sigma schedules and x_t at each curriculum timestep (blog: log inputs)."""
        lat = self.teacher_latents
        full = teacher_sigmas(self.pipe.scheduler, 50, image_seq_len(*lat.shape[-2:]))
        print0(f"teacher 50-step sigmas: {full[0]:.3f} -> {full[-2]:.4f} -> {full[-1]:.1f}; "
               f"student sigmas: {[round(s, 3) for s in self.sigmas.tolist()]}")
        ts = torch.tensor(self.student_timesteps, device=lat.device)
        x0 = lat[:1].expand(len(ts), -1, -1, -1)
        x_t = interpolate(x0, self.noise[:1].expand_as(x0), ts)
        save_grid(decode(self.pipe, x_t), self.dir / "x_t_at_curriculum_timesteps.png", cols=len(ts))

    @torch.no_grad()
    def sample(self, adapter) -> torch.Tensor:
        """The validation prompts' 4-step latents from `adapter`, split over ranks (all ranks call it)."""
        idx = self.mine
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            mine = euler_sample(adapter, self.noise[idx], self.sigmas, [self.caps[i] for i in idx])
        gathered = distributed.gather_tensor(mine.float().contiguous())
        # Undo the round-robin split: rank r's k-th sample is prompt (r + k·world) mod n.
        world, per_rank = self.dist.world_size, len(idx)
        order = [(r + k * world) % self.n for r in range(world) for k in range(per_rank)]
        latents = torch.empty_like(self.teacher_latents)
        for j, i in enumerate(order):
            latents[i] = gathered[j]
        return latents

    @torch.no_grad()
    def run(self, step: int, student, teacher) -> dict:
        """Validation metrics of `student` at `step` (every rank calls it and gets the same numbers):
        latent MSE to the teacher's references, its ratio to the untrained student's (`teacher` at the
        student's steps), and the spread of different prompts' outputs relative to the teacher's."""
        if self.mse_untrained is None:  # the untrained student = the teacher's weights (also after a resume)
            self.mse_untrained = latent_mse(self.sample(teacher), self.teacher_latents)
        latents = self.sample(student)
        mse = latent_mse(latents, self.teacher_latents)
        metrics = {"val_latent_mse": mse, "val_drift": drift_ratio(mse, self.mse_untrained)}
        if self.n >= 2:
            metrics["val_diversity_ratio"] = diversity_ratio(latents, self.teacher_latents)
        if self.dist.is_main:
            save_grid(decode(self.pipe, latents), self.dir / f"step-{step:08d}.png")
        return metrics
