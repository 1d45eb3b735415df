"""Precompute throughput on multi-bucket data against single-bucket data, at equal image tokens.

Runs `ladd precompute` on the same prompts twice per round — once as one square bucket, once over a
bucket family — alternating the order each round, and reports image tokens per second of each and their
ratio (multi / single; 1.00 = no cost for buckets). Each shard holds one bucket, so the costs expected
are the last, partly filled shard of each bucket, batches that are not full, and the transformer's
padding of each image's tokens to a multiple of 32 (diffusers' SEQ_MULTI_OF): the toy's 80x48 has 60
image tokens, computed as 64 — 6 % of the toy's work, 0.4 % at most in zimage-1024 (3952 -> 3968).
Both ratios are printed: by real image tokens, and by the tokens the transformer computes.

    python bench/precompute_buckets.py --pipeline toy --n 96 --steps 10 --rounds 2
    python bench/precompute_buckets.py --pipeline /models/Z-Image --square 1024 --buckets zimage-1024 --n 64

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ladd.data.buckets import parse_buckets
from ladd.data.precompute import PrecomputeConfig, run_precompute
from ladd.data.shards import read_manifest
from ladd.models.loading import vae_factor


def tokens_of(out: Path, padded: bool = False) -> int:
    """Image tokens of every sample in a precompute folder (patch 2); `padded`: rounded up to 32 each."""
    m = read_manifest(out)
    per = [(b["latent_shape"][1] // 2) * (b["latent_shape"][2] // 2) for b in m["buckets"]]
    return sum(b["count"] * (-(-t // 32) * 32 if padded else t) for b, t in zip(m["buckets"], per))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="toy")
    ap.add_argument("--square", type=int, default=64, help="the single bucket's side")
    ap.add_argument("--buckets", default="toy", help="the multi-bucket family")
    ap.add_argument("--n", type=int, default=96, help="prompts per run")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    factor = vae_factor(args.pipeline)[1]
    parse_buckets(args.buckets, factor)  # a bad spec fails before any work
    words = ["red", "blue", "green", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    prompts = [f"a {words[i % 6]} {shapes[i // 6 % 3]} on a {words[(i + 3) % 6]} background" for i in range(args.n)]
    rates: dict[str, list[float]] = {"single": [], "multi": []}
    computed: dict[str, list[float]] = {"single": [], "multi": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "p.txt").write_text("\n".join(prompts) + "\n")
        for r in range(args.rounds):
            order = ("single", "multi") if r % 2 == 0 else ("multi", "single")
            for kind in order:
                out = tmp / f"{kind}-{r}"
                cfg = PrecomputeConfig(pipeline=args.pipeline, prompts=str(tmp / "p.txt"), out=str(out),
                                       steps=args.steps, batch_size=args.batch_size, shard_size=args.shard_size,
                                       **({"resolution": args.square} if kind == "single" else {"buckets": args.buckets}))
                t0 = time.perf_counter()
                run_precompute(cfg)
                seconds = time.perf_counter() - t0
                rates[kind].append(tokens_of(out) / seconds)
                computed[kind].append(tokens_of(out, padded=True) / seconds)
    single, multi = max(rates["single"]), max(rates["multi"])  # best of the rounds: the least disturbed
    print(json.dumps({"pipeline": args.pipeline, "n": args.n, "steps": args.steps, "square": args.square,
                      "buckets": args.buckets, "tokens_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                      "ratio_multi_over_single": round(multi / single, 3),
                      "ratio_computed_tokens": round(max(computed["multi"]) / max(computed["single"]), 3)}))


if __name__ == "__main__":
    main()
