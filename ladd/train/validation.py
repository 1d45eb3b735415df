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
from ladd.distributed import print0
from ladd.eval.kid import latent_mse
from ladd.flow import interpolate, student_sigmas, teacher_sigmas, image_seq_len
from ladd.images import tile, to_uint8, write_png
from ladd.sampling import decode, euler_sample


def save_grid(images: torch.Tensor, path: Path, cols: int = 8) -> None:
    """(N, 3, H, W) images in [0, 1] -> one PNG, row-major."""
    write_png(tile(to_uint8(images), cols), path)


class Validator:
    def __init__(self, trainer, log_schedule: bool = True):
        self.t = trainer
        cfg, d = trainer.cfg, trainer.dist
        self.dir = trainer.out / "validation"
        n = min(cfg.validation.num_prompts, len(trainer.data))
        samples = [trainer.data[i] for i in range(n)]
        self.n = n
        self.mse_untrained: float | None = None
        self.caps = [s["cap_feats"].to(d.device) for s in samples]
        self.teacher_latents = torch.stack([s["latents"] for s in samples]).to(d.device)
        shape = self.teacher_latents.shape[1:]
        self.noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(cfg.validation.seed + i)) for i in range(n)
        ]).to(d.device)
        self.sigmas = student_sigmas(cfg.method.student_timesteps, device=d.device)
        per_rank = math.ceil(n / d.world_size)
        self.mine = [(d.rank + k * d.world_size) % n for k in range(per_rank)]  # equal work on every rank
        if d.is_main:
            save_grid(decode(trainer.pipe, self.teacher_latents), self.dir / "teacher.png")
            if log_schedule:
                self.log_schedule()

    def log_schedule(self) -> None:
        """Once at start: the sigma schedules and x_t at each curriculum timestep (blog: log inputs)."""
        t, cfg = self.t, self.t.cfg
        lat = self.teacher_latents
        full = teacher_sigmas(t.pipe.scheduler, 50, image_seq_len(*lat.shape[-2:]))
        print0(f"teacher 50-step sigmas: {full[0]:.3f} -> {full[-2]:.4f} -> {full[-1]:.1f}; "
               f"student sigmas: {[round(s, 3) for s in self.sigmas.tolist()]}")
        ts = torch.tensor(cfg.method.student_timesteps, device=lat.device)
        x0 = lat[:1].expand(len(ts), -1, -1, -1)
        x_t = interpolate(x0, self.noise[:1].expand_as(x0), ts)
        save_grid(decode(t.pipe, x_t), self.dir / "x_t_at_curriculum_timesteps.png", cols=len(ts))

    @torch.no_grad()
    def sample(self, adapter) -> torch.Tensor:
        """The validation prompts' 4-step latents from `adapter`, split over ranks (all ranks call it)."""
        t = self.t
        idx = self.mine
        with torch.autocast(t.dist.device.type, dtype=torch.bfloat16, enabled=t.bf16):
            mine = euler_sample(adapter, self.noise[idx], self.sigmas, [self.caps[i] for i in idx])
        gathered = distributed.gather_tensor(mine.float().contiguous())
        # Undo the round-robin split: rank r's k-th sample is prompt (r + k·world) mod n.
        world, per_rank = t.dist.world_size, len(idx)
        order = [(r + k * world) % self.n for r in range(world) for k in range(per_rank)]
        latents = torch.empty_like(self.teacher_latents)
        for j, i in enumerate(order):
            latents[i] = gathered[j]
        return latents

    @torch.no_grad()
    def run(self, step: int) -> dict:
        t = self.t
        if self.mse_untrained is None:  # the untrained student = the teacher's weights (also after a resume)
            self.mse_untrained = latent_mse(self.sample(t.teacher), self.teacher_latents)
        latents = self.sample(t.student)
        mse = latent_mse(latents, self.teacher_latents)
        drift, drifted = t.health.drift_collapsed(mse, self.mse_untrained)
        metrics = {"val_latent_mse": mse, "val_drift": drift, "drift_collapse": drifted}
        if self.n >= 2:
            ratio, collapsed = t.health.diversity_collapsed(latents, self.teacher_latents)
            metrics.update(val_diversity_ratio=ratio, diversity_collapse=collapsed)
        if t.dist.is_main:
            save_grid(decode(t.pipe, latents), self.dir / f"step-{step:08d}.png")
        return metrics
