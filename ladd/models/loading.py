"""Finding and loading ZImagePipeline folders; "toy" names the embedded toy teacher."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

# The embedded toy teacher ships inside the package (ladd/toy/assets/toy-zimage, package data), so an
# installed wheel has it too; found through importlib.resources, never through the source tree's layout.
TOY_PIPELINE = Path(str(resources.files("ladd"))) / "toy" / "assets" / "toy-zimage"


WORLD_FILE = "ladd_world.json"  # a teacher folder's world and its caption scorer (ladd/eval/captions.py)


class PipelineError(ValueError):
    """A pipeline folder that cannot be used, in one line."""


def resolve_pipeline(name: str | Path) -> Path:
    """'toy' -> the committed toy teacher; anything else is a folder path. Checked, not loaded."""
    path = TOY_PIPELINE if str(name) == "toy" else Path(name)
    if str(name) == "toy" and not path.is_dir():
        raise PipelineError(f"the toy teacher is missing at {path}; rebuild it with `ladd toy build --out {path}`")
    check_pipeline_folder(path)
    return path


def vae_factor(pipeline: str | Path) -> tuple[int, int]:
    """(VAE downsampling factor, the pixel multiple every image side must be: that factor × the
    transformer's 2×2 patches), from the pipeline's vae/config.json."""
    vae = json.loads((resolve_pipeline(pipeline) / "vae" / "config.json").read_text())
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    return scale, scale * 2


def check_pipeline_folder(path: str | Path) -> dict:
    """The folder's model_index.json, or one line saying why this is not a ZImagePipeline folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise PipelineError(f"pipeline {path}: no such folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise PipelineError(f"pipeline {path}: no model_index.json (not a diffusers pipeline folder)")
    model_index = json.loads(index.read_text())
    if model_index.get("_class_name") != "ZImagePipeline":
        raise PipelineError(f"pipeline {path}: a {model_index.get('_class_name')}, not a ZImagePipeline")
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise PipelineError(f"pipeline {path}: ZImagePipeline folder without its {part}/")
    return model_index


def load_pipeline(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """ZImagePipeline.from_pretrained, offline-safe, frozen, on `device`, progress bars off."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(resolve_pipeline(path)), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe.to(device)


def read_world(pipeline_dir: str | Path) -> dict | None:
    """A teacher folder's world declaration (`ladd_world.json`), or None if it has none."""
    path = Path(pipeline_dir) / WORLD_FILE
    if not path.is_file():
        return None
    try:
        world = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(world, dict):
        raise PipelineError(f"{path}: expected a JSON object like {{\"world\": \"toy\", \"caption_scorer\": ...}}")
    return world


def write_world(pipeline_dir: str | Path, world: str, caption_scorer: str | None) -> None:
    """Declare a teacher folder's world and its caption scorer ('module:function'; `ladd toy build` does)."""
    text = json.dumps({"world": world, "caption_scorer": caption_scorer}, indent=1) + "\n"
    (Path(pipeline_dir) / WORLD_FILE).write_text(text)
