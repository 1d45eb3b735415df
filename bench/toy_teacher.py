"""How good is the toy teacher, and how much do few steps lose? (the toy-world issue's targets)

Samples held-out eval prompts with the teacher at 50 steps + CFG 5 and unguided at 1, 2 and 4 steps,
decodes them, and measures caption accuracy (ladd.toy.fidelity) and KID (Inception features,
ladd.eval) against the 50-step samples — next to the KID between two 50-step sets drawn
with different seeds (the noise floor). Prints one JSON line and writes image grids.

    python bench/toy_teacher.py --pipeline ladd/toy/assets/toy-zimage --n 256 --grid docs/img
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ladd.flow import image_seq_len, teacher_sigmas
from ladd.images import tile, to_uint8, write_png
from ladd.models.loading import load_pipeline
from ladd.models.text import encode_prompts
from ladd.toy import world
from ladd.toy.build import pipeline_world
from ladd.toy.fidelity import caption_accuracy
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import decode, euler_sample, initial_noise


def sample_images(pipe, adapter, prompts, seeds, steps, guidance, batch=64) -> np.ndarray:
    res = pipe.vae.config.sample_size
    out = []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i : i + batch], seeds[i : i + batch]
        caps = encode_prompts(pipe, p)
        neg = encode_prompts(pipe, [""] * len(p)) if guidance > 0 else None
        noise = initial_noise(pipe, s, res)
        sig = teacher_sigmas(pipe.scheduler, steps, image_seq_len(*noise.shape[-2:]))
        lat = euler_sample(adapter, noise, sig, caps, neg, guidance=guidance)
        out.append(to_uint8(decode(pipe, lat)))
    return np.concatenate(out)


def kid_vs(reference: np.ndarray, sets: dict[str, np.ndarray], features: str) -> dict[str, dict]:
    """KID (Inception features, 50 subsets of 100) of each set against the reference set."""
    from ladd.eval.features import build_extractor, extract_features
    from ladd.eval.kid import kid_score

    extractor = build_extractor(features)
    ref = extract_features(extractor, reference)
    return {name: kid_score(ref, extract_features(extractor, imgs)) for name, imgs in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="toy")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--grid", default=None, help="folder for PNG grids")
    ap.add_argument("--features", default="inception", help="KID features: inception | random-conv")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline(args.pipeline)
    adapter = ZImageAdapter(pipe.transformer)
    # Eval prompts from the same world the teacher was built on (build.json records its knobs).
    prompts = world.prompts(args.n, "eval", seed=123, **pipeline_world(args.pipeline))
    seeds = list(range(args.n))
    result: dict = {"n": args.n}
    sets = {}
    for name, steps, guidance, seed_offset in (
        ("teacher50_cfg", 50, args.guidance, 0),
        ("teacher50_cfg_reseeded", 50, args.guidance, 10_000),
        ("unguided4", 4, 0.0, 0),
        ("unguided2", 2, 0.0, 0),
        ("unguided1", 1, 0.0, 0),
        ("cfg4", 4, args.guidance, 0),
    ):
        t0 = time.perf_counter()
        imgs = sample_images(pipe, adapter, prompts, [s + seed_offset for s in seeds], steps, guidance)
        sets[name] = imgs
        acc = caption_accuracy(imgs, prompts)
        result[name] = {k: round(v, 4) for k, v in acc.items()} | {"seconds": round(time.perf_counter() - t0, 1)}
        if args.grid:
            write_png(tile(imgs[:32], cols=8, upscale=2), Path(args.grid) / f"toy-teacher-{name}.png")
    others = {k: v for k, v in sets.items() if k != "teacher50_cfg"}
    for name, k in kid_vs(sets["teacher50_cfg"], others, args.features).items():
        result[name]["kid_vs_teacher50"] = {"mean": round(k["mean"], 5), "std": round(k["std"], 5)}
    floor = result["teacher50_cfg_reseeded"]["kid_vs_teacher50"]["mean"]
    result["kid_gap_unguided4_over_floor"] = round(result["unguided4"]["kid_vs_teacher50"]["mean"] - floor, 5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
