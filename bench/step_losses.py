"""Where a few-step student loses quality, step by step, at fresh noise.

For each of the student's timesteps t_k, the images come from the teacher's own path (its steps and
CFG, as the data was made) down to t_k, then the student's remaining Euler steps from there to 0. The
first row is the student alone, the last the teacher alone. The difference between neighbouring rows
is what the student's step at t_k costs, given the student's steps after it; the costs add up to the
whole difference between student and teacher. KID against the data's references (and caption accuracy
when the teacher folder declares a scorer, as the toy teacher does), at each eval seed (fresh noise:
reference seed + s·1e6, as `ladd eval --seeds`), then the mean over seeds.

    python bench/step_losses.py --student runs/demo/runs/seed-0 --data runs/demo/data/eval --seeds 1 2 3

Prints a table and one JSON line. The teacher runs its whole path once per eval seed; each row adds
the student's remaining steps from its start.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ladd.eval.captions import scorer_for
from ladd.eval.commands import SEED_STRIDE
from ladd.eval.features import build_extractor, extract_features
from ladd.eval.kid import kid_score, load_references, reference_features
from ladd.eval.samplers import default_device, dtype_for, run_sampler, run_teacher_dir, teacher_sampler
from ladd.models.loading import load_pipeline
from ladd.models.text import encode_prompts
from ladd.sampling import euler_sample, initial_noise


@torch.no_grad()
def suffix_latents(teacher, student, prompts: list[str], seeds: list[int], size, batch_size: int) -> list[torch.Tensor]:
    """Latents per row: row k = the teacher's path to the student's t_k, then the student's steps to 0
    (k = 0 is the student alone); the last row is the teacher's own sample."""
    pipe = teacher.pipe
    device, dtype = pipe.transformer.device, teacher.adapter.dtype
    neg = encode_prompts(pipe, [teacher.negative_prompt], device=device)[0].to(dtype)
    rows: list[list[torch.Tensor]] | None = None
    for i in range(0, len(prompts), batch_size):
        caps = [c.to(dtype) for c in encode_prompts(pipe, prompts[i : i + batch_size], device=device)]
        noise = initial_noise(pipe, seeds[i : i + batch_size], size).to(device)
        hw = tuple(noise.shape[-2:])
        t_sig, s_sig = teacher.sigmas_at(hw).to(device), student.sigmas_at(hw).to(device)
        x0, states = euler_sample(teacher.adapter, noise, t_sig, caps, [neg] * len(caps), teacher.guidance,
                                  record=s_sig[1:-1].tolist())
        starts = [noise.float(), *states.unbind(1)]
        out = [euler_sample(student.adapter, x, s_sig[k:], caps) for k, x in enumerate(starts)] + [x0]
        rows = [[] for _ in out] if rows is None else rows
        for r, x in zip(rows, out):
            r.append(x.cpu())
    return [torch.cat(r) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="a training run folder or one of its checkpoints")
    ap.add_argument("--data", required=True, help="a `ladd precompute` folder of held-out prompts (the references)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1], help="eval seeds, each >= 1 (fresh noise)")
    ap.add_argument("--ema", action="store_true", help="the run's EMA weights")
    ap.add_argument("--limit", type=int, default=None, help="the first N references only")
    ap.add_argument("--features", default="inception")
    ap.add_argument("--subsets", type=int, default=20)
    ap.add_argument("--subset-size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    if min(args.seeds) < 1 or len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds must be distinct integers >= 1 (fresh noise), got {args.seeds}")

    device = torch.device(args.device) if args.device else default_device()
    teacher_dir = run_teacher_dir(args.student)
    pipe = load_pipeline(teacher_dir, device, dtype_for("auto", device))
    refs = load_references(args.data, pipe, args.limit)
    sampling = refs.manifest["sampling"]
    teacher = teacher_sampler(pipe, sampling["steps"], sampling["guidance"], sampling.get("negative_prompt", ""))
    student = run_sampler(pipe, args.student, ema=args.ema)
    ts = student.info["timesteps"]
    labels = [f"teacher to {t:g}, student after" if k else "student alone" for k, t in enumerate(ts)] + ["teacher alone"]
    extractor = build_extractor(args.features, device)
    real = torch.cat(reference_features(refs, extractor, args.batch))
    size = min(args.subset_size, len(refs))
    captions = scorer_for(teacher_dir)

    kids = np.zeros((len(labels), len(args.seeds)))
    caps = np.full((len(labels), len(args.seeds)), np.nan)
    for j, s in enumerate(args.seeds):
        fakes: list[list[torch.Tensor]] = [[] for _ in labels]
        images: list[list[tuple[np.ndarray, list[str]]]] = [[] for _ in labels]
        for g in refs.groups:
            prompts = [refs.prompts[i] for i in g.indices]
            seeds = [refs.seeds[i] + s * SEED_STRIDE for i in g.indices]
            for r, lat in enumerate(suffix_latents(teacher, student, prompts, seeds, g.bucket.size, args.batch)):
                im = teacher.images(lat, args.batch)
                fakes[r].append(extract_features(extractor, im, args.batch))
                images[r].append((im, prompts))
        for r in range(len(labels)):
            kids[r, j] = kid_score(real, torch.cat(fakes[r]), args.subsets, size, seed=s)["mean"]
            if captions is not None:
                n = sum(len(p) for _, p in images[r])
                caps[r, j] = sum(captions(im, p)["all"] * len(p) for im, p in images[r]) / n
        print(f"eval seed {s}: KID " + " ".join(f"{k:.5f}" for k in kids[:, j]), flush=True)

    kid, cap = kids.mean(1), caps.mean(1)
    print(f"{student.label}, {len(refs)} references, eval seeds {args.seeds}")
    print(f"{'row':<36} {'KID':>9} {'step cost':>10} {'captions':>9}")
    for r, label in enumerate(labels):
        cost = f"{kid[r] - kid[r + 1]:+.5f}" if r < len(ts) else ""
        c = "" if np.isnan(cap[r]) else f"{cap[r]:.3f}"
        print(f"{label:<36} {kid[r]:>9.5f} {cost:>10} {c:>9}")
    print(json.dumps({"student": str(args.student), "timesteps": ts, "seeds": args.seeds, "n": len(refs),
                      "rows": [{"label": label, "kid": float(kid[r]), "kid_per_seed": kids[r].tolist(),
                                "caption_accuracy": None if np.isnan(cap[r]) else float(cap[r]),
                                "step_cost": float(kid[r] - kid[r + 1]) if r < len(ts) else None}
                               for r, label in enumerate(labels)]}))


if __name__ == "__main__":
    main()
