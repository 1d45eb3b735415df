"""Atomic writes: a file appears whole or not at all, whoever else is writing or reading it.

Every writer goes through `replacing`: the content is written to a temporary name beside the target
and renamed over it (`os.replace` is atomic on one filesystem), so a killed process or a full disk
leaves the old file or none, never half of a new one. Names are unique per process by default:
parallel sweep trials share evaluation caches and may race to write the same entry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 64 << 20  # large buffers are written in 64 MiB pieces (one huge write() can fail on some filesystems)


@contextmanager
def replacing(path: str | Path, unique: bool = True) -> Iterator[Path]:
    """Yield a temporary path; when the block ends without error it replaces `path`, else it is removed.
    `unique=False` names it `<name>.tmp` (one writer per file, and a rerun can find a killed write's)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if unique else f"{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write; after os.replace there is nothing left to remove


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False, unique: bool = True) -> None:
    """`data` to `path` atomically; `fsync` also forces it to the disk before the rename."""
    with replacing(path, unique) as tmp, open(tmp, "wb") as f:
        _write_chunks(f, data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _write_chunks(f, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        f.write(view[start : start + CHUNK])


def write_text(path: str | Path, text: str, **kwargs) -> None:
    write_bytes(path, text.encode(), **kwargs)
