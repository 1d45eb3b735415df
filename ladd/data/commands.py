"""`ladd precompute` and `ladd data check` on the command line: arguments in, one error line out.

The job itself is `ladd/data/precompute.py`; the format and its checks are `ladd/data/shards.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ladd.data import shards as fmt
from ladd.data.precompute import DTYPES, PrecomputeConfig, PrecomputeError, Refused, run_precompute
from ladd.models.loading import PipelineError


def add_parser(sub) -> None:
    p = sub.add_parser("precompute", help="teacher latents and conditioning, sharded and resumable",
                       description="Teacher latents (ZImagePipeline-exact) and conditioning, sharded, resumable.")
    p.add_argument("--pipeline", required=True, help="a diffusers ZImagePipeline folder, or 'toy'")
    p.add_argument("--prompts", required=True, help=".txt (one per line), .jsonl/.csv/.parquet (field 'prompt')")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--resolution", type=int, default=None,
                   help="one square size in pixels (default 512, or the VAE's sample_size when smaller)")
    p.add_argument("--buckets", default=None, metavar="SPEC",
                   help="aspect-ratio buckets: zimage-1024, zimage-512, toy, or WxH[:weight],... (width x height); "
                        "prompts without their own width/height get a seeded draw")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward; never changes the output")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="storage of latents and cap_feats")
    p.add_argument("--decode-first", type=int, default=0, metavar="K", help="also write the first K images as PNG")
    p.add_argument("--clip", default=None, metavar="DIR", help="CLIPTextModelWithProjection folder: store text_embeds")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--trajectory", default="", metavar="SIGMAS",
                   help="also store each sample's state on the teacher's path at these σ, e.g. 0.9,0.75,0.5 "
                        "(method.paired_target = 'trajectory' needs the student's timesteps after the first)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (GPU speed; latents equal within float tolerance)")
    p.set_defaults(func=cmd_precompute)

    data = sub.add_parser("data", help="check a precomputed dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="<data command>")
    check = data_sub.add_parser("check", help="checksums, shapes, counts and finite values of teacher data")
    check.add_argument("dir")
    check.set_defaults(func=cmd_data_check)


def cmd_precompute(args: argparse.Namespace) -> int:
    try:
        cfg = PrecomputeConfig(
            pipeline=args.pipeline, prompts=args.prompts, out=args.out, resolution=args.resolution,
            buckets=args.buckets,
            steps=args.steps, guidance=args.guidance, negative_prompt=args.negative_prompt, seed=args.seed,
            batch_size=args.batch_size, dtype=args.dtype, decode_first=args.decode_first, clip=args.clip,
            shard_size=args.shard_size, compile=args.compile, trajectory=_sigmas(args.trajectory),
        )
        run_precompute(cfg)
    except Refused:
        return 2
    except (PrecomputeError, PipelineError, fmt.DataError) as err:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank hits the same check; one says it
            print(f"ladd precompute: error: {err}", file=sys.stderr)
        return 2
    return 0


def _sigmas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise PrecomputeError(f"--trajectory {text!r}: give σ values separated by commas, e.g. 0.9,0.75,0.5") from None


def cmd_data_check(args: argparse.Namespace) -> int:
    problems = fmt.check_dataset(args.dir)
    for line in problems:
        print(f"ladd data check: {line}", file=sys.stderr)
    if any(line.startswith("shard-") for line in problems):
        print(f"to repair: rerun the `ladd precompute` command that made {args.dir} (same arguments); it "
              f"verifies the written shards and rewrites only the damaged or missing ones")
    if problems:
        return 1
    m = fmt.read_manifest(args.dir)
    where = fmt.layout(args.dir, m)
    total = sum(s["bytes"] for s in m["shards"])
    print(f"ok: {m['num_samples']} samples in {len(m['shards'])} shards ({total:,} bytes), "
          f"teacher {m['teacher']['fingerprint'][:19]}…, buckets "
          + ", ".join(f"{b.name} ×{n}" for b, n in zip(where.buckets, where.bucket_counts())))
    return 0
