"""Aspect-ratio buckets: the image sizes a data set, a training run and an exported student serve.

A bucket is a (width, height) in pixels, written `WxH` (`832x1216` is portrait). Every side is a
multiple of the VAE factor × 2 (the transformer's 2×2 patches), so a bucket maps to one latent grid
and one token count. A set of buckets is named or listed:

    zimage-1024   1024x1024 and six near-constant-area (≈1 MP) portrait/landscape sizes
    zimage-512    the same family at 512² (≈0.26 MP)
    toy           the toy world's family: 64x64, 80x48, 48x80
    1024x1024,832x1216:2,...   an explicit list; `:w` weights how often prompts without a size are
                               drawn for that bucket (default 1)

    buckets = parse_buckets("zimage-1024", factor=16)
    assign(buckets, n=1000, seed=0)      # bucket index per prompt, the same for every n' >= n prefix
    buckets[0].latent_shape(16, 8)       # (16, 128, 128)

The per-prompt draw is a seeded stream (numpy PCG64 from `seed`, one uniform number per prompt, cut
by the cumulative weights), so sample i's bucket never depends on the number of processes or on the
prompts after it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class BucketError(ValueError):
    """A bucket specification that cannot be used; the message is one line."""


@dataclass(frozen=True, slots=True)
class Bucket:
    width: int  # pixels
    height: int  # pixels
    weight: float = 1.0  # relative frequency of the seeded draw for prompts without their own size

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def latent_hw(self, vae_scale: int) -> tuple[int, int]:
        """The latent grid (H, W) ZImagePipeline draws for this size (prepare_latents' rounding)."""
        f = vae_scale * 2
        return 2 * (self.height // f), 2 * (self.width // f)

    def latent_shape(self, channels: int, vae_scale: int) -> tuple[int, int, int]:
        return (channels, *self.latent_hw(vae_scale))

    def tokens(self, vae_scale: int, patch: int = 2) -> int:
        """Image tokens of the transformer's joint sequence at this size."""
        h, w = self.latent_hw(vae_scale)
        return (h // patch) * (w // patch)


NAMED: dict[str, tuple[tuple[int, int], ...]] = {
    # Constant area around 1024² (each a multiple of 16 = Z-Image's VAE factor 8 × patch 2), the sizes
    # Z-Image users generate: square, 9:7, 3:2 and 7:4 in both orientations.
    "zimage-1024": ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344)),
    "zimage-512": ((512, 512), (576, 448), (448, 576), (608, 416), (416, 608), (672, 384), (384, 672)),
    # The toy world (VAE factor 4 × patch 2 = 8): ≈ 64² pixels, 8×8, 10×6 and 6×10 tokens.
    "toy": ((64, 64), (80, 48), (48, 80)),
}

_ENTRY = re.compile(r"(\d+)x(\d+)(?::([0-9]*\.?[0-9]+))?")


def parse_buckets(spec: str, factor: int) -> list[Bucket]:
    """A named set or a comma-separated `WxH[:weight]` list, each side checked against `factor`."""
    spec = spec.strip()
    if not spec:
        raise BucketError("--buckets is empty: name a set (" + ", ".join(NAMED) + ") or list sizes as WxH,WxH")
    if spec in NAMED:
        buckets = [Bucket(w, h) for w, h in NAMED[spec]]
    else:
        buckets = []
        for entry in (e.strip() for e in spec.split(",")):
            m = _ENTRY.fullmatch(entry)
            if m is None:
                raise BucketError(f"--buckets: {entry!r} is neither a named set ({', '.join(NAMED)}) nor WxH[:weight] "
                                  "(e.g. 1024x1024 or 832x1216:2)")
            weight = float(m.group(3)) if m.group(3) else 1.0
            if weight <= 0:
                raise BucketError(f"--buckets: {entry!r} has weight {weight}; weights must be positive")
            buckets.append(Bucket(int(m.group(1)), int(m.group(2)), weight))
    check_buckets(buckets, factor)
    return buckets


def check_buckets(buckets: Sequence[Bucket], factor: int) -> None:
    if not buckets:
        raise BucketError("no buckets: give at least one size WxH")
    for b in buckets:
        bad = [side for side in (b.width, b.height) if side < factor or side % factor]
        if bad:
            raise BucketError(f"bucket {b.name}: {bad[0]} is not a positive multiple of {factor} (the VAE factor × 2); "
                              f"nearest: {_nearest(b.width, factor)}x{_nearest(b.height, factor)}")
    names = [b.name for b in buckets]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise BucketError(f"bucket {twice} is listed twice")


def _nearest(side: int, factor: int) -> int:
    return max(factor, round(side / factor) * factor)


def square(resolution: int) -> list[Bucket]:
    """`--resolution N`: one square bucket (the single-resolution data of format version 1)."""
    return [Bucket(resolution, resolution)]


def assign(buckets: Sequence[Bucket], n: int, seed: int) -> np.ndarray:
    """The seeded draw: a bucket index for each of n prompts, in proportion to the weights."""
    if len(buckets) == 1:
        return np.zeros(n, np.int64)
    cdf = np.cumsum([b.weight for b in buckets], dtype=np.float64)
    u = np.random.default_rng([seed, 0x6275636B]).random(n) * cdf[-1]  # "buck": a stream of its own
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(buckets) - 1).astype(np.int64)


def index_of(buckets: Sequence[Bucket], width: int, height: int) -> int | None:
    for k, b in enumerate(buckets):
        if (b.width, b.height) == (width, height):
            return k
    return None


def to_json(buckets: Sequence[Bucket]) -> list[dict]:
    return [{"name": b.name, "width": b.width, "height": b.height, "weight": b.weight} for b in buckets]


def from_json(entries: Sequence[dict]) -> list[Bucket]:
    return [Bucket(int(e["width"]), int(e["height"]), float(e.get("weight", 1.0))) for e in entries]
