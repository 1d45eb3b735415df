"""How good is the toy teacher, and how much do few steps lose? (the toy-world issue's targets)

Samples held-out eval prompts with the teacher at 50 steps + CFG 5 and unguided at 1, 2 and 4 steps,
decodes them, and measures caption accuracy (ladd.toy.fidelity) and KID (Inception features,
ladd.eval) against the 50-step samples — next to the KID between two 50-step sets drawn
with different seeds (the noise floor). All of it per aspect-ratio bucket (default: the sizes the
pipeline was built at, its build.json), with the same prompts and seeds in every bucket.
Prints one JSON line and writes image grids.

`--convergence N` adds how far 50 and 100 Euler steps are from 200 (same noise, N prompts, CFG 5 and
CFG 1): RMS(latent_k − latent_200) / std(latent_200), per bucket. A teacher whose 50-step samples
are not converged is a moving reference for a distilled student.

    python bench/toy_teacher.py --pipeline ladd/toy/assets/toy-zimage --n 256 --grid docs/img
    python bench/toy_teacher.py --n 8 --convergence 4 --threads 1     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ladd.data.buckets import Bucket, parse_buckets
from ladd.flow import image_seq_len, teacher_sigmas
from ladd.images import tile, to_uint8, write_png
from ladd.models.loading import load_pipeline
from ladd.models.text import encode_prompts
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import decode, euler_sample, seeded_noise
from ladd.toy import world
from ladd.toy.build import pipeline_buckets, pipeline_world
from ladd.toy.fidelity import caption_accuracy


def sample_latents(pipe, adapter, prompts, seeds, steps, guidance, bucket: Bucket, batch=64) -> torch.Tensor:
    """Euler latents at the bucket's size; the noise is what ZImagePipeline draws per seed at that size."""
    shape = bucket.latent_shape(pipe.transformer.config.in_channels, pipe.vae_scale_factor)
    out = []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i : i + batch], seeds[i : i + batch]
        caps = encode_prompts(pipe, p)
        neg = encode_prompts(pipe, [""] * len(p)) if guidance > 0 else None
        noise = seeded_noise(s, shape)
        sig = teacher_sigmas(pipe.scheduler, steps, image_seq_len(*noise.shape[-2:]))
        out.append(euler_sample(adapter, noise, sig, caps, neg, guidance=guidance))
    return torch.cat(out)


def sample_images(pipe, adapter, prompts, seeds, steps, guidance, bucket: Bucket, batch=64) -> np.ndarray:
    lat = sample_latents(pipe, adapter, prompts, seeds, steps, guidance, bucket, batch)
    return np.concatenate([to_uint8(decode(pipe, lat[i : i + batch])) for i in range(0, len(lat), batch)])


def kid_vs(reference: np.ndarray, sets: dict[str, np.ndarray], features: str) -> dict[str, dict]:
    """KID (Inception features, 50 subsets of 100) of each set against the reference set."""
    from ladd.eval.features import build_extractor, extract_features
    from ladd.eval.kid import kid_score

    extractor = build_extractor(features)
    ref = extract_features(extractor, reference)
    return {name: kid_score(ref, extract_features(extractor, imgs)) for name, imgs in sets.items()}


def quality(pipe, adapter, prompts, bucket: Bucket, guidance: float, features: str, grid: str | None) -> dict:
    """Caption accuracy of each sampling row, KID against the 50-step CFG set, and the 4-step loss."""
    seeds = list(range(len(prompts)))
    result: dict = {}
    sets = {}
    for name, steps, g, seed_offset in (
        ("teacher50_cfg", 50, guidance, 0),
        ("teacher50_cfg_reseeded", 50, guidance, 10_000),
        ("unguided4", 4, 0.0, 0),
        ("unguided2", 2, 0.0, 0),
        ("unguided1", 1, 0.0, 0),
        ("cfg4", 4, guidance, 0),
    ):
        t0 = time.perf_counter()
        imgs = sample_images(pipe, adapter, prompts, [s + seed_offset for s in seeds], steps, g, bucket)
        sets[name] = imgs
        acc = caption_accuracy(imgs, prompts)
        result[name] = {k: round(v, 4) for k, v in acc.items()} | {"seconds": round(time.perf_counter() - t0, 1)}
        if grid:
            # the square default keeps the grid names docs/toy-world.md shows
            suffix = "" if bucket.width == bucket.height == pipe.vae.config.sample_size else f"-{bucket.name}"
            write_png(tile(imgs[:32], cols=8, upscale=2), Path(grid) / f"toy-teacher-{name}{suffix}.png")
    others = {k: v for k, v in sets.items() if k != "teacher50_cfg"}
    for name, k in kid_vs(sets["teacher50_cfg"], others, features).items():
        result[name]["kid_vs_teacher50"] = {"mean": round(k["mean"], 5), "std": round(k["std"], 5)}
    floor = result["teacher50_cfg_reseeded"]["kid_vs_teacher50"]["mean"]
    result["kid_gap_unguided4_over_floor"] = round(result["unguided4"]["kid_vs_teacher50"]["mean"] - floor, 5)
    # what 4 unguided steps lose against the 50-step CFG teacher, in caption-accuracy points
    result["degradation_4step"] = {k: round(result["teacher50_cfg"][k] - result["unguided4"][k], 4)
                                   for k in ("all", "colours", "shapes", "patterns")}
    return result


def convergence(pipe, adapter, prompts, bucket: Bucket, guidances=(5.0, 1.0)) -> dict:
    """RMS distance of 50- and 100-step Euler latents from 200-step ones (same noise), over the latent std."""
    seeds = list(range(len(prompts)))
    out = {}
    for g in guidances:
        t0 = time.perf_counter()
        lat = {steps: sample_latents(pipe, adapter, prompts, seeds, steps, g, bucket) for steps in (50, 100, 200)}
        std = lat[200].std().item()
        row = {}
        for k in (50, 100):
            per_prompt = (lat[k] - lat[200]).pow(2).flatten(1).mean(1)  # mean square per prompt
            row[f"{k}_vs_200"] = round(per_prompt.mean().sqrt().item() / std, 4)
            row[f"{k}_vs_200_worst"] = round(per_prompt.max().sqrt().item() / std, 4)  # a prompt off its path
        out[f"cfg{g:g}"] = row | {"latent_std_200": round(std, 4), "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="toy")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--buckets", default=None,
                    help="sizes to sample at: 'toy' or WxH,WxH (default: the pipeline's, from its build.json)")
    ap.add_argument("--convergence", type=int, default=0, metavar="N",
                    help="also measure 50/100 vs 200 Euler steps on N prompts (CFG --guidance and 1)")
    ap.add_argument("--grid", default=None, help="folder for PNG grids")
    ap.add_argument("--features", default="inception", help="KID features: inception | random-conv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline)
    adapter = ZImageAdapter(pipe.transformer)
    factor = pipe.vae_scale_factor * 2
    if args.buckets is None:
        buckets = [Bucket(w, h) for w, h in pipeline_buckets(args.pipeline)]
    else:
        buckets = parse_buckets(args.buckets, factor)
    # Eval prompts from the same world the teacher was built on (build.json records its knobs);
    # captions do not depend on the frame, so every bucket gets the same prompts and seeds.
    prompts = world.prompts(max(args.n, args.convergence), "eval", seed=123, **pipeline_world(args.pipeline))
    result: dict = {"n": args.n, "buckets": [b.name for b in buckets]}
    for bucket in buckets:
        result[bucket.name] = quality(pipe, adapter, prompts[: args.n], bucket, args.guidance, args.features,
                                      args.grid)
        if args.convergence:
            result[bucket.name]["convergence"] = convergence(pipe, adapter, prompts[: args.convergence], bucket,
                                                             (args.guidance, 1.0))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
