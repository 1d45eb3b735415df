"""What the LADD disc can tell apart, and where its gradient sends the student (issue 20: why pure LADD stalls).

For one student (a run folder or checkpoint; "untrained" for the teacher's own weights):

1. Fakes are the student's one-step x̂0 at t = 1 from each sample's own teacher noise, reals the teacher
   latents x0 made from that noise. Both are re-noised to each level t̂ in --levels (fresh noise, two
   draws per sample) and run through the frozen teacher; the disc's taps are cached.
2. A fresh disc (the run's architecture) is trained on the training set's cached taps until its loss
   stops falling (--disc-steps), then scored on held-out prompts (--eval-data): accuracy per t̂ and per
   head. This is what a disc *can* see, with no game in the way.
3. The gradient the student would get: g = ∇_{x̂0} of the disc's logits (a hinge or non-saturating
   student loss moves x̂0 along +g), for the converged disc and for the run's own disc at its last
   checkpoint. Its cosine to d = x0 − x̂0 (towards the teacher's own sample from the same noise) says
   whether the signal points at the teacher; a random direction gives |cos| ≈ 1/√dim. Each head's share
   of the gradient norm says how the signal splits between layers.

    python bench/disc_probe.py --student runs/demo/runs/pure-ladd/seed-0 \\
        --data runs/demo/data/train --eval-data runs/demo/data/eval

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from ladd import losses
from ladd.config import load_config, to_dict
from ladd.data.shards import ShardDataset
from ladd.eval.samplers import find_checkpoint, student_transformer, student_weights
from ladd.flow import interpolate, x0_from_velocity
from ladd.models.discriminator import Discriminator
from ladd.models.loading import load_pipeline, resolve_pipeline
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import seeded_noise
from ladd.train.checkpoint import load_weights, read_config


def load_split(path: str, n: int) -> dict:
    data = ShardDataset(path, 0, 1, 0, batch_size=1)
    rows = [data[i] for i in range(min(n, len(data)))]
    x0 = torch.stack([r["latents"] for r in rows])
    return {"x0": x0, "caps": [r["cap_feats"] for r in rows], "pooled": torch.stack([r["pooled"] for r in rows]),
            "eps": seeded_noise([r["seed"] for r in rows], x0.shape[1:])}


@torch.no_grad()
def one_step(student: ZImageAdapter, split: dict, batch: int) -> torch.Tensor:
    """x̂0 = x_1 − v(x_1, 1): the student's first (and most trained) step from each sample's teacher noise."""
    out = []
    for a in range(0, len(split["x0"]), batch):
        eps, caps = split["eps"][a:a + batch], split["caps"][a:a + batch]
        t = torch.ones(len(eps))
        out.append(x0_from_velocity(eps, student(eps, t, caps).velocity, t))
    return torch.cat(out)


@torch.no_grad()
def cached_taps(teacher: ZImageAdapter, split: dict, fake: torch.Tensor, levels: list[float], layers: list[int],
                draws: int, batch: int, seed: int) -> list[dict]:
    """One entry per (draw, level): real and fake taps {layer: (N, D, h, w)}, t̂ (N,), text (N, dim)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    n = len(fake)
    for _ in range(draws):
        for level in levels:
            t_hat = torch.full((n,), level)
            both = {"real": split["x0"], "fake": fake}
            entry = {"level": level, "t_hat": t_hat, "text": split["pooled"]}
            for name, x in both.items():
                noisy = interpolate(x, torch.randn(x.shape, generator=g), t_hat)
                parts = [teacher(noisy[a:a + batch], t_hat[a:a + batch], split["caps"][a:a + batch], taps=layers,
                                 velocity=False).feats for a in range(0, n, batch)]
                entry[name] = {k: torch.cat([p[k] for p in parts]) for k in layers}
            out.append(entry)
    return out


def train_disc(disc: Discriminator, train: list[dict], steps: int, lr: float, batch: int, seed: int) -> list[float]:
    """Hinge on the cached taps (every head its own loss, as method.aggregate "mean_heads"), Adam."""
    opt = torch.optim.Adam(disc.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(train[0]["t_hat"])
    history = []
    for _ in range(steps):
        e = train[int(torch.randint(len(train), (1,), generator=g))]
        idx = torch.randint(n, (batch,), generator=g)
        real = disc({k: f[idx] for k, f in e["real"].items()}, e["t_hat"][idx], e["text"][idx])
        fake = disc({k: f[idx] for k, f in e["fake"].items()}, e["t_hat"][idx], e["text"][idx])
        loss = losses.d_loss(real, fake, "hinge", "mean_heads")
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


@torch.no_grad()
def accuracy(disc: Discriminator, held: list[dict], levels: list[float]) -> dict:
    """Per level: accuracy of the summed logit and of each head (real > 0, fake < 0), held-out prompts."""
    out = {}
    for level in levels:
        entries = [e for e in held if e["level"] == level]
        real = torch.cat([disc(e["real"], e["t_hat"], e["text"]) for e in entries])
        fake = torch.cat([disc(e["fake"], e["t_hat"], e["text"]) for e in entries])
        acc = lambda r, f: 0.5 * ((r > 0).float().mean() + (f < 0).float().mean()).item()  # noqa: E731
        out[level] = {"all": acc(real.sum(1), fake.sum(1)),
                      **{str(k): acc(real[:, j], fake[:, j]) for j, k in enumerate(disc.layers)}}
    return out


def gradient_alignment(disc: Discriminator, teacher: ZImageAdapter, split: dict, fake: torch.Tensor,
                       levels: list[float], n: int, seed: int) -> dict:
    """Per level: cos(∇_{x̂0} logit, x0 − x̂0) per sample (mean and std), for the summed logit and each
    head, and each head's share of the summed squared gradient norms."""
    g = torch.Generator().manual_seed(seed)
    x0, x_hat = split["x0"][:n], fake[:n]
    d = (x0 - x_hat).flatten(1)
    out = {}
    for level in levels:
        t_hat = torch.full((n,), level)
        noise = torch.randn(x_hat.shape, generator=g)
        x = x_hat.clone().requires_grad_(True)  # one teacher pass; each head's gradient from its graph
        feats = teacher(interpolate(x, noise, t_hat), t_hat, split["caps"][:n], taps=disc.layers, velocity=False).feats
        logits = disc(feats, t_hat, split["pooled"][:n])
        grads = [torch.autograd.grad(logits[:, j].sum(), x, retain_graph=True)[0].flatten(1)
                 for j in range(len(disc.layers))]
        total = sum(grads)
        cos = lambda a: torch.nn.functional.cosine_similarity(a, d, dim=1)  # noqa: E731
        norms = torch.stack([gr.norm(dim=1).pow(2).mean() for gr in grads])
        out[level] = {"cos_all": [cos(total).mean().item(), cos(total).std().item()],
                      **{f"cos_{k}": cos(grads[j]).mean().item() for j, k in enumerate(disc.layers)},
                      **{f"share_{k}": (norms[j] / norms.sum()).item() for j, k in enumerate(disc.layers)}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True, help='a run folder or checkpoint, or "untrained"')
    ap.add_argument("--data", required=True, help="training data (`ladd precompute` output, with teacher seeds)")
    ap.add_argument("--eval-data", required=True, help="held-out prompts for the disc's accuracy and the gradients")
    ap.add_argument("--config", default="configs/toy.toml", help="the disc's architecture when --student untrained")
    ap.add_argument("--levels", default="0.03,0.1,0.25,0.5,0.75")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--n-grad", type=int, default=64)
    ap.add_argument("--disc-steps", type=int, default=3000)
    ap.add_argument("--disc-lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    levels = [float(v) for v in args.levels.split(",")]
    untrained = args.student == "untrained"
    ckpt = None if untrained else find_checkpoint(args.student)
    cfg = to_dict(load_config(args.config))["model"] if untrained else read_config(ckpt)["model"]
    pipe = load_pipeline(resolve_pipeline(cfg["pipeline"]))
    teacher = ZImageAdapter(pipe.transformer).requires_grad_(False).eval()
    if untrained:
        student = teacher
    else:
        weights, run_config = student_weights(ckpt)
        student = ZImageAdapter(student_transformer(pipe.transformer, weights, config=run_config))
    layers = list(cfg["disc_layers"])

    def new_disc() -> Discriminator:
        return Discriminator(feature_dim=teacher.dim, layers=layers, text_dim=pipe.transformer.config.cap_feat_dim,
                             hidden=cfg["disc_hidden"], cond_dim=cfg["disc_cond_dim"],
                             num_teacher_layers=teacher.num_layers)

    train_split, held_split = load_split(args.data, args.n_train), load_split(args.eval_data, args.n_eval)
    fake_train, fake_held = one_step(student, train_split, 32), one_step(student, held_split, 32)
    mse = lambda a, b: (a - b).pow(2).mean().item()  # noqa: E731
    train = cached_taps(teacher, train_split, fake_train, levels, layers, draws=2, batch=32, seed=args.seed)
    held = cached_taps(teacher, held_split, fake_held, levels, layers, draws=1, batch=32, seed=args.seed + 1)
    disc = new_disc()
    history = train_disc(disc, train, args.disc_steps, args.disc_lr, 64, args.seed)
    result = {"student": args.student, "checkpoint": str(ckpt) if ckpt else None, "levels": levels,
              "one_step_mse_to_teacher": mse(fake_held, held_split["x0"]),
              "disc_loss_first_last_100": [sum(part) / len(part) for part in (history[:100], history[-100:])],
              "held_out_accuracy": accuracy(disc, held, levels),
              "train_accuracy": accuracy(disc, train, levels),
              "chance_cos": 1 / math.sqrt(held_split["x0"][0].numel()),
              "converged_disc_gradient": gradient_alignment(disc, teacher, held_split, fake_held, levels,
                                                            args.n_grad, args.seed + 2)}
    if ckpt is not None:
        run_disc = new_disc()
        run_disc.load_state_dict(load_weights(ckpt, "disc"))
        result["run_disc_held_out_accuracy"] = accuracy(run_disc, held, levels)
        result["run_disc_gradient"] = gradient_alignment(run_disc, teacher, held_split, fake_held, levels,
                                                         args.n_grad, args.seed + 2)
    first, last = result["disc_loss_first_last_100"]
    print(f"{args.student}: one-step MSE to the teacher {result['one_step_mse_to_teacher']:.4f}; "
          f"converged disc loss {first:.3f} -> {last:.3f}; |cos| of a random direction ≈ {result['chance_cos']:.3f}")
    print(f"{'t̂':>5} | {'acc held (all / per head)':<30} | {'acc train':>9} | "
          f"{'cos(g, x0 − x̂0) converged':<28} | {'heads share':<18}" + (" | run disc: acc, cos" if ckpt else ""))
    for level in levels:
        a, tr, gc = result["held_out_accuracy"][level], result["train_accuracy"][level], \
            result["converged_disc_gradient"][level]
        heads = " ".join(f"{a[str(k)]:.2f}" for k in layers)
        cos = " ".join(f"{gc['cos_' + str(k)]:+.2f}" for k in layers)
        share = " ".join(f"{gc['share_' + str(k)]:.2f}" for k in layers)
        line = (f"{level:>5.2f} | {a['all']:.2f} ({heads}){'':<14} | {tr['all']:>9.2f} | "
                f"{gc['cos_all'][0]:+.3f} ± {gc['cos_all'][1]:.3f} ({cos}) | {share}")
        if ckpt is not None:
            ra, rg = result["run_disc_held_out_accuracy"][level], result["run_disc_gradient"][level]
            line += f" | {ra['all']:.2f}, {rg['cos_all'][0]:+.3f}"
        print(line)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
