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


def validation_indices(data, n: int) -> list[int]:
    """The validation samples: the data's first samples, taken bucket by bucket in turn so that every
    bucket is validated (with one bucket: samples 0..n-1)."""
    members = [m for m in data.bucket_members() if m]
    out: list[int] = []
    k = 0
    while len(out) < n:
        for m in members:
            if k < len(m) and len(out) < n:
                out.append(m[k])
        k += 1
    return out


class _Group:
    """The validation samples of one bucket (one shape), and this rank's share of them."""

    def __init__(self, name: str, samples: list[dict], positions: list[int], seed: int, dist: Dist):
        self.name, self.positions, self.n = name, positions, len(samples)
        self.caps = [s["cap_feats"].to(dist.device) for s in samples]
        self.teacher_latents = torch.stack([s["latents"] for s in samples]).to(dist.device)
        shape = self.teacher_latents.shape[1:]
        self.noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in positions
        ]).to(dist.device)
        per_rank = math.ceil(self.n / dist.world_size)
        self.mine = [(dist.rank + k * dist.world_size) % self.n for k in range(per_rank)]  # equal work on every rank


class Validator:
    """The validation set (the data's first `num_prompts` samples, every bucket) and how to score a
    student on it.

    Holds what it needs, nothing more: the pipeline (VAE decodes, scheduler), the data, the validation
    and method configs, the rank layout, the run's validation folder and whether autocast is on.
    """

    def __init__(self, pipe, data, cfg: Config, dist: Dist, out_dir: Path, bf16: bool, log_schedule: bool = True):
        self.pipe, self.dist, self.bf16 = pipe, dist, bf16
        self.student_timesteps = cfg.method.student_timesteps
        self.dir = out_dir / "validation"
        chosen = validation_indices(data, min(cfg.validation.num_prompts, len(data)))
        self.n = len(chosen)
        self.mse_untrained: float | None = None
        by_bucket: dict[str, list[int]] = {}
        for position, i in enumerate(chosen):
            by_bucket.setdefault(data.bucket_of(i).name, []).append(position)
        self.groups = [_Group(name, [data[chosen[p]] for p in positions], positions, cfg.validation.seed, dist)
                       for name, positions in by_bucket.items()]
        self.sigmas = student_sigmas(cfg.method.student_timesteps, device=dist.device)
        if dist.is_main:
            for g in self.groups:
                save_grid(decode(pipe, g.teacher_latents), self.dir / self._png("teacher", g))
            if log_schedule:
                self.log_schedule()

    def _png(self, stem: str, group: _Group) -> str:
        return f"{stem}.png" if len(self.groups) == 1 else f"{stem}-{group.name}.png"

    def log_schedule(self) -> None:
        """Once at start: the sigma schedules and x_t at each curriculum timestep (blog: log inputs)."""
        g = self.groups[0]
        lat = g.teacher_latents
        full = teacher_sigmas(self.pipe.scheduler, 50, image_seq_len(*lat.shape[-2:]))
        print0(f"teacher 50-step sigmas: {full[0]:.3f} -> {full[-2]:.4f} -> {full[-1]:.1f}; "
               f"student sigmas: {[round(s, 3) for s in self.sigmas.tolist()]}")
        ts = torch.tensor(self.student_timesteps, device=lat.device)
        x0 = lat[:1].expand(len(ts), -1, -1, -1)
        x_t = interpolate(x0, g.noise[:1].expand_as(x0), ts)
        save_grid(decode(self.pipe, x_t), self.dir / "x_t_at_curriculum_timesteps.png", cols=len(ts))

    @torch.no_grad()
    def sample(self, adapter) -> list[torch.Tensor]:
        """The validation prompts' 4-step latents from `adapter`, one tensor per bucket group, split over
        ranks (all ranks call it)."""
        return [self._sample_group(adapter, g) for g in self.groups]

    def _sample_group(self, adapter, g: _Group) -> torch.Tensor:
        idx = g.mine
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            mine = euler_sample(adapter, g.noise[idx], self.sigmas, [g.caps[i] for i in idx])
        gathered = distributed.gather_tensor(mine.float().contiguous())
        # Undo the round-robin split: rank r's k-th sample is prompt (r + k·world) mod n.
        world, per_rank = self.dist.world_size, len(idx)
        order = [(r + k * world) % g.n for r in range(world) for k in range(per_rank)]
        latents = torch.empty_like(g.teacher_latents)
        for j, i in enumerate(order):
            latents[i] = gathered[j]
        return latents

    def _mse(self, latents: list[torch.Tensor]) -> float:
        """Latent MSE to the references, a mean over samples (one bucket: `latent_mse` itself)."""
        mses = [latent_mse(x, g.teacher_latents) for x, g in zip(latents, self.groups)]
        if len(mses) == 1:
            return mses[0]
        return sum(m * g.n for m, g in zip(mses, self.groups)) / self.n

    @torch.no_grad()
    def run(self, step: int, student, teacher) -> dict:
        """Validation metrics of `student` at `step` (every rank calls it and gets the same numbers):
        latent MSE to the teacher's references, its ratio to the untrained student's (`teacher` at the
        student's steps), and the spread of different prompts' outputs relative to the teacher's (within
        each bucket, averaged over the buckets by their number of prompts)."""
        if self.mse_untrained is None:  # the untrained student = the teacher's weights (also after a resume)
            self.mse_untrained = self._mse(self.sample(teacher))
        latents = self.sample(student)
        mse = self._mse(latents)
        metrics = {"val_latent_mse": mse, "val_drift": drift_ratio(mse, self.mse_untrained)}
        spread = [(diversity_ratio(x, g.teacher_latents), g.n) for x, g in zip(latents, self.groups) if g.n >= 2]
        if spread:
            metrics["val_diversity_ratio"] = (spread[0][0] if len(spread) == 1 else
                                              sum(r * n for r, n in spread) / sum(n for _, n in spread))
        if self.dist.is_main:
            for x, g in zip(latents, self.groups):
                save_grid(decode(self.pipe, x), self.dir / self._png(f"step-{step:08d}", g))
        return metrics
