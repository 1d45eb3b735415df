"""Caption scores: how well images show their prompts, by a scorer the teacher's world names.

A teacher folder may carry `ladd_world.json`, naming its world and that world's caption scorer as an
import path, `{"world": "toy", "caption_scorer": "ladd.toy.fidelity:score_captions"}`. The scorer is
`score(images, prompts) -> {metric: fraction} | None` over uint8 (N, H, W, 3) images; None means "these
prompts are not of my world" (then no caption row is reported). Evaluation never imports a world
itself: the shipped toy teacher declares the toy world's scorer; a folder without the file (the real
Z-Image) has none, and `ladd eval` reports KID alone. A user's own world (a VLM judge, say) plugs in
by writing the file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ladd.models.loading import WORLD_FILE, read_world

CaptionScorer = Callable[[np.ndarray, list[str]], "dict[str, float] | None"]


def scorer_for(pipeline_dir: str | Path) -> CaptionScorer | None:
    """The caption scorer declared by a teacher folder's `ladd_world.json`, or None if it declares none."""
    world = read_world(pipeline_dir)
    if world is None or not world.get("caption_scorer"):
        return None
    module, _, name = str(world["caption_scorer"]).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{Path(pipeline_dir) / WORLD_FILE}: caption_scorer {world['caption_scorer']!r} is not "
                         f"an importable 'module:function' ({e})") from None
