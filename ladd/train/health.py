"""Health guards: non-finite losses, and three faces of the collapse the blog noticed hours late.

1. The disc stops telling real from fake: over a window of steps the mean logit gap stays near zero
   while d_loss stays high (hinge: 2.0 means both ReLUs are fully active, i.e. chance) — and the
   student has moved away from the teacher. A disc at chance is also what a student that matches the
   teacher looks like: on the toy world two distilled demo seeds (among the best: KID 0.0025, 0.0019)
   sat at chance over steps 200-300 with validation drift 1.07-1.20× throughout, while the pure-LADD
   collapse this rule catches (KID 11× the untrained student's) was at 1.39× by its first validation
   (docs/toy-world.md). So while a validation at most a window old puts the student within
   `collapse_drift` (1.3) × the untrained student's distance, the rule holds its fire and the loop
   says so once.
2. Different prompts give near-identical images: the mean pairwise distance between the student's
   validation outputs falls below a fraction of the teacher's (the blog's "same speckled noise for
   every prompt").
3. The student drifts away from the teacher: its validation latents' MSE to the teacher's grows past
   a multiple of the untrained student's (the teacher's weights at the student's steps). Collapse to *varied* noise passes guard 2 (pixel noise
   differs from prompt to prompt) but not this one: on the toy world a collapsed run (every image the
   same striped texture) had 5.1× the untrained MSE at a diversity ratio of 0.72. With the slower disc
   of the demo's config, healthy runs end at 1.5–1.7× (10 runs), while lr_g 4e-5 collapsed 4 of 5 seeds
   (KID 2.6–7× the untrained) at 2.4–3.0×, under the first default of 3: hence 2.2.

Decisions are returned, not acted on; the loop reduces them across ranks before acting.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import torch

from ladd.config import HealthConfig


def pairwise_spread(images: torch.Tensor) -> float:
    """Mean L2 distance between all pairs of (N, ...) outputs (N >= 2): how different prompts look."""
    flat = images.flatten(1).float()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


class Health:
    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.nonfinite_in_a_row = 0
        self.gaps: deque[float] = deque(maxlen=cfg.collapse_window)
        self.d_losses: deque[float] = deque(maxlen=cfg.collapse_window)
        self.drift: tuple[int, float] | None = None  # (step, ratio) of the latest validation
        self.excused = 0  # steps the gap rule held its fire because the student stayed near the teacher

    def nonfinite(self, metrics: dict[str, float]) -> bool:
        keys = ("d_loss", "g_loss", "disc_grad_norm", "student_grad_norm")
        return any(k in metrics and not math.isfinite(metrics[k]) for k in keys)

    def observe(self, metrics: dict[str, float], step: int) -> dict[str, bool]:
        """Feed step `step`'s (rank-averaged) metrics. Returns which guards fired."""
        bad, excused = self.nonfinite(metrics), self.excused
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if bad else 0
        if not bad:
            self.gaps.append(metrics["logit_gap"])
            self.d_losses.append(metrics["d_loss"])
        return {
            "nonfinite": bad,
            "stop_nonfinite": self.nonfinite_in_a_row >= self.cfg.nan_patience,
            "collapse_logits": self.logits_collapsed(step),
            "excused": self.excused > excused,
        }

    def disc_at_chance(self) -> bool:
        if len(self.gaps) < self.cfg.collapse_window:
            return False
        gap = sum(self.gaps) / len(self.gaps)
        d_loss = sum(self.d_losses) / len(self.d_losses)
        return abs(gap) < self.cfg.collapse_gap and d_loss > self.cfg.collapse_d_loss

    def logits_collapsed(self, step: int) -> bool:
        """The disc at chance, unless a fresh validation shows the student still near the teacher."""
        if not self.disc_at_chance():
            return False
        if self.drift is not None:
            at, ratio = self.drift
            if step - at <= self.cfg.collapse_window and ratio <= self.cfg.collapse_drift:
                self.excused += 1
                return False
        return True

    def validated(self, step: int, drift: float) -> None:
        """Record a validation's drift ratio (every rank computes the same one from gathered latents).
        Step 0's measures the teacher's own weights (1 by construction): it excuses nothing."""
        if step > 0:
            self.drift = (step, drift)

    def diversity_collapsed(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, bool]:
        """(student spread / teacher spread, collapsed?) over the validation prompts' outputs."""
        ratio = pairwise_spread(student) / max(pairwise_spread(teacher), 1e-12)
        return ratio, ratio < self.cfg.diversity_fraction

    def drift_collapsed(self, mse: float, mse_untrained: float) -> tuple[float, bool]:
        """(validation MSE / the untrained student's, drifted away from the teacher?)."""
        ratio = mse / max(mse_untrained, 1e-12)
        return ratio, ratio > self.cfg.drift_factor

    def reset(self) -> None:
        self.nonfinite_in_a_row = 0
        self.gaps.clear()
        self.d_losses.clear()
        self.drift = None


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows (non-finite values, stored as "nan" / "inf", back as floats); [] if absent."""
    if not path.is_file():
        return []
    return [{k: float(v) if isinstance(v, str) else v for k, v in json.loads(line).items()}
            for line in path.read_text().splitlines()]


def replay(cfg: HealthConfig, rows: list[dict]) -> dict:
    """The guards' verdicts over a run's metrics.jsonl rows, as the loop reached them (training rows
    carry the step count after their update, hence step - 1; validation rows the step they ran at),
    except that the final validation's drift and diversity count too: the run ended that way."""
    health, fired = Health(cfg), {"collapse_logits": False, "diversity": False, "drift": False}
    for row in rows:
        if "val_drift" in row:
            health.validated(row["step"], row["val_drift"])
            fired["drift"] |= row["val_drift"] > cfg.drift_factor
        if "val_diversity_ratio" in row:
            fired["diversity"] |= row["val_diversity_ratio"] < cfg.diversity_fraction
        if "d_loss" in row and "logit_gap" in row:
            fired["collapse_logits"] |= health.observe(row, row["step"] - 1)["collapse_logits"]
    return {**fired, "excused_steps": health.excused}
