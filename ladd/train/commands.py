"""CLI for training: `ladd train`, `ladd doctor`, `ladd config show|diff`.

    ladd train --config configs/toy.toml --set data.path=runs/data --set train.out=runs/toy
    ladd doctor --config configs/toy.toml --set data.path=runs/data
    ladd config diff runs/a runs/b/checkpoints/step-00000500 configs/toy.toml
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML config (defaults for every key not in it)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key; repeatable")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a LADD student (1 CPU, 1 GPU or many via torchrun)")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("doctor", help="check a training config before a run")
    _config_args(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("config", help="show a resolved config, or diff runs / configs / checkpoints")
    csub = p.add_subparsers(dest="config_command", metavar="<show|diff>", required=True)
    show = csub.add_parser("show", help="print the fully resolved config")
    _config_args(show)
    show.set_defaults(func=cmd_config_show)
    d = csub.add_parser("diff", help="keys whose resolved values differ")
    d.add_argument("a")
    d.add_argument("b")
    d.set_defaults(func=cmd_config_diff)


def _load(args):
    from ladd.config import load_config

    return load_config(args.config, args.set)


def cmd_train(args) -> int:
    from ladd.train.loop import train

    result = train(_load(args))
    return 1 if result["stopped"] == "stop_nonfinite" else 0


def cmd_config_show(args) -> int:
    from ladd.config import to_toml

    print(to_toml(_load(args)))
    return 0


def resolved(path: str) -> dict:
    """A resolved config from a TOML file, a run folder or a checkpoint folder."""
    from ladd.config import load_config, to_dict
    from ladd.train.checkpoint import read_config

    p = Path(path)
    if p.is_file():
        return to_dict(load_config(p))
    if p.is_dir():
        return read_config(p)
    raise FileNotFoundError(f"{path}: no such config file, run folder or checkpoint")


def cmd_config_diff(args) -> int:
    from ladd.config import diff

    rows = diff(resolved(args.a), resolved(args.b))
    if not rows:
        print("no differences")
        return 0
    width = max(len(k) for k, _, _ in rows)
    print(f"{'key':<{width}}  {args.a}  |  {args.b}")
    for key, va, vb in rows:
        print(f"{key:<{width}}  {json.dumps(va)}  |  {json.dumps(vb)}")
    return 1


def reference_checks(trainer) -> list[tuple[str, bool, str]]:
    """The teacher's references are clean (schedule reaches σ = 0) and were made with CFG (blog bugs 1, 2)."""
    from ladd.data.shards import read_manifest
    from ladd.flow import image_seq_len, teacher_sigmas

    sampling = read_manifest(trainer.cfg.data.path)["sampling"]
    lat = trainer.data[0]["latents"]
    sig = teacher_sigmas(trainer.pipe.scheduler, sampling["steps"], image_seq_len(*lat.shape[-2:]))
    return [
        ("teacher references are clean (schedule reaches sigma 0)", float(sig[-1]) == 0.0,
         f"{sampling['steps']} steps end at sigma {float(sig[-1]):.3f}"),
        ("teacher references use CFG", sampling["guidance"] > 0, f"guidance {sampling['guidance']}"),
    ]


def doctor(cfg) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each pre-flight check; also prints the plan."""
    import torch

    from ladd.train.loop import Trainer
    from ladd.train.step import generator_step, LaddModels, trainable

    checks = []
    try:
        trainer = Trainer(cfg)  # refuses data made by another teacher, bad layers, bad text_cond ...
    except ValueError as e:
        return [("config, data and teacher load and match", False, str(e))]
    checks.append(("data manifest matches the teacher", True, str(Path(cfg.data.path))))
    checks += reference_checks(trainer)
    # One G-step on a throw-away copy of the student: gradients must be finite and non-zero.
    student = copy.deepcopy(trainer.student)
    models = LaddModels(student, trainer.teacher, trainer.disc)
    opt = torch.optim.SGD(trainable(student), lr=0.0)
    batch = trainer.next_micro_batches()
    metrics, _ = generator_step(models, opt, batch, 0, cfg.method, torch.Generator(trainer.dist.device))
    norm = metrics["student_grad_norm"]
    checks.append(("one step gives finite, non-zero student gradients", math.isfinite(norm) and norm > 0,
                   f"grad norm {norm:.3g}"))
    checks.append(("micro-batch is safe for the loss", True,
                   f"batch_per_rank {cfg.data.batch_per_rank} with {cfg.method.loss}"))
    print(trainer.plan())
    return checks


def cmd_doctor(args) -> int:
    from ladd.config import ConfigError

    try:
        checks = doctor(_load(args))
    except ConfigError as e:
        checks = [("config is valid", False, str(e))]
    for name, ok, detail in checks:
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1

