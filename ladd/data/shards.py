"""The teacher-data format: manifest, shards, checksums, teacher fingerprint, `ladd data check`, and
the training reader `ShardDataset`. `docs/data-format.md` describes the files for readers without ladd.

    OUT/manifest.json              what made the data (teacher fingerprint, sampling, seed rule) + shards
    OUT/prompts.jsonl              {"prompt": ...} per line, in sample order
    OUT/shard-00000.safetensors    latents, seeds, cap_feats, cap_lens, pooled[, clip]
    OUT/images/00000.png           with --decode-first K: the first K teacher images

No pickle anywhere: JSON and safetensors only. A shard is written under a temporary name and renamed
when complete, so a shard file that exists is whole; its sha256 in the manifest catches later damage.

    ds = ShardDataset("runs/teacher", rank=r, world_size=w, seed=0, expect_fingerprint=teacher_fingerprint(dir))
    batch = ds.next_batch(4)       # latents (4, C, H, W) float32, cap_feats list, pooled, clip, indices
    state = ds.state_dict()        # {"epoch", "position", "seed"}; load_state_dict(state) resumes exactly
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ladd import files

FORMAT = "ladd-teacher-latents"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts.jsonl"
IMAGES = "images"
_CHUNK = 1 << 24  # 16 MiB: streaming hashes never hold a second copy of a big file


class DataError(ValueError):
    """Teacher data that is missing, damaged or not the data asked for; the message is one line."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def image_name(i: int) -> str:
    return f"{i:05d}.png"


# --------------------------------------------------------------------------------------------------
# checksums and the teacher fingerprint


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def teacher_fingerprint(pipeline_dir: str | Path) -> str:
    """sha256 over the transformer's config.json and weight files (names and bytes, sorted by name).

    Only the transformer: the latents are a function of the teacher's weights (and of the text encoder,
    which LADD never trains). Hashing the 6B model's ~12 GB takes about a minute, so the result is
    cached (see `fingerprint_folder`): `ladd eval` once per seed re-hashes nothing.
    """
    return fingerprint_folder(Path(pipeline_dir) / "transformer")


FINGERPRINT_CACHE = ".ladd-fingerprint.json"  # beside the weights; else in the user cache dir


def fingerprint_folder(folder: str | Path) -> str:
    """sha256 over a model folder's config.json and weight files, each preceded by its name.

    Cached by each file's (name, size, mtime_ns): any file changed, added or removed is hashed again.
    The cache is `FOLDER/.ladd-fingerprint.json`, or `~/.cache/ladd/fingerprints/` when the folder is
    read-only; a damaged or foreign cache file only means hashing again.
    """
    folder = Path(folder)
    config = folder / "config.json"
    weights = sorted(p for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))) \
        if folder.is_dir() else []
    if not config.is_file() or not weights:
        raise DataError(f"{folder}: no config.json and weight files to fingerprint")
    paths = [config, *weights]
    stats = [[p.name, st.st_size, st.st_mtime_ns] for p in paths for st in [p.stat()]]  # follows HF symlinks
    caches = [folder / FINGERPRINT_CACHE, _user_fingerprint_cache(folder)]
    for cache in caches:
        try:
            entry = json.loads(cache.read_text())
            if entry["folder"] == str(folder.resolve()) and entry["files"] == stats:
                return entry["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, unreadable or damaged: hash
    fingerprint = _hash_files(paths)
    entry = json.dumps({"folder": str(folder.resolve()), "files": stats, "fingerprint": fingerprint}, indent=1)
    for cache in caches:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            files.write_text(cache, entry + "\n")  # atomic: ranks and parallel evals may race here
            break
        except OSError:
            continue  # read-only model folder: the user cache dir; neither: no cache, still correct
    return fingerprint


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{path.name}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _user_fingerprint_cache(folder: Path) -> Path:
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return base / "ladd" / "fingerprints" / f"{key}.json"


# --------------------------------------------------------------------------------------------------
# writing: every file appears whole or not at all


def write_atomic(path: Path, data: bytes) -> None:
    """Write under `path.tmp`, fsync, rename (ladd/files.py). On failure (a full disk) nothing is left behind."""
    try:
        files.write_bytes(path, data, fsync=True, unique=False)
    except OSError as err:
        raise DataError(
            f"could not write {path.name} ({len(data):,} bytes): {err.strerror or err}; no partial file "
            f"was left, rerun the same command to resume"
        ) from None


def write_json(path: Path, obj: dict) -> None:
    # sort_keys + fixed indent: the same job gives the same bytes, whatever the number of processes.
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def prompts_jsonl(prompts: list[str]) -> bytes:
    return "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts).encode()


def write_shard(path: Path, tensors: dict[str, Tensor], first: int) -> tuple[str, int]:
    """One shard file; returns (sha256, bytes). The metadata makes a shard self-describing."""
    count = len(tensors["seeds"])
    # One metadata key: safetensors keeps metadata in a hash map whose order changes from process to
    # process, and the bytes of a shard must not.
    meta = {"ladd": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "first": first, "count": count},
                               sort_keys=True)}
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest(), len(data)


# --------------------------------------------------------------------------------------------------
# reading and checking


def read_manifest(path: str | Path, require_complete: bool = True) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(f"{path}: no {MANIFEST} (not a precomputed teacher dataset)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    if require_complete and not manifest.get("complete"):
        raise DataError(f"{path}: precompute has not finished (rerun the same `ladd precompute` command)")
    return manifest


def check_dataset(path: str | Path) -> list[str]:
    """Every problem found, one line each, naming the file: [] means the data is whole and sane."""
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except DataError as err:
        return [str(err)]
    problems = []
    prompts = path / PROMPTS
    p = manifest["prompts"]
    if not prompts.is_file():
        problems.append(f"{PROMPTS}: missing")
    elif sha256_file(prompts) != p["sha256"]:
        problems.append(f"{PROMPTS}: checksum mismatch (corrupt or edited)")
    for entry in manifest["shards"]:
        if problem := _check_shard(path, manifest, entry):
            problems.append(f"{entry['file']}: {problem}")
    missing = [image_name(i) for i in range(manifest["decode_first"]) if not (path / IMAGES / image_name(i)).is_file()]
    if missing:
        problems.append(f"{IMAGES}/{missing[0]}: missing ({len(missing)} of {manifest['decode_first']} images)")
    return problems


def _check_shard(root: Path, manifest: dict, entry: dict) -> str | None:
    file = root / entry["file"]
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    if size < entry["bytes"]:
        return f"truncated ({size:,} of {entry['bytes']:,} bytes)"
    if size != entry["bytes"]:
        return f"wrong size ({size:,} bytes, manifest says {entry['bytes']:,})"
    if sha256_file(file) != entry["sha256"]:
        return "checksum mismatch (corrupt)"
    n, first = entry["count"], entry["first"]
    storage = manifest["storage"]
    try:
        with safe_open(file, framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 — any parse failure is a broken shard, reported as such
        return f"not a readable safetensors file ({err})"
    expect = {
        "latents": (n, *storage["latent_shape"]),
        "seeds": (n,),
        "cap_lens": (n,),
        "pooled": (n, storage["cap_feat_dim"]),
    }
    if storage.get("clip_dim"):
        expect["clip"] = (n, storage["clip_dim"])
    for key, shape in expect.items():
        if key not in t:
            return f"no tensor {key!r}"
        if tuple(t[key].shape) != shape:
            return f"{key} has shape {tuple(t[key].shape)}, expected {shape}"
    if "cap_feats" not in t or tuple(t["cap_feats"].shape) != (int(t["cap_lens"].sum()), storage["cap_feat_dim"]):
        return "cap_feats do not match cap_lens"
    seeds = manifest["sampling"]["seed"] + torch.arange(first, first + n)
    if not torch.equal(t["seeds"], seeds):
        return "seeds do not follow the seed rule (seed + sample index)"
    for key in ("latents", "cap_feats", "pooled", "clip"):
        if key in t and not torch.isfinite(t[key].float()).all():
            return f"{key} has non-finite values"
    return None


# What to do about a shard that no longer matches the manifest (precompute rewrites exactly those).
REPAIR = "rerun `ladd precompute` with the same arguments to rewrite it (only damaged or missing shards are redone)"


def shard_damage(root: Path, entry: dict, checksum: bool = True) -> str | None:
    """Why a written shard no longer matches its entry ({"file", "bytes", "sha256"}; None values are not
    checked), or None. The size is one stat; `checksum` also reads and hashes the whole file."""
    file = root / entry["file"]
    if not file.is_file():
        return "missing"
    size, expect = file.stat().st_size, entry.get("bytes")
    if expect is not None and size < expect:
        return f"truncated ({size:,} of {expect:,} bytes)"
    if expect is not None and size != expect:
        return f"wrong size ({size:,} bytes, the manifest says {expect:,})"
    if checksum and entry.get("sha256") is not None and (found := sha256_file(file)) != entry["sha256"]:
        return f"checksum mismatch (expected sha256:{entry['sha256'][:16]}…, found sha256:{found[:16]}…)"
    return None


def damage_line(root: Path, entry: dict, why: str) -> str:
    """The reader's one line about a damaged shard: the file, what is wrong, what to do."""
    what = "the file was removed" if why == "missing" else "the file was damaged"
    return f"{root / entry['file']}: {why}; {what} after precompute wrote it — {REPAIR}"


class ShardBatch(NamedTuple):
    latents: Tensor  # (B, C, H, W) float32 teacher latents
    cap_feats: list[Tensor]  # B × (L_i, cap_feat_dim) float32
    pooled: Tensor  # (B, cap_feat_dim) float32: the default disc text conditioning
    clip: Tensor | None  # (B, clip_dim) float32 when the data has CLIP embeddings
    indices: Tensor  # (B,) int64 sample indices (line numbers of prompts.jsonl)
    seeds: Tensor  # (B,) int64 the seed of each sample's initial noise


class ShardDataset:
    """Random-access, memory-mapped reader of precomputed teacher data for training.

    Each epoch is a permutation of all samples drawn from (seed, epoch); rank r of w takes the strided
    slice perm[r::w] of its first w·⌊N/w⌋ entries, so ranks never overlap and all see the same count
    (the remainder is dropped, differently each epoch). `state_dict()` is the epoch and the position in
    this rank's slice: loading it continues with exactly the next sample.

    Damaged data is never returned (`verify=True`): the constructor checks every shard's size against
    the manifest (a stat each), and each shard's sha256 is checked the first time this process opens it;
    a mismatch raises `DataError` with one line naming the file and the repair. Lazy, because a rank
    that never opens a shard never pays, and nothing is hashed before the first step; but every rank
    opens every shard within its first epoch, so each process hashes the whole dataset once (~2 GB/s
    per core). Several ranks can instead split that work at start: `verify_shards(range(rank, n, w))`
    on each, agree on the result, then `mark_verified()`.
    """

    def __init__(
        self,
        path: str | Path,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        expect_fingerprint: str | None = None,
        verify: bool = True,
    ):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        found = self.manifest["teacher"]["fingerprint"]
        if expect_fingerprint is not None and found != expect_fingerprint:
            raise DataError(
                f"{self.path}: teacher data was made by a different teacher (manifest fingerprint "
                f"{found[:19]}…, the teacher being trained is {expect_fingerprint[:19]}…)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shards = self.manifest["shards"]
        self._firsts = [s["first"] for s in self.shards]
        self.num_samples = self.manifest["num_samples"]
        self.samples_per_rank = self.num_samples // world_size
        if self.samples_per_rank == 0:
            raise DataError(f"{self.path}: {self.num_samples} samples cannot be split over {world_size} ranks")
        self.verify = verify
        self._verified: set[int] = set()  # shards whose sha256 this process has checked (or was told to trust)
        if verify:  # truncation and missing files at start, before any model time is spent
            for entry in self.shards:
                if why := shard_damage(self.path, entry, checksum=False):
                    raise DataError(damage_line(self.path, entry, why))
        self.epoch, self.position = 0, 0
        self._handles: dict[int, object] = {}  # shard -> open safe_open handle (memory-mapped)
        self._cap_starts: dict[int, list[int]] = {}  # shard -> row offset of each sample's caption
        self._order: tuple[int, Tensor] | None = None  # (epoch, this rank's indices) cache

    def __len__(self) -> int:
        return self.num_samples

    # --- verification ----------------------------------------------------------------------------
    def verify_shards(self, shards: Iterable[int] | None = None) -> str | None:
        """Check these shards' sha256 now (default: all); the first problem as one line, or None.
        Checked shards are not hashed again when opened."""
        for k in range(len(self.shards)) if shards is None else shards:
            if k in self._verified:
                continue
            if why := shard_damage(self.path, self.shards[k]):
                return damage_line(self.path, self.shards[k], why)
            self._verified.add(k)
        return None

    def mark_verified(self, shards: Iterable[int] | None = None) -> None:
        """Trust these shards (default: all) without hashing them: other ranks checked them."""
        self._verified.update(range(len(self.shards)) if shards is None else shards)

    # --- random access ---------------------------------------------------------------------------
    def _open(self, k: int):
        if k not in self._handles:
            # Before the first read of a shard: a damaged one is refused, never trained on. The hash
            # reads the whole file once; the memory map then mostly hits the page cache.
            if self.verify and (problem := self.verify_shards([k])):
                raise DataError(problem)
            handle = safe_open(self.path / self.shards[k]["file"], framework="pt")
            lens = handle.get_tensor("cap_lens").tolist()
            self._cap_starts[k] = np.concatenate([[0], np.cumsum(lens)]).tolist()
            self._handles[k] = handle
        return self._handles[k]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range 0..{self.num_samples - 1}")
        k = bisect.bisect_right(self._firsts, i) - 1
        j = i - self._firsts[k]
        f = self._open(k)
        a, b = self._cap_starts[k][j], self._cap_starts[k][j + 1]
        keys = f.keys()
        return {
            "index": i,
            "seed": int(f.get_slice("seeds")[j : j + 1][0]),
            "latents": f.get_slice("latents")[j : j + 1][0].float(),
            "cap_feats": f.get_slice("cap_feats")[a:b].float(),
            "pooled": f.get_slice("pooled")[j : j + 1][0].float(),
            "clip": f.get_slice("clip")[j : j + 1][0].float() if "clip" in keys else None,
        }

    # --- the per-epoch, per-rank order -----------------------------------------------------------
    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for `epoch`, in visiting order."""
        if self._order is None or self._order[0] != epoch:
            # numpy's PCG64 seeded with the pair (seed, epoch): the same permutation on every machine.
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            mine = perm[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]
            self._order = (epoch, torch.from_numpy(mine.astype(np.int64)))
        return self._order[1]

    def _advance(self) -> int:
        i = int(self.epoch_indices(self.epoch)[self.position])
        self.position += 1
        if self.position == self.samples_per_rank:
            self.epoch, self.position = self.epoch + 1, 0
        return i

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch, one sample dict at a time (the state advances as it goes)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self[self._advance()]

    def next_batch(self, batch_size: int) -> ShardBatch:
        """The next `batch_size` samples of this rank's order, continuing into the next epoch if needed."""
        samples = [self[self._advance()] for _ in range(batch_size)]
        clip = [s["clip"] for s in samples]
        return ShardBatch(
            latents=torch.stack([s["latents"] for s in samples]),
            cap_feats=[s["cap_feats"] for s in samples],
            pooled=torch.stack([s["pooled"] for s in samples]),
            clip=None if clip[0] is None else torch.stack(clip),
            indices=torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            seeds=torch.tensor([s["seed"] for s in samples], dtype=torch.int64),
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["position"] < self.samples_per_rank:
            raise ValueError(f"position {state['position']} is outside this rank's {self.samples_per_rank} samples")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None
