"""What `method.adversarial_timesteps` / `score_timesteps` "last" save: one LADD step of configs/toy.toml's
method, timed with both terms on "last" (the teacher's graph and its guided pass run on the last
step's rows only) and on "all" (both passes on every row: what "last" cost before it skipped the rest).
Same models, same batch, measured round-robin in one run.

    python bench/last_step_terms.py                # toy dims (dim 128, 6 layers, 16×16 latents), batch 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ladd_cycle import setup, time_interleaved  # noqa: E402

from ladd.config import load_config  # noqa: E402
from ladd.train.loop import build_optimizer  # noqa: E402
from ladd.train.step import Batch, ladd_step, trainable  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--draws", type=int, default=16, help="steps per timing, each with its own random draws")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config("configs/toy.toml").method
    models, b = setup("toy", args.batch)
    g = torch.Generator().manual_seed(0)
    K = len(base.student_timesteps) - 1
    batch = Batch(b.x0, b.cap_feats, b.text_cond, torch.randn(b.x0.shape, generator=g), torch.randn(8, 64, generator=g),
                  torch.randn(len(b), K, *b.x0.shape[1:], generator=g))
    opt_g = build_optimizer(trainable(models.student), 1e-9, (0.9, 0.999), 0.0)
    opt_d = build_optimizer(trainable(models.disc), 1e-9, (0.9, 0.999), 0.0)
    cfgs = {which: dataclasses.replace(base, adversarial_timesteps=which, score_timesteps=which) for which in ("all", "last")}

    def steps(which: str) -> None:  # the same `draws` steps each time: the same rows at the last timestep
        for seed in range(args.draws):
            ladd_step(models, opt_g, opt_d, [batch], 0, cfgs[which], torch.Generator().manual_seed(seed))

    best = time_interleaved({which: (lambda w=which: steps(w)) for which in cfgs}, args.repeats)
    print(json.dumps({"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "draws": args.draws,
                      "all_over_last": round(best["all"] / best["last"], 3),
                      "step_s": {k: round(v / args.draws, 4) for k, v in best.items()}}), flush=True)


if __name__ == "__main__":
    main()
