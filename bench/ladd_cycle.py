"""LADD cycle efficiency, and ladd against a straightforward implementation of the blog's loop.

One cycle = `gen_update_interval` steps (one G+D step, then D-only steps). We time:
  * the cycle through `ladd.train.step.ladd_step`;
  * the sum of its essential passes, each timed alone: student forward (with graph + backward on the
    G-step, without on D-steps), teacher forwards on real and fake, the teacher's input-gradient
    backward on the G-step, disc forward/backward;
  * the same cycle written the straightforward way (the blog's loop): the student forward always
    builds a graph, three teacher forwards per generator step (real, fake for D, fake for G), separate
    real and fake teacher calls, every block run and every hidden state kept.
Prints one JSON line per config: {"config", "cycle_over_essential", "speedup_vs_straightforward", ...}.

    python bench/ladd_cycle.py                 # toy (dim 128, 6 layers, 16×16 latents) and small
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from ladd import losses
from ladd.config import MethodConfig
from ladd.flow import interpolate, logit_normal, x0_from_velocity
from ladd.models.discriminator import Discriminator
from ladd.models.tiny import TinyConfig, build_transformer
from ladd.models.zimage import ZImageAdapter
from ladd.train.loop import build_optimizer
from ladd.train.step import Batch, LaddModels, ladd_step, trainable

CONFIGS = {
    "toy": dict(dim=128, n_layers=6, n_heads=4, axes_dims=(8, 12, 12), latent=16, layers=[1, 3, 5]),
    "small": dict(dim=256, n_layers=8, n_heads=4, axes_dims=(16, 24, 24), latent=32, layers=[1, 3, 5, 7]),
}


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function, measured round-robin: on a shared machine whose speed drifts over
    seconds, each quantity's best then comes from the same stretch of time as the others'."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def setup(name: str, batch: int):
    c = CONFIGS[name]
    tiny = TinyConfig(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], axes_dims=c["axes_dims"],
                      text_hidden=64)
    torch.manual_seed(0)
    tr = build_transformer(tiny)
    teacher = ZImageAdapter(tr)
    student = ZImageAdapter(copy.deepcopy(tr)).train()
    disc = Discriminator(feature_dim=c["dim"], layers=c["layers"], text_dim=64, hidden=64, cond_dim=64)
    models = LaddModels(student, teacher, disc)
    caps = [torch.randn(24, 64) for _ in range(batch)]
    x0 = torch.randn(batch, 16, c["latent"], c["latent"])
    return models, Batch(x0, caps, torch.randn(batch, 64))


def essential_parts(models: LaddModels, b: Batch) -> dict:
    """The passes a cycle cannot avoid, each as a function to time alone."""
    s, te, d = models.student, models.teacher, models.disc
    B, taps = len(b), d.layers
    t = torch.full((B,), 1.0)
    eps = torch.randn_like(b.x0)
    th = torch.rand(B)
    feats = te(b.x0, th, b.cap_feats, taps=taps, velocity=False).feats

    def student_fwd_bwd():
        v = s(interpolate(b.x0, eps, t), t, b.cap_feats).velocity
        v.sum().backward()
        s.zero_grad(set_to_none=True)

    def student_fwd():
        with torch.no_grad():
            s(interpolate(b.x0, eps, t), t, b.cap_feats)

    def teacher_fwd(n):
        with torch.no_grad():
            te(torch.cat([b.x0] * n), torch.cat([th] * n), b.cap_feats * n, taps=taps, velocity=False)

    def teacher_input_grad():  # forward with a live graph + backward to the input
        x = b.x0.clone().requires_grad_(True)
        f = te(x, th, b.cap_feats, taps=taps, velocity=False).feats
        sum(v.sum() for v in f.values()).backward()

    def disc_fwd_bwd(n):
        fe = {k: torch.cat([v.detach()] * n).requires_grad_(True) for k, v in feats.items()}
        d(fe, torch.cat([th] * n), torch.cat([b.text_cond] * n)).sum().backward()
        d.zero_grad(set_to_none=True)

    return {
        "student_fwd_bwd": student_fwd_bwd,
        "student_fwd": student_fwd,
        "teacher_fwd_B": lambda: teacher_fwd(1),
        "teacher_fwd_2B": lambda: teacher_fwd(2),
        "teacher_input_grad": teacher_input_grad,
        "disc_fwd_bwd_B": lambda: disc_fwd_bwd(1),
        "disc_fwd_bwd_2B": lambda: disc_fwd_bwd(2),
    }


def essential_sum(parts: dict[str, float], gi: int) -> float:
    # G-step: student fwd+bwd, teacher real (no grad) + fake with graph and its input-grad backward,
    # disc on fake for G, then D on real + fake. D-only steps: student fwd, teacher on 2B, D on 2B.
    g = (parts["student_fwd_bwd"] + parts["teacher_fwd_B"] + parts["teacher_input_grad"]
         + parts["disc_fwd_bwd_B"] + parts["disc_fwd_bwd_2B"])
    dstep = parts["student_fwd"] + parts["teacher_fwd_2B"] + parts["disc_fwd_bwd_2B"]
    return g + (gi - 1) * dstep


def straightforward_cycle(models: LaddModels, b: Batch, cfg: MethodConfig, opt_g, opt_d, rng) -> None:
    """The blog's loop, written plainly: graphs everywhere, three teacher passes per G-step."""
    s, te, d = models.student, models.teacher, models.disc
    all_layers = list(range(te.num_layers))
    for step in range(cfg.gen_update_interval):
        B = len(b)
        t = cfg.curriculum().sample(step, B, generator=rng)
        eps = torch.randn(b.x0.shape, generator=rng)
        x_t = interpolate(b.x0, eps, t)
        x0_hat = x0_from_velocity(x_t, s(x_t, t, b.cap_feats).velocity, t)  # graph even on D-only steps
        th = logit_normal(B, cfg.renoise_m, cfg.renoise_s, generator=rng)
        fake = interpolate(x0_hat, torch.randn(b.x0.shape, generator=rng), th)
        real = interpolate(b.x0, torch.randn(b.x0.shape, generator=rng), th)
        with torch.no_grad():
            f_real = te(real, th, b.cap_feats, taps=all_layers).feats  # every block, every hidden state
            f_fake = te(fake.detach(), th, b.cap_feats, taps=all_layers).feats
        pick = lambda f: {k: f[k] for k in d.layers}  # noqa: E731
        opt_d.zero_grad()
        losses.d_loss(d(pick(f_real), th, b.text_cond), d(pick(f_fake), th, b.text_cond)).backward()
        opt_d.step()
        if step % cfg.gen_update_interval == 0:
            f_live = te(fake, th, b.cap_feats, taps=all_layers).feats  # the third teacher pass
            opt_g.zero_grad()
            losses.g_loss(d(pick(f_live), th, b.text_cond)).backward()
            opt_g.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interval", type=int, default=MethodConfig().gen_update_interval, help="gen_update_interval")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MethodConfig(gen_update_interval=args.interval)
    for name in args.configs:
        models, b = setup(name, args.batch)
        # the trainer's optimizers (fused AdamW), for the cycle and the straightforward loop alike
        opt_g = build_optimizer(trainable(models.student), 1e-6, (0.9, 0.999), 0.0)
        opt_d = build_optimizer(trainable(models.disc), 1e-6, (0.9, 0.999), 0.0)
        rng = torch.Generator().manual_seed(0)
        fns = {
            "cycle": lambda: [ladd_step(models, opt_g, opt_d, [b], s, cfg, rng) for s in range(cfg.gen_update_interval)],
            "straightforward": lambda: straightforward_cycle(models, b, cfg, opt_g, opt_d, rng),
            **essential_parts(models, b),
        }
        best = time_interleaved(fns, args.repeats)
        cycle, plain = best.pop("cycle"), best.pop("straightforward")
        essential = essential_sum(best, cfg.gen_update_interval)
        print(json.dumps({
            "config": name, "batch": args.batch, "threads": args.threads, "interval": args.interval, "repeats": args.repeats,
            "cycle_over_essential": round(cycle / essential, 3),
            "speedup_vs_straightforward": round(plain / cycle, 3),
            "cycle_s": round(cycle, 4), "essential_s": round(essential, 4), "straightforward_s": round(plain, 4),
            "parts_s": {k: round(v, 4) for k, v in best.items()},
        }), flush=True)


if __name__ == "__main__":
    main()
