"""Flow-matching math for LADD: small pure functions, each formula written next to its code.

Convention everywhere (the adapter converts Z-Image's own at its boundary):

    x_σ = (1 − σ)·x0 + σ·ε      σ ∈ [0, 1], σ = 1 is pure noise
    v   = ε − x0                 the velocity the model predicts
    x̂0  = x_σ − σ·v              denoised estimate from a velocity

Inference sigma schedules come from diffusers' `FlowMatchEulerDiscreteScheduler` — never from a
hand-written linspace (one such linspace once left 11 % residual noise in every teacher image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift
from torch import Tensor

T_HAT_MIN, T_HAT_MAX = 0.001, 0.999  # the logit-normal sampler's clamp


def _bc(sigma: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a per-sample σ of shape (B,) (or a scalar) against a (B, C, H, W) tensor."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε. The student input (σ = t), and both re-noised disc inputs (σ = t̂)."""
    s = _bc(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = ε − x0, the flow-matching regression target."""
    return noise - x0


def x0_from_velocity(x_sigma: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """x̂0 = x_σ − σ·v. Exact when v is the true velocity: x_σ − σ(ε − x0) = x0."""
    return x_sigma - _bc(sigma, x_sigma) * velocity


def logit_normal(
    n: int, m: float = 1.0, s: float = 1.0, *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """t̂ = clamp(sigmoid(u), 0.001, 0.999), u ~ N(m, s²): the re-noising level shown to the disc.

    m = 1 puts the median at sigmoid(1) ≈ 0.73 (mostly noisy); s widens the spread.
    """
    u = torch.randn(n, generator=generator, device=device) * s + m
    return torch.sigmoid(u).clamp(T_HAT_MIN, T_HAT_MAX)


@dataclass(kw_only=True, frozen=True)
class Curriculum:
    """The student's training timesteps and how often each is drawn.

    During the first `warmup_steps` optimizer steps only the `warmup_easiest` smallest timesteps (the
    easy, mostly-clean inputs) are drawn, uniformly; afterwards `probs` (aligned with `timesteps`)
    applies — by default 70 % at t = 1.0, the pure-noise start that 4-step inference begins from.
    """

    timesteps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    warmup_steps: int = 0
    warmup_easiest: int = 2

    def __post_init__(self):
        if len(self.probs) != len(self.timesteps):
            raise ValueError(f"curriculum: {len(self.probs)} probs for {len(self.timesteps)} timesteps")
        if any(p < 0 for p in self.probs) or abs(sum(self.probs) - 1) > 1e-6:
            raise ValueError(f"curriculum probs {list(self.probs)} must be non-negative and sum to 1")
        if any(not 0 < t <= 1 for t in self.timesteps) or list(self.timesteps) != sorted(self.timesteps)[::-1]:
            raise ValueError(f"student timesteps {list(self.timesteps)} must be in (0, 1] and decreasing")
        if not 1 <= self.warmup_easiest <= len(self.timesteps):
            raise ValueError(f"warmup_easiest must be in 1..{len(self.timesteps)}")

    def probabilities(self, step: int) -> list[float]:
        if step < self.warmup_steps:
            k = self.warmup_easiest
            n = len(self.timesteps)
            return [0.0] * (n - k) + [1.0 / k] * k  # timesteps are decreasing: the easiest are last
        return list(self.probs)

    def sample(self, step: int, n: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n student timesteps t for this optimizer step, shape (n,)."""
        where = generator.device if generator is not None else device  # draw where the generator lives
        probs = torch.tensor(self.probabilities(step), device=where)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator)
        return torch.tensor(self.timesteps, dtype=torch.float32, device=where)[idx].to(device)


def teacher_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, image_seq_len: int, device=None
) -> Tensor:
    """The σ schedule `ZImagePipeline` uses for `num_steps` (num_steps + 1 values, ending at 0).

    As the pipeline does: sigmas = linspace(1, 1/N, N) passed to the scheduler, which applies its
    shift (Z-Image: shift 3) or resolution-dependent shift and appends the terminal 0.
    """
    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)  # never mutate the caller's
    mu = calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    base = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
    sched.set_timesteps(sigmas=base, mu=mu, device=device)
    return sched.sigmas.clone()


def student_scheduler(timesteps: Sequence[float] | None = None) -> FlowMatchEulerDiscreteScheduler:
    """A scheduler whose default N-step call visits exactly the student's training timesteps.

    ZImagePipeline's default sigmas for N steps are u = linspace(1, 1/N, N), which the scheduler shifts
    to s·u / (1 + (s − 1)·u). With shift s = 1 (the default, and for `timesteps` None) they stay as
    they are — for N = 4: 1.0, 0.75, 0.5, 0.25; timesteps that are such a shift of them get that shift
    (`default_call_shift`: 1, 0.9, 0.75, 0.5 is the teacher's shift 3). Other timesteps get shift 1
    and must be passed as `sigmas=` at call time (the scheduler shifts those too).
    """
    shift = default_call_shift(timesteps) if timesteps is not None else 1.0
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift or 1.0)


def default_call_shift(timesteps: Sequence[float]) -> float | None:
    """The scheduler shift s that maps ZImagePipeline's default sigmas linspace(1, 1/N, N) onto
    `timesteps` (N of them), or None if no shift does."""
    n = len(timesteps)
    u = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64).tolist()
    if n < 2 or not 0 < timesteps[1] < 1:
        return 1.0 if n == 1 and timesteps[0] == 1.0 else None
    s = round(timesteps[1] * (1 - u[1]) / (u[1] * (1 - timesteps[1])), 6)  # solved at the second sigma
    shifted = [s * x / (1 + (s - 1) * x) for x in u]
    return s if all(abs(a - b) < 1e-6 for a, b in zip(shifted, timesteps)) else None


def student_sigmas(timesteps: Sequence[float] = (1.0, 0.75, 0.5, 0.25), device=None) -> Tensor:
    """σ schedule for few-step student inference: the training timesteps, then 0."""
    sched = student_scheduler()
    sched.set_timesteps(sigmas=list(timesteps), device=device)
    return sched.sigmas.clone()


def image_seq_len(latent_h: int, latent_w: int, patch_size: int = 2) -> int:
    """Image tokens for a latent of this size (what the pipeline feeds `calculate_shift`)."""
    return (latent_h // patch_size) * (latent_w // patch_size)


def latent_mse(latents: Tensor, teacher: Tensor) -> float:
    """Mean squared error to the teacher's latent of the same prompt and seed (a paired metric)."""
    return float(torch.mean((latents.float().cpu() - teacher.float().cpu()) ** 2))
