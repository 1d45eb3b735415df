"""The teacher-data format: manifest, shards, checksums, teacher fingerprint, `ladd data check`, and
the training reader `ShardDataset`. `docs/data-format.md` describes the files for readers without ladd.

    OUT/manifest.json              what made the data (teacher fingerprint, sampling, seed rule, buckets)
    OUT/prompts.jsonl              {"prompt", "width", "height"} per line, in sample order
    OUT/shard-00000.safetensors    latents, seeds, indices, cap_feats, cap_lens, pooled[, clip][, states]; one bucket each
    OUT/images/00000.png           with --decode-first K: the first K teacher images

No pickle anywhere: JSON and safetensors only. A shard is written under a temporary name and renamed
when complete, so a shard file that exists is whole; its sha256 in the manifest catches later damage.

Samples come in aspect-ratio buckets (ladd/data/buckets.py): a shard holds one bucket's samples, the
bucket's sample indices in increasing order, `shard_size` at a time (`shard_plan`). Format version 1
(one square resolution, before buckets) is read as one bucket.

    ds = ShardDataset("runs/teacher", rank=r, world_size=w, seed=0, batch_size=4,
                      expect_fingerprint=teacher_fingerprint(dir))
    batch = ds.next_batch()        # latents (4, C, H, W) float32 of one bucket, cap_feats list, pooled, ...
    state = ds.state_dict()        # {"epoch", "position", "seed", "batch_size"}: load_state_dict resumes exactly
"""

from __future__ import annotations

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
from ladd.data.buckets import Bucket

FORMAT = "ladd-teacher-latents"
FORMAT_VERSION = 2  # 2: aspect-ratio buckets; 1: one square resolution (still read)
READABLE_VERSIONS = (1, 2)
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


def prompts_jsonl(prompts: list[str], sizes: list[tuple[int, int]] | None = None) -> bytes:
    """prompts.jsonl: one {"prompt", "width", "height"} per sample (format 1 had the prompt alone)."""
    if sizes is None:
        return "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts).encode()
    return "".join(json.dumps({"prompt": p, "width": w, "height": h}, ensure_ascii=False) + "\n"
                   for p, (w, h) in zip(prompts, sizes)).encode()


def shard_plan(sample_bucket: np.ndarray, num_buckets: int, shard_size: int) -> list[tuple[int, np.ndarray]]:
    """(bucket, sample indices) of each shard, in file order: bucket by bucket, each bucket's samples in
    increasing index order, `shard_size` at a time. One bucket gives the contiguous shards of format 1."""
    plan = []
    for b in range(num_buckets):
        members = np.flatnonzero(sample_bucket == b).astype(np.int64)
        plan += [(b, members[i : i + shard_size]) for i in range(0, len(members), shard_size)]
    return plan


def write_shard(path: Path, tensors: dict[str, Tensor], bucket: str) -> tuple[str, int]:
    """One shard file; returns (sha256, bytes). The metadata makes a shard self-describing."""
    count = len(tensors["seeds"])
    # One metadata key: safetensors keeps metadata in a hash map whose order changes from process to
    # process, and the bytes of a shard must not.
    meta = {"ladd": json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "bucket": bucket,
                                "count": count}, sort_keys=True)}
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
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise DataError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
            f"expected {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))} (a newer ladd wrote it?)"
        )
    if require_complete and not manifest.get("complete"):
        raise DataError(f"{path}: precompute has not finished (rerun the same `ladd precompute` command)")
    return manifest


class Layout(NamedTuple):
    """Where every sample lives: the data's buckets, each sample's bucket, each shard's sample indices."""

    buckets: list[Bucket]
    latent_shapes: list[tuple[int, int, int]]  # per bucket, (C, H, W)
    sample_bucket: np.ndarray  # (N,) int64 bucket index of each sample
    shard_samples: list[np.ndarray]  # per manifest shard, its sample indices in row order
    shard_bucket: list[int]  # per manifest shard, its bucket index

    def bucket_counts(self) -> list[int]:
        return np.bincount(self.sample_bucket, minlength=len(self.buckets)).tolist()


def layout(root: str | Path, manifest: dict) -> Layout:
    """The data's layout; format 1 is one square bucket with contiguous shards. For format 2 the bucket
    of each sample is read from prompts.jsonl; a disagreement with the manifest is a DataError."""
    root = Path(root)
    n = manifest["num_samples"]
    if manifest["format_version"] == 1:
        r = manifest["sampling"]["resolution"]
        buckets, shapes = [Bucket(r, r)], [tuple(manifest["storage"]["latent_shape"])]
        samples = [np.arange(e["first"], e["first"] + e["count"], dtype=np.int64) for e in manifest["shards"]]
        return Layout(buckets, shapes, np.zeros(n, np.int64), samples, [0] * len(samples))
    buckets = [Bucket(int(b["width"]), int(b["height"]), float(b.get("weight", 1.0))) for b in manifest["buckets"]]
    shapes = [tuple(b["latent_shape"]) for b in manifest["buckets"]]
    index = {(b.width, b.height): k for k, b in enumerate(buckets)}
    try:
        lines = (root / PROMPTS).read_text(encoding="utf-8").splitlines()
        sample_bucket = np.array([index[(o["width"], o["height"])] for o in map(json.loads, lines)], np.int64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{root / PROMPTS}: cannot read each sample's bucket ({type(err).__name__}: {err}); "
                        f"{REPAIR}") from None
    names = [b.name for b in buckets]
    plan = shard_plan(sample_bucket, len(buckets), manifest["storage"]["shard_size"])
    if len(sample_bucket) != n or [(names[b], len(ix)) for b, ix in plan] != [
            (e["bucket"], e["count"]) for e in manifest["shards"]]:
        raise DataError(f"{root}: {PROMPTS} and {MANIFEST} disagree about the samples' buckets; {REPAIR}")
    return Layout(buckets, shapes, sample_bucket, [ix for _, ix in plan], [b for b, _ in plan])


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
    try:
        where = layout(path, manifest)
    except DataError as err:
        return problems + [str(err)]
    for entry, samples, b in zip(manifest["shards"], where.shard_samples, where.shard_bucket):
        if problem := _check_shard(path, manifest, entry, samples, where.latent_shapes[b]):
            problems.append(f"{entry['file']}: {problem}")
    missing = [image_name(i) for i in range(manifest["decode_first"]) if not (path / IMAGES / image_name(i)).is_file()]
    if missing:
        problems.append(f"{IMAGES}/{missing[0]}: missing ({len(missing)} of {manifest['decode_first']} images)")
    return problems


def _check_shard(root: Path, manifest: dict, entry: dict, samples: np.ndarray, latent_shape) -> str | None:
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
    n = entry["count"]
    storage = manifest["storage"]
    try:
        with safe_open(file, framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 — any parse failure is a broken shard, reported as such
        return f"not a readable safetensors file ({err})"
    expect = {
        "latents": (n, *latent_shape),
        "seeds": (n,),
        "cap_lens": (n,),
        "pooled": (n, storage["cap_feat_dim"]),
    }
    if storage.get("clip_dim"):
        expect["clip"] = (n, storage["clip_dim"])
    if trajectory := manifest["sampling"].get("trajectory"):
        expect["states"] = (n, len(trajectory), *latent_shape)
    if manifest["format_version"] >= 2:
        expect["indices"] = (n,)
    for key, shape in expect.items():
        if key not in t:
            return f"no tensor {key!r}"
        if tuple(t[key].shape) != shape:
            return f"{key} has shape {tuple(t[key].shape)}, expected {shape}"
    if "cap_feats" not in t or tuple(t["cap_feats"].shape) != (int(t["cap_lens"].sum()), storage["cap_feat_dim"]):
        return "cap_feats do not match cap_lens"
    indices = torch.from_numpy(samples)
    if "indices" in t and not torch.equal(t["indices"], indices):
        return f"its samples are not bucket {entry['bucket']}'s in the manifest's order"
    if not torch.equal(t["seeds"], manifest["sampling"]["seed"] + indices):
        return "seeds do not follow the seed rule (seed + sample index)"
    for key in ("latents", "cap_feats", "pooled", "clip", "states"):
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
    states: Tensor | None = None  # (B, K, C, H, W) float32: the teacher's path at the data's `trajectory` σ


class ShardDataset:
    """Random-access, memory-mapped reader of precomputed teacher data for training, in buckets.

    Each epoch is a permutation of all samples drawn from (seed, epoch). Each bucket's samples, in that
    order, are cut into steps of `world_size · batch_size` (a bucket's remainder is dropped, differently
    each epoch), and the steps are visited in the order of their first sample in the permutation — so
    buckets interleave in proportion to their sizes. Rank r takes entries r, r + w, … of each step: ranks
    never overlap, every micro-batch has one shape, and at every step all ranks hold the same bucket
    (FSDP's collectives see equal shapes). With one bucket this is the strided slice perm[r::w].
    `state_dict()` is the epoch and the micro-batch position in it: loading it continues exactly.

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
        batch_size: int = 1,
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.shards = self.manifest["shards"]
        self.num_samples = self.manifest["num_samples"]
        self.trajectory = tuple(self.manifest["sampling"].get("trajectory", ()))  # σ of `states`, if stored
        where = layout(self.path, self.manifest)
        self.buckets, self.latent_shapes, self.sample_bucket = where.buckets, where.latent_shapes, where.sample_bucket
        self.bucket_counts = where.bucket_counts()
        # sample index -> (shard, row)
        self._shard_of = np.empty(self.num_samples, np.int64)
        self._row_of = np.empty(self.num_samples, np.int64)
        for k, ix in enumerate(where.shard_samples):
            self._shard_of[ix], self._row_of[ix] = k, np.arange(len(ix))
        step = world_size * batch_size
        # Buckets too small to fill one step are never visited; the trainer refuses them (`never_visited`).
        self.never_visited = [(b, n) for b, n in zip(self.buckets, self.bucket_counts) if n < step]
        if len(self.never_visited) == len(self.buckets):
            raise DataError(f"{self.path}: {self.num_samples} samples cannot fill one step of {batch_size} per rank "
                            f"on {world_size} rank(s) in any bucket")
        self.batches_per_epoch = sum(n // step for n in self.bucket_counts)  # per rank
        self.samples_per_rank = self.batches_per_epoch * batch_size
        self.verify = verify
        self._verified: set[int] = set()  # shards whose sha256 this process has checked (or was told to trust)
        if verify:  # truncation and missing files at start, before any model time is spent
            for entry in self.shards:
                if why := shard_damage(self.path, entry, checksum=False):
                    raise DataError(damage_line(self.path, entry, why))
        self.epoch, self.position = 0, 0
        self._handles: dict[int, object] = {}  # shard -> open safe_open handle (memory-mapped)
        self._cap_starts: dict[int, list[int]] = {}  # shard -> row offset of each sample's caption
        self._order: tuple[int, Tensor] | None = None  # (epoch, this rank's micro-batches) cache

    def __len__(self) -> int:
        return self.num_samples

    def bucket_of(self, i: int) -> Bucket:
        return self.buckets[int(self.sample_bucket[i])]

    def bucket_members(self) -> list[list[int]]:
        """Each bucket's sample indices, in increasing order."""
        return [np.flatnonzero(self.sample_bucket == b).tolist() for b in range(len(self.buckets))]

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
        k, j = int(self._shard_of[i]), int(self._row_of[i])
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
            "states": f.get_slice("states")[j : j + 1][0].float() if "states" in keys else None,
        }

    # --- the per-epoch, per-rank order -----------------------------------------------------------
    def epoch_batches(self, epoch: int) -> Tensor:
        """This rank's micro-batches for `epoch`, in visiting order: (batches_per_epoch, batch_size)."""
        if self._order is None or self._order[0] != epoch:
            # numpy's PCG64 seeded with the pair (seed, epoch): the same permutation on every machine.
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            step = self.world_size * self.batch_size
            steps = []  # (position in perm of the step's first sample, the step's samples)
            for b in range(len(self.buckets)):
                at = np.flatnonzero(self.sample_bucket[perm] == b)  # perm positions of bucket b, in order
                usable = len(at) // step * step
                steps += [(int(at[i]), perm[at[i : i + step]]) for i in range(0, usable, step)]
            steps.sort(key=lambda s: s[0])
            mine = np.stack([s[self.rank :: self.world_size] for _, s in steps])
            self._order = (epoch, torch.from_numpy(mine.astype(np.int64)))
        return self._order[1]

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for `epoch`, in visiting order."""
        return self.epoch_batches(epoch).flatten()

    def _advance(self) -> Tensor:
        batch = self.epoch_batches(self.epoch)[self.position]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch, one sample dict at a time (the state advances a micro-batch at a time)."""
        epoch = self.epoch
        while self.epoch == epoch:
            for i in self._advance().tolist():
                yield self[i]

    def next_batch(self, batch_size: int | None = None) -> ShardBatch:
        """The next micro-batch of this rank's order (one bucket), continuing into the next epoch if needed."""
        if batch_size is not None and batch_size != self.batch_size:
            raise ValueError(f"this reader was built for micro-batches of {self.batch_size}, not {batch_size}")
        return self.batch(self._advance().tolist())

    def batch(self, indices: list[int]) -> ShardBatch:
        """These samples as one batch (they must share a bucket)."""
        samples = [self[i] for i in indices]
        clip, states = [s["clip"] for s in samples], [s["states"] for s in samples]
        return ShardBatch(
            latents=torch.stack([s["latents"] for s in samples]),
            cap_feats=[s["cap_feats"] for s in samples],
            pooled=torch.stack([s["pooled"] for s in samples]),
            clip=None if clip[0] is None else torch.stack(clip),
            indices=torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            seeds=torch.tensor([s["seed"] for s in samples], dtype=torch.int64),
            states=None if states[0] is None else torch.stack(states),
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if "batch_size" not in state:  # before buckets the position counted samples, not micro-batches
            if position % self.batch_size:
                raise ValueError(f"position {position} (samples) is not a whole number of micro-batches of "
                                 f"{self.batch_size}")
            position //= self.batch_size
        elif int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"the saved reader used micro-batches of {state['batch_size']}, this one "
                             f"{self.batch_size}: resume with the same data.batch_per_rank")
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"position {position} is outside this rank's {self.batches_per_epoch} micro-batches")
        self.epoch, self.position, self.seed = int(state["epoch"]), position, int(state["seed"])
        self._order = None
