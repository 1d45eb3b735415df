"""`ladd train` under torchrun: a few steps, SIGKILL after a checkpoint, the same command again, and the
final student and disc compared with an unbroken run (bit-identical or not). One JSON line.

The toy teacher (full student unless --student lora), its own small data set (precomputed here at 4
steps: the data's quality does not matter). The trainer uses NCCL on GPUs, gloo on CPU.

    python bench/fsdp_resume.py --nproc 1                          # a GPU machine (bench/gpu.sh)
    python bench/fsdp_resume.py --nproc 2                          # CPU dry run: two gloo ranks, FSDP2
    python bench/fsdp_resume.py --nproc 1 --optimizer adamw adamw8bit   # one GPU: both optimizers

Note: the trainer shards with FSDP2 only when world_size > 1 (`Dist.enabled`); with --nproc 1 it runs
one unsharded process (the row says "fsdp": false).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, KILL_AT, EVERY = 6, 5, 2  # checkpoints at 2 and 4; killed in step 5; resumed from 4


def ladd(*args: str, nproc: int = 1, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "ladd"] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "ladd"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **(env or {})}
    return subprocess.run(launcher + list(args), env=env, capture_output=True, text=True, timeout=timeout)


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The child's own error (`[rank0]: ValueError: ...`), not torchrun's ChildFailedError after it."""
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "it/s]" not in ln]
    errors = [ln for ln in lines if re.search(r"(Error|Exception|error): ", ln) and "ChildFailedError" not in ln]
    return (errors or lines or [""])[-1][:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--student", choices=("full", "lora"), default="full")
    ap.add_argument("--optimizer", nargs="+", choices=("adamw", "adamw8bit"), default=["adamw"],
                    help="one row each")
    ap.add_argument("--work", default=None, help="working folder, kept (default: a temporary one, removed)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ladd-fsdp-"))
    row = {"what": "fsdp_resume", "nproc": args.nproc, "fsdp": args.nproc > 1, "student": args.student}
    for step in (("toy", "prompts", "--n", "16", "--split", "train", "--out", str(work / "prompts.txt")),
                 ("precompute", "--pipeline", "toy", "--prompts", str(work / "prompts.txt"), "--out",
                  str(work / "data"), "--steps", "4", "--trajectory", "0.9,0.75,0.5")):  # configs/toy.toml's paired term
        proc = ladd(*step, nproc=0)
        if proc.returncode:
            print(json.dumps({**row, "error": f"{step[0]}: {last_line(proc)}"}), flush=True)
            return
    for optimizer in args.optimizer:
        print(json.dumps(run(work, args, {**row, "optimizer": optimizer})), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args, row: dict) -> dict:
    """Unbroken, killed and resumed runs with one optimizer; the row with what happened."""
    t0 = time.perf_counter()
    tag = row["optimizer"]

    def train(out: str, env: dict | None = None) -> subprocess.CompletedProcess:
        sets = {"data.path": str(work / "data"), "train.out": str(work / out), "train.steps": STEPS,
                "train.checkpoint_every": EVERY, "validation.every": 0, "validation.num_prompts": 2,
                "data.batch_per_rank": 2, "model.student": args.student, "optim.optimizer": row["optimizer"],
                "model.gradient_checkpointing": "true"}
        overrides = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        return ladd("train", "--config", "configs/toy.toml", *overrides, nproc=args.nproc, env=env)

    ref = train(f"unbroken-{tag}")
    row["unbroken_rc"] = ref.returncode
    if ref.returncode:
        return {**row, "error": last_line(ref), "wall_s": round(time.perf_counter() - t0, 1)}
    killed = train(f"killed-{tag}", {"LADD_FAULT": f"step:{KILL_AT}"})
    resumed = train(f"killed-{tag}")
    row.update(killed_rc=killed.returncode, resumed_rc=resumed.returncode,
               resumed="resumed from" in resumed.stdout + resumed.stderr)
    if resumed.returncode:
        row["error"] = last_line(resumed)
    else:
        import torch

        from ladd.train.checkpoint import load_weights

        final = f"checkpoints/step-{STEPS:08d}"
        same = {}
        for part in ("student", "disc"):
            a = load_weights(work / f"unbroken-{tag}" / final, part)
            b = load_weights(work / f"killed-{tag}" / final, part)
            same[part] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        row.update(bit_identical=all(same.values()), identical=same)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


if __name__ == "__main__":
    main()
