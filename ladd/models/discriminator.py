"""LADD discriminator: small heads reading a frozen teacher's hidden states.

LADD does not train a discriminator on pixels. The teacher transformer itself is the feature
network: fake (student) and real samples are re-noised to a level t_hat, run through the frozen
teacher, and the image-token hidden states of a few layers are handed to one small head per layer.
Each head sees

    feats[k]   (B, D, h, w)   teacher layer k, image tokens laid back out on their grid
    t_hat      (B,)           the noise level the samples were re-noised to, in [0, 1]
    text_cond  (B, text_dim)  a pooled caption vector (or a CLIP text embedding)

and returns one logit per sample. A head is

    x    = Linear(D -> hidden)(token)                         per token
    x    = x * (1 + scale) + shift,  (scale, shift) = FiLM(cond)  per channel
    cond = [sinusoidal(1000 * t_hat), Linear(text_dim -> cond_dim)(text_cond)]
    x    = SiLU(GN(Conv3x3(x))) -> SiLU(GN(Conv3x3 to hidden/2)) -> Conv1x1 to 1
    logit = mean over (h, w)

`forward` stacks the heads' logits into (B, n_heads), columns in the order of `layers`; the
losses in `ladd.losses` decide how heads are combined. The discriminator must stay differentiable
w.r.t. its inputs even when its own parameters are frozen: the generator loss back-propagates
through it into the teacher features and on into the student.

CPU example:
    disc = Discriminator(feature_dim=64, layers=[1, 3], text_dim=32, hidden=64, cond_dim=32)
    logits = disc({1: torch.randn(2, 64, 8, 8), 3: torch.randn(2, 64, 8, 8)},
                  torch.rand(2), torch.randn(2, 32))          # (2, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1], scaled by 1000 like diffusion timestep embeddings.

    emb = [cos(1000 t * f_i), sin(1000 t * f_i)],  f_i = max_period^(-i / (dim/2)),  i < dim/2
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    # Computed in fp32: 1000 * t * f loses all precision in bf16 for the high frequencies.
    args = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiscHead(nn.Module):
    """One head: token projection, FiLM on the shared condition, a small conv stack, one logit."""

    def __init__(self, feature_dim: int, hidden: int, cond_dim: int, spectral_norm: bool,
                 projection: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, hidden)
        self.film = nn.Sequential(
            nn.Linear(2 * cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden)
        )
        # Zero last layer -> scale = shift = 0 -> FiLM is the identity at init, so the heads start
        # as plain feature classifiers and learn to use t_hat / text only when it helps.
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)
        sn = _spectral_norm if spectral_norm else (lambda m: m)
        self.conv1 = sn(nn.Conv2d(hidden, hidden, 3, padding=1))
        self.norm1 = nn.GroupNorm(min(32, hidden), hidden)
        self.conv2 = sn(nn.Conv2d(hidden, hidden // 2, 3, padding=1))
        self.norm2 = nn.GroupNorm(min(16, hidden // 2), hidden // 2)
        self.out = sn(nn.Conv2d(hidden // 2, 1, 1))
        # Projection conditioning (Miyato & Koyama 2018): + <pooled features, W·text> / sqrt(hidden/2),
        # a direct caption-match term in every logit (FiLM starts as the identity and learns slowly).
        self.embed = nn.Linear(cond_dim, hidden // 2, bias=False) if projection else None

    def forward(self, x: Tensor, cond: Tensor, text: Tensor | None = None) -> Tensor:
        """x: (B, D, h, w), cond: (B, 2*cond_dim), text: (B, cond_dim) (projection only) -> logits (B,)."""
        x = self.proj(x.permute(0, 2, 3, 1))  # (B, h, w, hidden): Linear acts per token
        scale, shift = self.film(cond).chunk(2, dim=-1)  # (B, hidden) each
        x = x * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
        x = x.permute(0, 3, 1, 2)  # back to a channel-first grid for the convs
        x = F.silu(self.norm1(self.conv1(x)))
        x = F.silu(self.norm2(self.conv2(x)))
        logit = self.out(x).mean(dim=(1, 2, 3))
        if self.embed is not None:
            logit = logit + (x.mean(dim=(2, 3)) * self.embed(text)).sum(-1) / math.sqrt(x.shape[1])
        return logit


class Discriminator(nn.Module):
    """Multi-layer LADD discriminator: one `DiscHead` per teacher layer, shared conditioning."""

    def __init__(
        self,
        *,
        feature_dim: int,
        layers: Sequence[int],
        text_dim: int,
        hidden: int = 256,
        cond_dim: int = 256,
        spectral_norm: bool = False,
        projection: bool = False,
        num_teacher_layers: int | None = None,
    ) -> None:
        super().__init__()
        layers = [int(k) for k in layers]
        _check_layers(layers, num_teacher_layers)
        _check_widths(hidden, cond_dim)
        self.layers: list[int] = layers
        self.feature_dim = feature_dim
        self.text_dim = text_dim
        self.hidden = hidden
        self.cond_dim = cond_dim
        self.text_proj = nn.Linear(text_dim, cond_dim)
        self.heads = nn.ModuleDict(
            {str(k): DiscHead(feature_dim, hidden, cond_dim, spectral_norm, projection) for k in layers}
        )

    def forward(self, feats: Mapping[int, Tensor], t_hat: Tensor, text_cond: Tensor) -> Tensor:
        """feats {layer: (B, D, h, w)}, t_hat (B,), text_cond (B, text_dim) -> logits (B, n_heads)."""
        self._check_inputs(feats, t_hat, text_cond)
        dtype = self.text_proj.weight.dtype
        # Teacher features may arrive in bf16 while the heads run in fp32; cast to the heads' dtype
        # (the cast is differentiable, so the generator's gradient still reaches the features).
        t_emb = timestep_embedding(t_hat, self.cond_dim).to(dtype)
        text = self.text_proj(text_cond.to(dtype))
        cond = torch.cat([t_emb, text], dim=-1)
        logits = [self.heads[str(k)](feats[k].to(dtype), cond, text) for k in self.layers]
        return torch.stack(logits, dim=1)

    def num_parameters(self) -> int:
        """Total parameter count (spectral-norm `original` weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """One-line summary for logs."""
        n = len(self.layers)
        return (
            f"discriminator: {n} head{'s' if n != 1 else ''} on layers {self.layers}, "
            f"hidden {self.hidden}, {self.num_parameters() / 1e6:.1f}M parameters"
        )

    def _check_inputs(self, feats: Mapping[int, Tensor], t_hat: Tensor, text_cond: Tensor) -> None:
        missing = [k for k in self.layers if k not in feats]
        if missing:
            raise ValueError(
                f"discriminator needs teacher layers {missing} but feats only has {sorted(feats)}; "
                "tap the same layers the discriminator was built with"
            )
        if t_hat.ndim != 1:
            raise ValueError(f"t_hat must have shape (B,), got {tuple(t_hat.shape)}")
        batch = t_hat.shape[0]
        if text_cond.shape != (batch, self.text_dim):
            raise ValueError(
                f"text_cond must have shape ({batch}, {self.text_dim}), got {tuple(text_cond.shape)}"
            )
        for k in self.layers:
            f = feats[k]
            if f.ndim != 4 or f.shape[0] != batch or f.shape[1] != self.feature_dim:
                raise ValueError(
                    f"feats[{k}] must have shape ({batch}, {self.feature_dim}, h, w), "
                    f"got {tuple(f.shape)}"
                )


def _check_layers(layers: list[int], num_teacher_layers: int | None) -> None:
    """Reject empty, duplicate or out-of-range layer lists with one actionable line."""
    if not layers:
        raise ValueError("discriminator needs at least one teacher layer; fix model.disc_layers")
    dupes = sorted({k for k in layers if layers.count(k) > 1})
    if dupes:
        raise ValueError(f"disc layers {dupes} are listed more than once; fix model.disc_layers")
    for k in layers:
        if num_teacher_layers is not None and not 0 <= k < num_teacher_layers:
            raise ValueError(
                f"disc layer {k} is out of range: the teacher has {num_teacher_layers} main layers "
                f"(valid 0..{num_teacher_layers - 1}); fix model.disc_layers"
            )
        if k < 0:
            raise ValueError(f"disc layer {k} is negative; layer indices count from 0; fix model.disc_layers")


def _check_widths(hidden: int, cond_dim: int) -> None:
    """GroupNorm needs channels divisible by groups; the sinusoid needs an even width."""
    if hidden < 2 or hidden % 2:
        raise ValueError(f"disc hidden must be an even number >= 2, got {hidden}")
    g1, g2 = min(32, hidden), min(16, hidden // 2)
    if hidden % g1 or (hidden // 2) % g2:
        raise ValueError(
            f"disc hidden {hidden} does not split into GroupNorm groups ({g1} groups of {hidden} "
            f"channels, {g2} groups of {hidden // 2}); use a multiple of 32 such as 128 or 256"
        )
    if cond_dim < 2 or cond_dim % 2:
        raise ValueError(f"disc cond_dim must be an even number >= 2, got {cond_dim}")
