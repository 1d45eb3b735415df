"""`ladd demo --jobs`: the same training runs one after another in this process (every core as torch
threads) against `jobs` at once in spawned processes (cores // jobs threads each): wall seconds and
their ratio, measured in one run. The toy model's step is launch-bound (batch 8, dim 128): a second
thread adds little to one run, a second process a whole run.

    python bench/demo_jobs.py --data runs/demo/data/train          # 2 runs of 100 steps, configs/toy.toml
    python bench/demo_jobs.py --data runs/demo/data/train --runs 4 --steps 60 --jobs 2
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ladd.demo import cores, train_runs


def runs(root: Path, args) -> list[tuple[Path, str, list[str]]]:
    return [(root / f"seed-{seed}", args.config,
             [f'data.path="{args.data}"', f'train.out="{root / f"seed-{seed}"}"', f"train.seed={seed}",
              f"data.seed={seed}", f"train.steps={args.steps}"]) for seed in range(args.runs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a demo's train data (ladd demo writes runs/demo/data/train)")
    ap.add_argument("--config", default="configs/toy.toml")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=None, help="default: one per core")
    args = ap.parse_args()
    jobs = min(args.jobs or cores(), args.runs)
    root = Path(tempfile.mkdtemp(prefix="demo-jobs-"))
    try:
        seconds = {}
        for name, n in (("one after another", 1), (f"{jobs} at once", jobs)):
            start = time.perf_counter()
            train_runs(runs(root / str(n), args), n)
            seconds[name] = time.perf_counter() - start
    finally:
        shutil.rmtree(root)
    print(f"\n{args.runs} runs of {args.steps} steps ({args.config}), {cores()} cores")
    print(f"{'':>20}  {'seconds':>8}  {'runs/min':>8}")
    for name, s in seconds.items():
        print(f"{name:>20}  {s:8.1f}  {60 * args.runs / s:8.2f}")
    one, many = seconds.values()
    print(f"speed-up {one / many:.2f}x")


if __name__ == "__main__":
    main()
