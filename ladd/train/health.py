"""Health guards: non-finite losses, and three faces of the collapse the blog noticed hours late.

1. The disc stops telling real from fake: over a window of steps the mean logit gap stays near zero
   while d_loss stays high (hinge: 2.0 means both ReLUs are fully active, i.e. chance) — and the
   student has moved away from the teacher. A disc at chance is also what a student that matches the
   teacher looks like (a slow disc cannot keep up with a good student), so the rule decides by a
   validation at most a window old: within `collapse_drift` × the untrained student's distance to the
   teacher, it holds its fire (the loop says so once); further, it fires. With no such validation it
   fires nothing yet and asks the loop for one (`pending`), which decides.
2. Different prompts give near-identical images: the mean pairwise distance between the student's
   validation outputs falls below a fraction of the teacher's (the blog's "same speckled noise for
   every prompt").
3. The student drifts away from the teacher: its validation latents' MSE to the teacher's grows past
   a multiple of the untrained student's (the teacher's weights at the student's steps). This catches
   a collapse to *varied* noise, which passes guard 2 (pixel noise differs from prompt to prompt)
   while the disc wins easily (so guard 1 stays silent too).

The thresholds sit between healthy and collapsed runs measured on the toy world; the margins are
thin. The measured values and the runs behind them: docs/training.md, "Health".

Decisions are returned, not acted on; the loop reduces them across ranks before acting.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ladd.config import HealthConfig


def pairwise_spread(images: torch.Tensor) -> float:
    """Mean L2 distance between all pairs of (N, ...) outputs (N >= 2): how different prompts look."""
    flat = images.flatten(1).float()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def diversity_ratio(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Student spread / teacher spread over the validation prompts' outputs (guard 2 reads it)."""
    return pairwise_spread(student) / max(pairwise_spread(teacher), 1e-12)


def drift_ratio(mse: float, mse_untrained: float) -> float:
    """Validation MSE to the teacher / the untrained student's (guard 3 reads it)."""
    return mse / max(mse_untrained, 1e-12)


@dataclass(frozen=True)
class Decision:
    """What the loop does next and why: the health checks' verdict, acted on in one place (the loop).

    `continue` with a message is a warning (printed once, training goes on); `stop` ends the run without
    saving (the last checkpoint stays the last good one); `rollback` restores the latest checkpoint with
    a slower disc. `cause` names the guard: "nonfinite" or "collapse" ("" when all is well).
    """

    action: Literal["continue", "rollback", "stop"] = "continue"
    cause: str = ""
    message: str = ""


CONTINUE = Decision()


class Health:
    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.nonfinite_in_a_row = 0
        self.gaps: deque[float] = deque(maxlen=cfg.collapse_window)
        self.d_losses: deque[float] = deque(maxlen=cfg.collapse_window)
        self.drift: tuple[int, float] | None = None  # (step, ratio) of the latest validation
        self.excused = 0  # steps the gap rule held its fire because the student stayed near the teacher
        self.pending = False  # the disc is at chance with no fresh validation: the loop validates next

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

    def after_step(self, metrics: dict[str, float], step: int) -> Decision:
        """The decision after training step `step`, from its rank-averaged metrics (equal on every rank)."""
        events = self.observe(metrics, step)
        if events["stop_nonfinite"]:
            return Decision("stop", "nonfinite", f"{self.cfg.nan_patience} non-finite losses in a row")
        if events["collapse_logits"]:
            return self.gap_collapse()
        if events["excused"] and self.excused == 1:
            return self.excuse()
        return CONTINUE

    def gap_collapse(self) -> Decision:
        return self.on_collapse("the disc's logit gap has stayed near zero with d_loss high"
                                + (f" and validation drift is {self.drift[1]:.2f}× (> health.collapse_drift "
                                   f"{self.cfg.collapse_drift:g})" if self.drift and self.cfg.collapse_drift else ""))

    def excuse(self) -> Decision:
        h = self.cfg
        return Decision("continue", "", (
            f"the disc is at chance (|logit gap| < {h.collapse_gap:g}, d_loss > {h.collapse_d_loss:g} over "
            f"{h.collapse_window} steps) while the student stays near the teacher (validation drift "
            f"{self.drift[1]:.2f}× <= health.collapse_drift {h.collapse_drift:g}): read as a student that "
            f"fools the disc, not a collapse; if KID stalls, a faster disc (optim.lr_d) may help"))

    def after_validation(self, step: int, drift: float, diversity_ratio: float | None, last_step: bool) -> Decision:
        """The decision after validating at `step` (ratios from gathered latents: equal on every rank).
        The final validation only reports: the run ends there anyway."""
        excused = self.excused
        gap_collapsed = self.validated(step, drift)
        if last_step:
            return CONTINUE
        if gap_collapsed:
            return self.gap_collapse()
        if diversity_ratio is not None and diversity_ratio < self.cfg.diversity_fraction:
            return self.on_collapse("validation images of different prompts are near-identical "
                                    f"(spread {diversity_ratio:.2f}× the teacher's)")
        if drift > self.cfg.drift_factor:
            return self.on_collapse(f"validation latents are {drift:.1f}× further from the teacher's than the "
                                    f"untrained student's (health.drift_factor = {self.cfg.drift_factor:g})")
        if self.excused > excused and self.excused == 1:
            return self.excuse()
        return CONTINUE

    def on_collapse(self, why: str) -> Decision:
        """health.on_collapse turned into a decision: warn (continue), stop or rollback."""
        action = self.cfg.on_collapse
        message = f"collapse suspected — {why} (health.on_collapse = {action})"
        return Decision("continue" if action == "warn" else action, "collapse", message)

    def disc_at_chance(self) -> bool:
        if len(self.gaps) < self.cfg.collapse_window:
            return False
        gap = sum(self.gaps) / len(self.gaps)
        d_loss = sum(self.d_losses) / len(self.d_losses)
        return abs(gap) < self.cfg.collapse_gap and d_loss > self.cfg.collapse_d_loss

    def logits_collapsed(self, step: int) -> bool:
        """The disc at chance and a fresh validation puts the student away from the teacher. With no
        fresh validation, nothing fires yet: `pending` asks the loop for one, and `validated` decides."""
        if not self.disc_at_chance():
            return False
        if self.cfg.collapse_drift == 0:  # never excuse, so never wait for a validation either
            return True
        if self.drift is not None and step - self.drift[0] <= self.cfg.collapse_window:
            if self.drift[1] <= self.cfg.collapse_drift:
                self.excused += 1
                return False
            return True
        self.pending = True
        return False

    def validated(self, step: int, drift: float) -> bool:
        """Record a validation's drift ratio (every rank computes the same one from gathered latents).
        Step 0's measures the teacher's own weights (1 by construction): it excuses nothing. Returns
        whether it confirms the gap rule's pending collapse."""
        if step == 0:
            return False
        self.drift = (step, drift)
        pending, self.pending = self.pending, False
        if pending and drift <= self.cfg.collapse_drift:
            self.excused += 1
        return pending and drift > self.cfg.collapse_drift

    def reset(self) -> None:
        self.nonfinite_in_a_row = 0
        self.gaps.clear()
        self.d_losses.clear()
        self.drift = None
        self.pending = False


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
            fired["collapse_logits"] |= health.validated(row["step"], row["val_drift"])
            fired["drift"] |= row["val_drift"] > cfg.drift_factor
        if "val_diversity_ratio" in row:
            fired["diversity"] |= row["val_diversity_ratio"] < cfg.diversity_fraction
        if "d_loss" in row and "logit_gap" in row:
            fired["collapse_logits"] |= health.observe(row, row["step"] - 1)["collapse_logits"]
    return {**fired, "excused_steps": health.excused}
