"""FID-Inception features on the CPU: channels_last input against the default (contiguous) layout.

Every eval row of `ladd demo` spends most of its time here (64 px images resized to 299). Prints one
JSON line: seconds per image for each layout, their ratio, and the largest feature difference.

    python bench/inception_speed.py [--n 128] [--batch 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ladd.eval.features import InceptionV3Features, tf1_bilinear


def features(net, images: torch.Tensor, batch: int, channels_last: bool) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = tf1_bilinear(images[i : i + batch].float(), (299, 299)) / 128.0 - 1.0
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(net(x).float())
    return torch.cat(out)


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    net = InceptionV3Features().net
    images = torch.randint(0, 256, (args.n, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t_default, ref = best_time(lambda: features(net, images, args.batch, False), args.repeats)
    t_last, last = best_time(lambda: features(net, images, args.batch, True), args.repeats)
    print(json.dumps({
        "images": args.n, "threads": torch.get_num_threads(),
        "s_per_image_default": round(t_default / args.n, 4), "s_per_image_channels_last": round(t_last / args.n, 4),
        "speedup": round(t_default / t_last, 3), "max_abs_feature_diff": float((last - ref).abs().max()),
    }))


if __name__ == "__main__":
    main()
