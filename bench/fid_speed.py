"""`ladd.eval.kid.fid_score` against torchmetrics' FrechetInceptionDistance on the same features: the
seconds of one FID (Inception's D = 2048) and the two numbers, at the demo's eval-set size (192 a
side: the trace term from a 192 × 192 nuclear norm) and at a large one (D × D square roots). Measured
round-robin in one run; the ratio is what to read.

    python bench/fid_speed.py                     # n 192 and 4096, D 2048, best of 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ladd_cycle import time_interleaved  # noqa: E402

from ladd.eval.kid import Precomputed, fid_score  # noqa: E402


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[192, 4096], help="images a side")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(args.dim, args.dim, generator=g, dtype=torch.float64) / args.dim ** 0.5
    print(f"D {args.dim}, {args.threads} threads, best of {args.repeats}")
    for n in args.sizes:
        real = (torch.randn(n, args.dim, generator=g, dtype=torch.float64) @ mix).relu()  # Inception pools are ≥ 0
        fake = (0.9 * torch.randn(n, args.dim, generator=g, dtype=torch.float64) @ mix + 0.05).relu()
        values = {"torchmetrics": torchmetrics_fid(real, fake), "ladd": fid_score(real, fake)}
        best = time_interleaved({"torchmetrics": lambda: torchmetrics_fid(real, fake),
                                 "ladd": lambda: fid_score(real, fake)}, args.repeats)
        print(f"n {n}: torchmetrics {best['torchmetrics']:.2f} s, ladd {best['ladd']:.3f} s, "
              f"{best['torchmetrics'] / best['ladd']:.1f}x faster; FID {values['torchmetrics']:.6f} vs "
              f"{values['ladd']:.6f} (relative difference {abs(values['ladd'] / values['torchmetrics'] - 1):.1e})")


if __name__ == "__main__":
    main()
