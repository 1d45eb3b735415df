"""Training checkpoints: everything needed to resume, written atomically, verified before use, the
last K good ones kept.

    checkpoints/step-00000500/          a finished checkpoint (has COMPLETE)
        .metadata, __*.distcp            DCP shards: student, disc, both optimizers, EMA
        rank-00000.safetensors           per-rank RNG states (tensors) + data-reader position (metadata)
        meta.json                        step, resolved config, time
        manifest.json                    every file above: its size and CRC-32
        COMPLETE                         written last, by rank 0, after every rank finished
    checkpoints/step-00000600.tmp/      a save in progress, killed or failed: never loaded, removed

Saving is a collective (every rank writes its own shards; no full-state gather). Resuming means
re-running the same command: `latest()` finds the newest checkpoint that verifies.

COMPLETE says every rank finished writing, not that the bytes are still there: a copy cut short, a
quota, a disk going bad can damage a folder afterwards. So `latest()` checks, newest first,
  1. always: every manifest file is present with its size, and the DCP `.metadata` loads and its shard
     files hold every chunk it lists (stat calls and one small read: catches missing and cut files);
  2. with `checksums=True` (the default): every file's CRC-32 (catches bytes changed in place).
A damaged checkpoint gets one line and the one before it is used. Why 2 is on by default: at resume
each rank reads only its own share of the files (the one its DCP load reads next), once per resume, at
most about the time of the load itself; a silently flipped optimizer moment costs a run. Why CRC-32
(zlib) and not SHA-256: the threat is corruption, not an adversary, and it runs several times faster.
At save time each rank sums the files it just wrote (still in its page cache) on a few threads and
rank 0 joins the parts into the manifest: a memory-speed read, a small fraction of the write. Older
checkpoints, written before manifests, get check 1's `.metadata` part only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ladd import distributed
from ladd.distributed import Dist, print0

PREFIX = "step-"
MANIFEST = "manifest.json"
SUMS = "sums-{:05d}.json"  # one rank's part of the manifest, joined by rank 0 before COMPLETE
BLOCK_BYTES = 16 << 20  # checksum unit: blocks are read and summed on several threads


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no existing one verifies. The message is one line: what
    happened and what to do. Every rank raises it; training stops there, nothing lost."""


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
    """Saves, verifies, finds and prunes one run's checkpoints.

    `dist`: the run's Dist (then save, load and latest are collectives), or None to read a folder in
    one process (export, eval). `checksums=False`: resume checks sizes and `.metadata` only."""

    def __init__(self, root: str | Path, dist: Dist | None, keep_last: int = 2, checksums: bool = True):
        self.root = Path(root)
        self.dist = dist
        self.keep_last = keep_last
        self.checksums = checksums
        # Verdicts every rank agreed on (None: it verifies; else why not). A rank skips re-checking a
        # folder exactly when every other rank does, so the collectives of `latest()` stay matched.
        self._verdicts: dict[str, str | None] = {}
        self._walked = False  # every rank has walked the listing together (at resume)

    def finished(self) -> list[Path]:
        """Every folder with a COMPLETE marker, oldest first (verified or not)."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
                and (p / "COMPLETE").is_file()]  # not a .tmp killed between COMPLETE and its rename
        return sorted(done, key=_step_of)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; None before the first save. Each damaged one newer than
        it gets one line. Collective with a multi-rank `dist`: every rank walks rank 0's listing and
        agrees on each verdict, so all load the same folder (under FSDP anything else hangs). Raises
        CheckpointError when checkpoints exist but none verifies (never a silent restart from 0).

        Once this process has resumed or saved, the answer comes from the agreed verdicts with no
        collective: then it is also safe after a rank died (the loop names the last checkpoint)."""
        known = self._known_latest()
        if known is not False:
            return known
        listed = [_step_of(p) for p in self.finished()]
        damaged: list[tuple[str, str]] = []
        for i in range(self._broadcast(len(listed))):
            step = self._broadcast(listed[-1 - i] if i < len(listed) else -1)
            path = self.root / f"{PREFIX}{step:08d}"
            why = self._verdict(path)
            if why is None:
                for name, reason in damaged:
                    print0(f"checkpoint {name} is damaged ({reason}); falling back to {path.name}")
                self._walked = True
                return path
            damaged.append((path.name, why))
        self._walked = True
        if damaged:
            raise CheckpointError(f"no checkpoint in {self.root} verifies: "
                                  + "; ".join(f"{name} ({why})" for name, why in damaged)
                                  + "; restore them, or move them away to start this run from step 0")
        return None

    def _known_latest(self) -> Path | None | bool:
        """`latest()` from verdicts every rank already agreed on (this run's saves, the resume's walk),
        or False when a folder on disk has none yet. Every rank holds the same verdicts, so every rank
        takes this path or none does."""
        good = [name for name, why in self._verdicts.items() if why is None]
        newest = max(good, key=_step_of, default=None)
        listed = self.finished()
        if any(p.name not in self._verdicts for p in listed if newest is None or _step_of(p) > _step_of(newest)):
            return False
        if newest is not None:
            return self.root / newest
        return None if self._walked and not listed else False

    def save(self, step: int, dcp_state: dict, state: TrainState, data_state: dict, config: dict) -> Path:
        """Collective. Returns the finished folder, or raises CheckpointError on every rank if any rank
        could not write (a full disk): the half-written folder is removed, older checkpoints are
        untouched, and re-running the same command (after freeing space) resumes from the last one.

        Each phase ends in an all-reduce of every rank's outcome (its errno; 0 is ok) where a bare
        barrier would do, so a rank that failed never leaves the others waiting for it."""
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        rank, world = self.dist.rank, self.dist.world_size
        err: OSError | None = None
        if self.dist.is_main:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a save that was killed
                tmp.mkdir(parents=True)
            except OSError as e:
                err = e
        self._agree_written(err, final, tmp)
        try:
            distributed.dcp_save(dcp_state, str(tmp))  # one rank's OSError is raised on every rank
            fault("save", step)
            if injected("disk_full", step):  # fault tests: this rank's disk fills up mid-save
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            meta = {"data": data_state, "lr_d_scale": state.lr_d_scale, "skipped": state.skipped}
            # Serialised in memory, written by Python: a full disk is an OSError like everywhere else.
            (tmp / f"rank-{rank:05d}.safetensors").write_bytes(
                save(state.rank_tensors(), metadata={"json": json.dumps(meta)}))
            if self.dist.is_main:
                (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), "config": config},
                                                          indent=1))
        except OSError as e:
            err = e
        self._agree_written(err, final, tmp)  # every rank's files are on disk
        try:
            # Each rank sums the files it wrote (still in its page cache); rank 0 joins the parts.
            mine = sorted(f.name for f in tmp.iterdir()
                          if not f.name.startswith("sums-") and owner(f.name) % world == rank)
            (tmp / SUMS.format(rank)).write_text(json.dumps(checksums(tmp, mine)))
        except OSError as e:
            err = e
        self._agree_written(err, final, tmp)
        if self.dist.is_main:
            try:
                files: dict = {}
                for r in range(world):
                    files.update(json.loads((tmp / SUMS.format(r)).read_text()))
                    (tmp / SUMS.format(r)).unlink()
                (tmp / MANIFEST).write_text(json.dumps(
                    {"checksum": f"crc32 of the crc32s of {BLOCK_BYTES}-byte blocks",
                     "files": dict(sorted(files.items()))}, indent=1))
                (tmp / "COMPLETE").write_text("ok\n")
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            except OSError as e:
                err = e
        self._agree_written(err, final, tmp)
        self._verdicts[final.name] = None  # summed from its bytes on disk a moment ago
        if self.dist.is_main:
            self._prune()
        distributed.barrier()
        return final

    def _agree_written(self, err: OSError | None, final: Path, tmp: Path) -> None:
        """Returns if every rank wrote its part; else removes `tmp` and raises the same one-line
        CheckpointError on every rank."""
        rank, world = self.dist.rank, self.dist.world_size
        mine = (err.errno or errno.EIO) if err is not None else 0
        codes = distributed.sum_over_ranks([mine if r == rank else 0 for r in range(world)], self.dist.device)
        failed = [r for r, code in enumerate(codes) if code]
        if not failed:
            return
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()  # the folder is gone before any rank exits (torchrun then stops the rest)
        code = codes[failed[0]]
        where = "" if len(failed) == world else f" on rank{'s' * (len(failed) > 1)} {', '.join(map(str, failed))}"
        earlier = [p.name for p in self.finished()
                   if _step_of(p) < _step_of(final) and self._verdicts.get(p.name) is None]
        todo = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        then = (f"the previous checkpoint {earlier[-1]} is intact; {todo} and rerun the same command to resume"
                if earlier else f"there is no earlier checkpoint; {todo} and rerun the same command")
        raise CheckpointError(f"could not write checkpoint {final.name}{where}: {os.strerror(code)}; {then}")

    def _prune(self) -> None:
        """Rank 0, after a save: keep the newest `keep_last` checkpoints that verify, delete older ones.
        A damaged checkpoint never counts, so pruning never deletes the newest good one; damaged ones
        newer than every good one are left (the run overwrites them when it gets there)."""
        kept = 0
        for path in reversed(self.finished()):
            if kept < self.keep_last:
                why = self._verdicts[path.name] if path.name in self._verdicts else self._check_sizes(path)[1]
                if why is None:
                    kept += 1
                    continue
                if kept == 0:
                    continue
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def _verdict(self, path: Path) -> str | None:
        """Why `path` is damaged (None: it verifies), the same answer on every rank; cached."""
        if path.name in self._verdicts:
            return self._verdicts[path.name]
        rank, world = self._rank_world()
        crcs, why = self._check_sizes(path)
        names = sorted(crcs or {})
        bad = None  # the first of this rank's files whose bytes differ from their checksum
        if why is None and crcs and self.checksums:
            mine = [n for n in names if owner(n) % world == rank]
            try:
                sums = checksums(path, mine)
                bad = next((n for n in mine if sums[n]["crc32"] != crcs[n]), None)
            except OSError as e:
                why = f"{Path(e.filename or '?').name} cannot be read: {e.strerror}"
        # Sizes and .metadata are seen alike by every rank; a checksum only by the rank that read it.
        # Agreeing on one code per rank (0 ok, 1 seen here, 2 + i: file i's checksum) tells every rank
        # that the folder is damaged and rank 0 which file to name.
        code = 1 if why is not None else (2 + names.index(bad) if bad is not None else 0)
        codes = self._sum([code if r == rank else 0 for r in range(world)])
        if not any(codes):
            verdict = None
        elif why is not None:
            verdict = why
        elif bad is not None:
            verdict = f"{bad}: its bytes differ from its CRC-32 in {MANIFEST}"
        else:
            k = next(r for r, c in enumerate(codes) if c)
            c = codes[k] - 2
            verdict = (f"{names[c]}: its bytes differ from its CRC-32 in {MANIFEST}" if 0 <= c < len(names)
                       else f"a file failed to read on rank {k}")
        if verdict is None and crcs is None:
            print0(f"note: {path.name} predates checkpoint manifests; checked against its .metadata only")
        self._verdicts[path.name] = verdict
        return verdict

    @staticmethod
    def _check_sizes(path: Path) -> tuple[dict[str, str] | None, str | None]:
        """({file: its CRC-32} from the manifest, None for an older checkpoint; why it is damaged or
        None): every manifest file at its size, and every chunk `.metadata` lists inside its file."""
        crcs = None
        if (path / MANIFEST).is_file():
            try:
                files = json.loads((path / MANIFEST).read_text())["files"]
                sizes = {name: int(entry["bytes"]) for name, entry in files.items()}
                crcs = {name: str(entry["crc32"]) for name, entry in files.items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None, f"{MANIFEST} is unreadable"
            for name, size in sorted(sizes.items()):
                if why := _size_problem(path / name, size):
                    return crcs, why
        if not (path / ".metadata").is_file():
            return crcs, ".metadata is missing"
        try:
            extents = distributed.dcp_extents(str(path))
        except Exception as e:  # unpickling a damaged .metadata can raise nearly anything
            return crcs, f".metadata is unreadable ({type(e).__name__})"
        for name, size in sorted(extents.items()):
            if why := _size_problem(path / name, size, at_least=True):
                return crcs, why
        return crcs, None

    def _rank_world(self) -> tuple[int, int]:
        return (self.dist.rank, self.dist.world_size) if self._collective else (0, 1)

    @property
    def _collective(self) -> bool:
        return self.dist is not None and self.dist.enabled

    def _broadcast(self, value: int) -> int:
        return distributed.broadcast0(value, self.dist.device) if self._collective else value

    def _sum(self, values: list[int]) -> list[int]:
        return distributed.sum_over_ranks(values, self.dist.device) if self._collective else values

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


def _step_of(path: Path | str) -> int:
    return int(Path(path).name[len(PREFIX):])


def _size_problem(path: Path, expected: int, at_least: bool = False) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size < expected or (size > expected and not at_least):
        return f"{path.name}: {size:,} bytes, {'.metadata needs' if at_least else 'expected'} {expected:,}"
    return None


def owner(name: str) -> int:
    """The rank that wrote a checkpoint file: DCP's `__<rank>_<n>.distcp`, our `rank-<rank>.safetensors`;
    rank 0 for the rest (`.metadata`, meta.json). Save and verify split the checksum work by it."""
    m = re.fullmatch(r"__(\d+)_\d+\.distcp|rank-(\d+)\.safetensors", name)
    return int(m.group(1) or m.group(2)) if m else 0


def checksums(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes": size, "crc32": hex}} for files of `folder`: the CRC-32 of each BLOCK_BYTES
    block, read on a few threads (file reads and zlib release the GIL), then the CRC-32 of those."""
    sizes = {name: (folder / name).stat().st_size for name in names}
    jobs = [(name, offset) for name in names for offset in range(0, max(sizes[name], 1), BLOCK_BYTES)]
    local = threading.local()

    def crc(job: tuple[str, int]) -> int:
        name, offset = job
        if not hasattr(local, "buf"):
            local.buf = memoryview(bytearray(BLOCK_BYTES))
        got = 0
        with open(folder / name, "rb", buffering=0) as f:
            f.seek(offset)
            while got < BLOCK_BYTES and (n := f.readinto(local.buf[got:])):
                got += n
        return zlib.crc32(local.buf[:got])

    # Ranks on one node share its cores: a few threads each is enough to reach memory speed.
    threads = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    with ThreadPoolExecutor(threads) as pool:
        blocks = list(pool.map(crc, jobs))
    per_file: dict[str, bytes] = {name: b"" for name in names}
    for (name, _), value in zip(jobs, blocks):
        per_file[name] += value.to_bytes(4, "big")
    return {name: {"bytes": sizes[name], "crc32": f"{zlib.crc32(per_file[name]):08x}"} for name in names}


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
