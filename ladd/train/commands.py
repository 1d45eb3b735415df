"""CLI for training: `ladd train`, `ladd doctor`, `ladd config show|diff`.

    ladd train --config configs/toy.toml --set data.path=runs/data --set train.out=runs/toy
    ladd doctor --config configs/toy.toml --set data.path=runs/data
    ladd config diff runs/a runs/b/checkpoints/step-00000500 configs/toy.toml
"""

from __future__ import annotations

import argparse
import json
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
    show.add_argument("--doc", action="store_true",
                      help="each key's doc and type as a comment above it (still TOML: save it as a config)")
    show.set_defaults(func=cmd_config_show)
    d = csub.add_parser("diff", help="keys whose resolved values differ")
    d.add_argument("a")
    d.add_argument("b")
    d.set_defaults(func=cmd_config_diff)


def _load(args):
    from ladd.config import load_config

    return load_config(args.config, args.set)


def cmd_train(args) -> int:
    """Exit 0 when the run finished or stopped to be resumed (preemption, train.max_minutes, a
    collapse stop); 1 when it diverged (non-finite losses), lost a rank or could not checkpoint."""
    import sys

    from ladd.distributed import RankLost, print0
    from ladd.train.checkpoint import CheckpointError
    from ladd.train.loop import train

    try:
        result = train(_load(args))
    except RankLost as e:  # raised by the survivors only: each says it (rank 0 may be the lost one)
        print(f"ladd train: error: {e}", file=sys.stderr, flush=True)
        return 1
    except CheckpointError as e:  # raised by every rank alike
        print0(f"ladd train: error: {e}", file=sys.stderr)
        return 1
    return 1 if result["stopped"] == "stop_nonfinite" else 0


def cmd_config_show(args) -> int:
    from ladd.config import to_toml

    print(to_toml(_load(args), doc=args.doc))
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


def doctor(cfg) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for each pre-flight check (ladd/train/preflight.py); also prints the plan."""
    from ladd.train import preflight
    from ladd.train.loop import Trainer

    try:
        trainer = Trainer(cfg)  # refuses data made by another teacher, bad layers, bad text_cond ...
    except ValueError as e:
        return [("config, data and teacher load and match", False, str(e))]
    checks = [("config, data and teacher load and match", True, str(Path(cfg.data.path)))]
    checks += preflight.reference_checks(cfg, trainer.pipe, trainer.data)
    checks.append(preflight.micro_batch_check(cfg, trainer.data))
    checks += preflight.bucket_checks(cfg, trainer)
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

