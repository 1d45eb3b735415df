"""Typed configuration. Every knob of the method is a field with the blog's current best as default.

Checked at construction: a contradictory setting raises one line saying what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from ladd.flow import Curriculum
from ladd.losses import AGGREGATES, KINDS


@dataclass(kw_only=True)
class MethodConfig:
    """The LADD method: update schedule, re-noising, curriculum, losses."""

    gen_update_interval: int = 3  # disc steps per student update; blog sweeps: 3 wins after the fixes
    renoise_m: float = 1.0  # logit-normal mean of t̂ (sigmoid(1) ≈ 0.73)
    renoise_s: float = 1.0  # logit-normal std of t̂
    student_timesteps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    student_timestep_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    curriculum_warmup_steps: int = 0  # optimizer steps drawing only the two easiest timesteps
    loss: str = "hinge"  # "hinge" | "nonsaturating"
    aggregate: str = "mean_heads"  # per-head losses averaged (LADD paper) | "sum_logits" (the blog)
    r1_weight: float = 0.0  # γ; adds γ/2·E‖∇D(real features)‖² to the disc loss when > 0
    grad_clip_g: float = 1.0  # max grad norm of the student (0 = no clipping, norm still measured)
    grad_clip_d: float = 1.0
    allow_hinge_batch_of_one: bool = False  # see check_micro_batch: hinge on 1 sample saturates

    def __post_init__(self):
        self.student_timesteps = tuple(float(t) for t in self.student_timesteps)
        self.student_timestep_probs = tuple(float(p) for p in self.student_timestep_probs)
        if self.gen_update_interval < 1:
            raise ValueError(f"method.gen_update_interval must be >= 1, got {self.gen_update_interval}")
        if self.loss not in KINDS:
            raise ValueError(f"method.loss {self.loss!r} is unknown; choose one of {', '.join(KINDS)}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"method.aggregate {self.aggregate!r} is unknown; choose one of {', '.join(AGGREGATES)}")
        if self.renoise_s <= 0:
            raise ValueError(f"method.renoise_s must be > 0, got {self.renoise_s}")
        if self.r1_weight < 0:
            raise ValueError(f"method.r1_weight must be >= 0, got {self.r1_weight}")
        self.curriculum()  # validates timesteps and probabilities

    def curriculum(self) -> Curriculum:
        return Curriculum(
            timesteps=self.student_timesteps,
            probs=self.student_timestep_probs,
            warmup_steps=self.curriculum_warmup_steps,
        )

    def check_micro_batch(self, batch_per_rank: int) -> None:
        """Refuse a per-rank micro-batch of 1 with the hinge loss unless explicitly allowed.

        With one sample the disc separates real from fake past the ±1 margins almost at once, both
        ReLUs go to zero and so does every gradient; accumulating zeros over micro-batches is still
        zero. This is how the public Z-Image LADD run collapsed into noise.
        """
        if batch_per_rank < 1:
            raise ValueError(f"batch per rank must be >= 1, got {batch_per_rank}")
        if batch_per_rank == 1 and self.loss == "hinge" and not self.allow_hinge_batch_of_one:
            raise ValueError(
                "hinge loss with a per-rank micro-batch of 1 saturates to zero gradient (it collapsed the "
                "public run): use batch_per_rank >= 2, or method.loss = 'nonsaturating', or set "
                "method.allow_hinge_batch_of_one = true to override"
            )
