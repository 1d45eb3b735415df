"""Detail energy of latents: power in radial frequency bands, and the term that pulls a sample's
detail energy towards a reference's (method.detail_weight).

    P(f)   = Σ_c |FFT2(x_c)(f)|²                     orthonormal FFT, summed over channels (Parseval)
    r(f)   = √(f_y² + f_x²)                           in units of the Nyquist frequency (1 = 2 latent px)
    E_b(x) = Σ_{lo_b ≤ r(f) < hi_b} P(f)              per sample, one number per band
    L      = Σ_b (log E_b(x̂0) − log E_b(x0))²        per sample

The bands are the upper three of four: [0.25, 0.5), [0.5, 0.75), [0.75, 1.01), structures of 2 to 8
latent pixels (8 to 32 image pixels through the toy VAE's 4×, 16 to 64 through Z-Image's 8×), up to
Nyquist on the axes (the last edge admits the bins just past it, r = √65/8 on a 16-pixel side); the
corners beyond are left out. The term is phase-free: it asks for as much detail as the reference has
in each band, not for the reference's detail in its places, which a regression towards the teacher's
path already asks for and a one-step student blurs into their mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

DETAIL_BANDS = ((0.25, 0.5), (0.5, 0.75), (0.75, 1.01))
_TINY = 1e-12  # keeps log E finite for a constant latent (no detail at all)


def radius(h: int, w: int, device=None) -> Tensor:
    """(h, w) radial frequency of each FFT bin, in units of the Nyquist frequency."""
    fy = torch.fft.fftfreq(h, device=device).abs()[:, None] * 2
    fx = torch.fft.fftfreq(w, device=device).abs()[None, :] * 2
    return (fy.square() + fx.square()).sqrt()


def band_energy(x: Tensor, bands=DETAIL_BANDS) -> Tensor:
    """(B, len(bands)) power of each sample of x (B, C, H, W) in each radial band, summed over channels."""
    power = torch.fft.fft2(x.float(), norm="ortho").abs().square().sum(1)  # (B, H, W)
    r = radius(*power.shape[-2:], device=x.device)
    return torch.stack([(power * ((r >= lo) & (r < hi))).sum((-2, -1)) for lo, hi in bands], 1)


def detail_loss(x: Tensor, ref: Tensor) -> Tensor:
    """(B,) Σ_b (log E_b(x) − log E_b(ref))² of each sample: 0 when x carries ref's energy in each band."""
    return (band_energy(x).clamp_min(_TINY).log() - band_energy(ref).clamp_min(_TINY).log()).square().sum(1)
