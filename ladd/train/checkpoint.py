"""Training checkpoints: everything needed to resume, written atomically, the last K kept.

    checkpoints/step-00000500/          a finished checkpoint (has COMPLETE)
        .metadata, __*.distcp            DCP shards: student, disc, both optimizers, EMA
        rank-00000.safetensors           per-rank RNG states (tensors) + data-reader position (metadata)
        meta.json                        step, resolved config, time
        COMPLETE                         written last, by rank 0, after every rank finished
    checkpoints/step-00000600.tmp/      a save in progress or killed mid-way: never loaded, removed later

Saving is a collective (every rank writes its own shards; no full-state gather). Resuming means
re-running the same command: `latest()` finds the newest complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ladd import distributed
from ladd.distributed import Dist

PREFIX = "step-"


@dataclass
class TrainState:
    """The loop's own state besides the models: step counter and every random stream."""

    step: int = 0
    rng: torch.Generator = field(default_factory=torch.Generator)  # LADD noise draws
    dropout_rng: torch.Generator = field(default_factory=torch.Generator)  # text dropout
    lr_d_scale: float = 1.0  # lowered by a collapse rollback
    skipped: int = 0  # non-finite updates skipped so far

    def rank_tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "rng": self.rng.get_state(),
            "dropout_rng": self.dropout_rng.get_state(),
            "torch_cpu_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            out["torch_cuda_rng"] = torch.cuda.get_rng_state()
        return out

    def load_rank_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rng.set_state(tensors["rng"])
        self.dropout_rng.set_state(tensors["dropout_rng"])
        torch.set_rng_state(tensors["torch_cpu_rng"])
        if torch.cuda.is_available() and "torch_cuda_rng" in tensors:
            torch.cuda.set_rng_state(tensors["torch_cuda_rng"])


class Checkpointer:
    def __init__(self, root: str | Path, dist: Dist, keep_last: int = 2):
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last

    def finished(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.name.startswith(PREFIX) and (p / "COMPLETE").is_file()]
        return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        done = self.finished()
        return done[-1] if done else None

    def save(self, step: int, dcp_state: dict, state: TrainState, data_state: dict, config: dict) -> Path:
        """Collective. Returns the finished folder."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was killed
            tmp.mkdir(parents=True)
        distributed.barrier()
        distributed.dcp_save(dcp_state, str(tmp))
        fault("save", step)
        meta = {"data": data_state, "lr_d_scale": state.lr_d_scale, "skipped": state.skipped}
        save_file(state.rank_tensors(), str(tmp / f"rank-{self.dist.rank:05d}.safetensors"),
                  metadata={"json": json.dumps(meta)})
        distributed.barrier()  # every rank's shards are on disk
        if self.dist.is_main:
            (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), "config": config}, indent=1))
            (tmp / "COMPLETE").write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.finished()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in self.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        distributed.barrier()
        return final

    def load(self, path: Path, dcp_state: dict, state: TrainState) -> tuple[int, dict]:
        """Collective. Fills dcp_state in place; restores this rank's RNGs; returns (step, data state)."""
        distributed.dcp_load(dcp_state, str(path))
        own = path / f"rank-{self.dist.rank:05d}.safetensors"
        if not own.is_file():
            raise RuntimeError(
                f"{path} was written by a run with fewer ranks (no {own.name}); exact resume needs the "
                "same world size — start a new run from the exported weights instead"
            )
        state.load_rank_tensors(load_file(str(own)))
        from safetensors import safe_open

        with safe_open(str(own), "pt") as f:
            meta = json.loads(f.metadata()["json"])
        state.lr_d_scale, state.skipped = meta["lr_d_scale"], meta["skipped"]
        state.step = json.loads((path / "meta.json").read_text())["step"]
        return state.step, meta["data"]


def read_config(path: str | Path) -> dict:
    """The resolved config stored in a checkpoint folder (or a run folder's config.json)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return json.loads((path / "meta.json").read_text())["config"]
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    raise FileNotFoundError(f"{path}: neither a checkpoint (meta.json) nor a run folder (config.json)")


def load_weights(path: str | Path, part: str = "student") -> dict[str, torch.Tensor]:
    """One part of a checkpoint as plain tensors in one process, whatever the world size that wrote it.

    part: "student" / "ema" -> a `ZImageTransformer2DModel` state dict; "disc" -> the discriminator's.
    """
    path = Path(path)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"{path} is not a finished checkpoint (no COMPLETE marker)")
    key = {"student": "student.model", "disc": "disc.model", "ema": "ema"}[part]
    sd = distributed.dcp_load_keys(str(path), {key})
    for k in key.split("."):
        sd = sd[k]
    prefix = "transformer."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def injected(point: str, step: int) -> bool:
    """Fault-test hook: LADD_FAULT=<point>:<step>[:<rank>] (comma-separated for several) names a
    fault to inject at `point` of step `step`, on every rank or on one."""
    rank = os.environ.get("RANK", "0")
    for spec in filter(None, os.environ.get("LADD_FAULT", "").split(",")):
        parts = spec.split(":")
        if parts[:2] == [point, str(step)] and (len(parts) == 2 or parts[2] == rank):
            return True
    return False


def fault(point: str, step: int) -> None:
    """Crash-test hook: SIGKILLs this process where LADD_FAULT says (tests of exact resume, dead ranks)."""
    if injected(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
