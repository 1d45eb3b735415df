"""The teacher fingerprint's cache: hashed once, hashed again on any change to the weight files."""

import json
import os

import pytest

from ladd import files
from ladd.data import shards
from ladd.data.shards import FINGERPRINT_CACHE, teacher_fingerprint


@pytest.fixture()
def pipeline(tmp_path, monkeypatch):
    """A pipeline folder whose transformer has a config and two weight shards; hash calls counted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    tr = tmp_path / "pipe" / "transformer"
    tr.mkdir(parents=True)
    (tr / "config.json").write_text('{"dim": 64}')
    for k in range(2):
        (tr / f"diffusion_pytorch_model-0000{k}.safetensors").write_bytes(os.urandom(4096))
    calls = []
    real = shards._hash_files
    monkeypatch.setattr(shards, "_hash_files", lambda paths: calls.append(paths) or real(paths))
    return tmp_path / "pipe", tr, calls


def test_unchanged_files_are_not_hashed_again(pipeline):
    pipe, tr, calls = pipeline
    first = teacher_fingerprint(pipe)
    assert len(calls) == 1 and (tr / FINGERPRINT_CACHE).is_file()
    assert teacher_fingerprint(pipe) == first and len(calls) == 1
    assert first == shards._hash_files(calls[0])  # the cached value is the hash itself


def test_a_changed_weight_file_is_hashed_again(pipeline):
    pipe, tr, calls = pipeline
    first = teacher_fingerprint(pipe)
    shard = tr / "diffusion_pytorch_model-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1  # same size, other bytes, new mtime
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    second = teacher_fingerprint(pipe)
    assert len(calls) == 2 and second != first
    assert teacher_fingerprint(pipe) == second and len(calls) == 2


def test_touch_added_and_removed_files_invalidate(pipeline):
    pipe, tr, calls = pipeline
    first = teacher_fingerprint(pipe)
    shard = tr / "diffusion_pytorch_model-00000.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again, same value
    assert teacher_fingerprint(pipe) == first and len(calls) == 2
    (tr / "extra.safetensors").write_bytes(b"x")
    assert teacher_fingerprint(pipe) != first and len(calls) == 3
    (tr / "extra.safetensors").unlink()
    assert teacher_fingerprint(pipe) == first and len(calls) == 4


def test_read_only_folder_caches_in_the_user_dir(pipeline, monkeypatch, tmp_path):
    pipe, tr, calls = pipeline
    write = files.write_text

    def refuse_model_folder(path, text, **kw):
        if tr in path.parents:
            raise PermissionError(13, "Permission denied")  # what a read-only model folder raises
        write(path, text, **kw)

    monkeypatch.setattr(files, "write_text", refuse_model_folder)
    first = teacher_fingerprint(pipe)
    assert not (tr / FINGERPRINT_CACHE).exists()
    (cached,) = (tmp_path / "user-cache" / "ladd" / "fingerprints").iterdir()
    assert json.loads(cached.read_text())["fingerprint"] == first
    assert teacher_fingerprint(pipe) == first and len(calls) == 1


def test_damaged_or_moved_cache_means_hashing_again(pipeline, tmp_path):
    pipe, tr, calls = pipeline
    first = teacher_fingerprint(pipe)
    (tr / FINGERPRINT_CACHE).write_text("{not json")
    assert teacher_fingerprint(pipe) == first and len(calls) == 2
    moved = tmp_path / "moved"
    pipe.rename(moved)  # the cache names its folder: a copy elsewhere is hashed, not trusted
    assert teacher_fingerprint(moved) == first and len(calls) == 3
