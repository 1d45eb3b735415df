"""Pre-flight checks: `ladd doctor` runs them all (train/commands.py); `ladd train` runs the cheap ones at every start.

Each check is a row (name, passed, detail) computed from the config, the data and the teacher; none is
a constant. The reference checks catch the public run's first two bugs (teacher references that were
not fully denoised, or made without CFG) before any GPU hour is spent.
"""

from __future__ import annotations

import copy
import math

import torch

from ladd.config import Config
from ladd.data.shards import read_manifest
from ladd.flow import image_seq_len, teacher_sigmas

Check = tuple[str, bool, str]


def reference_checks(cfg: Config, pipe, data) -> list[Check]:
    """The teacher's references are clean (schedule reaches σ = 0) and were made with CFG (blog bugs 1, 2)."""
    sampling = read_manifest(cfg.data.path)["sampling"]
    lat = data[0]["latents"]
    sig = teacher_sigmas(pipe.scheduler, sampling["steps"], image_seq_len(*lat.shape[-2:]))
    return [
        ("teacher references are clean (schedule reaches sigma 0)", float(sig[-1]) == 0.0,
         f"{sampling['steps']} steps end at sigma {float(sig[-1]):.3f}"),
        ("teacher references use CFG", sampling["guidance"] > 0, f"guidance {sampling['guidance']}"),
    ]


def micro_batch_check(cfg: Config, data) -> Check:
    """Every micro-batch holds distinct samples of one bucket, and every bucket fills at least one step:
    a bucket with fewer samples than a step (micro-batch × ranks) would never be trained."""
    step = data.world_size * cfg.data.batch_per_rank
    short = [f"{b.name} ({n})" for b, n in data.never_visited]
    counts = ", ".join(f"{b.name} ×{n}" for b, n in zip(data.buckets, data.bucket_counts))
    return ("every bucket fills a step of distinct samples", not short,
            f"buckets {counts} for steps of {step} ({cfg.method.loss} loss)"
            + (f"; too few: {', '.join(short)}" if short else ""))


def bucket_checks(cfg: Config, trainer) -> list[Check]:
    """One G-step at every bucket's shape (the first micro-batch of each bucket's samples), on a copy
    of the student: it runs (on a GPU: fits in memory, peak reported) and gives finite, non-zero
    gradients. A run whose largest bucket does not fit fails here, not hours into training."""
    checks = []
    device = trainer.dist.device
    for bucket, members in zip(trainer.data.buckets, trainer.data.bucket_members()):
        if len(members) < cfg.data.batch_per_rank:
            continue  # micro_batch_check names it
        batch = trainer.micro_batches([trainer.data.batch(members[: cfg.data.batch_per_rank])])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            name, ok, detail = gradient_check(cfg, trainer.student, trainer.teacher, trainer.disc, batch, device)
        except torch.cuda.OutOfMemoryError as err:
            checks.append((f"one step at {bucket.name} fits in memory", False, str(err).split("\n")[0]))
            continue
        if device.type == "cuda":
            detail += f", peak {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB"
        checks.append((f"{name} at {bucket.name}", ok, detail))
    return checks


def gradient_check(cfg: Config, student, teacher, disc, micro_batches, device: torch.device) -> Check:
    """One G-step on a throw-away copy of the student: its gradients must be finite and non-zero."""
    from ladd.train.step import LaddModels, generator_step, trainable

    student = copy.deepcopy(student)
    opt = torch.optim.SGD(trainable(student), lr=0.0)
    metrics, _ = generator_step(LaddModels(student, teacher, disc), opt, micro_batches, 0, cfg.method,
                                torch.Generator(device))
    norm = metrics["student_grad_norm"]
    return ("one step gives finite, non-zero student gradients", math.isfinite(norm) and norm > 0,
            f"grad norm {norm:.3g}")
