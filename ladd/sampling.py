"""Euler sampling through the adapter: the teacher's 50-step CFG samples and the student's few steps.

Reproduces `ZImagePipeline(..., output_type="latent")` (tests pin ≤ 1e-5 in float32): cond and
uncond run as one batch, the guided velocity is v = v_c + g·(v_c − v_u) (the pipeline's formula, which
is linear, so applying it before or after the sign flip is the same), and each step is
x ← x + (σ_next − σ)·v in float32, as `FlowMatchEulerDiscreteScheduler.step` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ZImagePipeline
from torch import Tensor

from ladd.models.zimage import ZImageAdapter


def initial_noise(
    pipe: ZImagePipeline, seeds: Sequence[int], size: int | tuple[int, int], channels: int | None = None
) -> Tensor:
    """The latents ZImagePipeline draws for each prompt alone with Generator("cpu").manual_seed(seed),
    at `size` = (width, height) in pixels, or one side of a square."""
    width, height = (size, size) if isinstance(size, int) else size
    factor = pipe.vae_scale_factor * 2
    if width % factor or height % factor:
        raise ValueError(f"size {width}x{height} must be a multiple of {factor} (VAE factor × patch 2)")
    shape = (channels or pipe.transformer.config.in_channels, 2 * (height // factor), 2 * (width // factor))
    return seeded_noise(seeds, shape)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """One (C, H, W) noise per seed, each drawn alone on the CPU: (len(seeds), C, H, W)."""
    out = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.cat(out, dim=0)


@torch.no_grad()
def euler_sample(
    adapter: ZImageAdapter,
    noise: Tensor,
    sigmas: Tensor,
    cap_feats: Sequence[Tensor],
    neg_cap_feats: Sequence[Tensor] | None = None,
    guidance: float = 0.0,
    record: Sequence[float] = (),
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate dx/dσ = v from σ = sigmas[0] down to sigmas[-1] (= 0). Returns float32 latents.

    With guidance > 0 the negative captions are required; cond and uncond share one forward.
    `record`: σ values inside [sigmas[-1], sigmas[0]]; then also returns the states of the Euler path
    at them, (B, len(record), C, H, W): on the step from σ_i to σ_{i+1} the path is x_i + (σ − σ_i)·v_i,
    so a state at a schedule point is the sampler's own latent there, bit for bit.
    """
    x = noise.float()
    sigmas = sigmas.float().to(x.device)
    lo, hi = sigmas[-1].item(), sigmas[0].item()
    if any(not lo <= r <= hi for r in record):
        raise ValueError(f"record σ {list(record)} must lie within the schedule's [{lo:g}, {hi:g}]")
    states: list[Tensor | None] = [x.clone() if r == hi else None for r in record]
    for i in range(len(sigmas) - 1):
        v = guided_velocity(adapter, x, sigmas[i], cap_feats, neg_cap_feats, guidance)
        for k, r in enumerate(record):
            if states[k] is None and r >= sigmas[i + 1].item():  # σ_i > r ≥ σ_{i+1}: on this step's line
                step = sigmas[i + 1] - sigmas[i] if r == sigmas[i + 1].item() else r - sigmas[i]
                states[k] = x + step * v
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    if not record:
        return x
    return x, torch.stack(states, dim=1)


def guided_velocity(
    adapter: ZImageAdapter,
    x: Tensor,
    sigma: Tensor,
    cap_feats: Sequence[Tensor],
    neg_cap_feats: Sequence[Tensor] | None = None,
    guidance: float = 0.0,
) -> Tensor:
    """The velocity at (x, σ), guided as the pipeline guides: v_c + g·(v_c − v_u), cond and uncond as
    one batch; σ a scalar or one per sample. In the adapter's dtype, as the pipeline computes it."""
    if guidance <= 0:
        return adapter(x, sigma, list(cap_feats)).velocity
    if neg_cap_feats is None or len(neg_cap_feats) != len(cap_feats):
        raise ValueError("guidance > 0 needs one negative caption-feature tensor per prompt")
    B = x.shape[0]
    sigma2 = torch.cat([sigma, sigma]) if sigma.ndim == 1 else sigma
    v = adapter(torch.cat([x, x]), sigma2, list(cap_feats) + list(neg_cap_feats)).velocity
    v_cond, v_uncond = v[:B], v[B:]
    return v_cond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def decode(pipe: ZImagePipeline, latents: Tensor) -> Tensor:
    """Latents -> images in [0, 1], (B, 3, H, W), undoing the VAE's scaling and shift as the pipeline."""
    vae = pipe.vae
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)
