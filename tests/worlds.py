"""The small training world the trainer's tests share: a tiny teacher, 8 prompts and their teacher
data, the overrides that make a seconds-long run of it (tests/test_train.py, test_faults.py,
test_checkpoint_faults.py, test_bucket_training.py), and how those tests launch `ladd train` in
subprocesses and compare the weights two runs end with."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from ladd.data.precompute import PrecomputeConfig, run_precompute
from ladd.models.tiny import build_tiny_pipeline
from ladd.train.checkpoint import load_weights

PROMPTS = ["a red circle", "a blue square", "a green triangle", "an orange circle",
           "a red square on white", "a gray circle", "a blue circle on black", "a green square"]


def make_train_world(root: Path) -> Path:
    """`root/tiny` (the teacher), `root/prompts.txt`, `root/data` (4-step teacher data, 3 per shard)."""
    build_tiny_pipeline(seed=2).save_pretrained(root / "tiny")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run_precompute(PrecomputeConfig(pipeline=str(root / "tiny"), prompts=str(root / "prompts.txt"),
                                    out=str(root / "data"), steps=4, shard_size=3))
    return root


def train_overrides(root: Path, out: Path, steps: int = 6, **extra) -> list[str]:
    """`--set` items for a run of `steps` on the world at `root`, writing to `out`."""
    base = {
        "model.pipeline": f'"{root / "tiny"}"', "data.path": f'"{root / "data"}"', "train.out": f'"{out}"',
        "model.disc_layers": "[1, 3, 5]", "model.disc_hidden": "64", "model.disc_cond_dim": "64",
        "train.steps": str(steps), "train.checkpoint_every": "2", "validation.every": "3",
        "validation.num_prompts": "3", "optim.lr_g": "1e-3", "optim.lr_d": "1e-3", "health.collapse_window": "1000",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_command(args: list[str], nproc: int) -> list[str]:
    """`ladd train --set ...` in one process, or under torchrun with `nproc` workers."""
    launcher = [sys.executable, "-m", "ladd"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "ladd"]
    return launcher + ["train"] + [a for o in args for a in ("--set", o)]


def train_env(fault: str | None = None) -> dict:
    """Offline, one thread per worker, and an injected fault (`LADD_FAULT`) when given."""
    extra = {"LADD_FAULT": fault} if fault else {}
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def run_train(args: list[str], nproc: int, timeout: float, fault: str | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run `ladd train` to its end (bounded by `timeout` seconds); a failure with `check` shows its output."""
    proc = subprocess.run(train_command(args, nproc), env=train_env(fault), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def assert_same_weights(a: Path, b: Path, step: int) -> None:
    """Runs `a` and `b` hold bit-identical student and disc weights at checkpoint `step`."""
    for part in ("student", "disc"):
        wa = load_weights(a / "checkpoints" / f"step-{step:08d}", part)
        wb = load_weights(b / "checkpoints" / f"step-{step:08d}", part)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), part
