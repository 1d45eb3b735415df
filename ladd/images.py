"""Images: uint8 conversion, the one tiling (validation, evaluation, the toy world, the demo, benchmarks)
and the one PNG encoder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ladd import files


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8."""
    return (images.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)


def tile(images: np.ndarray, cols: int = 8, pad: int = 2, upscale: int = 1) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images row-major into one picture with white gutters, nearest-upscaled."""
    n, h, w, _ = images.shape
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return grid.repeat(upscale, 0).repeat(upscale, 1) if upscale > 1 else grid


def png_bytes(picture: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes: the one PNG encoder of ladd."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def write_png(picture: np.ndarray, path: str | Path) -> None:
    """A PNG file, written atomically (ladd/files.py), its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, png_bytes(picture))
