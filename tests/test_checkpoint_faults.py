"""Checkpoint faults (issue 19): a damaged checkpoint is found before it is loaded and the run falls
back to the newest good one, saying so in one line; a full disk fails a save in one line with the
previous checkpoint intact; `train.keep_last` never deletes the newest checkpoint that verifies."""

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ladd.config import load_config
from ladd.distributed import Dist
from ladd.train.checkpoint import Checkpointer, CheckpointError, TrainState, load_weights
from tests.worlds import make_train_world, train_overrides

SIX = "step-00000006"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_train_world(tmp_path_factory.mktemp("faults"))


def overrides(root, out, steps=6, **extra):
    return train_overrides(root, out, steps, **{"validation.every": "0", "validation.num_prompts": "2", **extra})


def run_cli(args, env_extra=None, nproc=1, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = [sys.executable, "-m", "ladd"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "ladd"]
    cmd = launcher + ["train"] + [a for o in args for a in ("--set", o)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def train(world, out, steps=6):
    from ladd.train.loop import train as train_

    return train_(load_config(None, overrides(world, out, steps)))


@pytest.fixture(scope="module")
def reference(world):
    """An unbroken 6-step run (checkpoints at 4 and 6) and its final student and disc."""
    out = world / "unbroken"
    train(world, out)
    return out, {part: load_weights(out / "checkpoints" / SIX, part) for part in ("student", "disc")}


def assert_same_weights(out, reference):
    for part, ref in reference[1].items():
        got = load_weights(out / "checkpoints" / SIX, part)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), part


def flip_student_bytes(folder):
    """Invert 4 bytes in the middle of the largest student tensor, in place (the file keeps its size)."""
    from torch.distributed.checkpoint import FileSystemReader

    chunks = FileSystemReader(str(folder)).read_metadata().storage_data
    info = max((s for i, s in chunks.items() if i.fqn.startswith("student.model.")), key=lambda s: s.length)
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        data = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(folder):
    shard = folder / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    return f"__0_0.distcp: {size // 2:,} bytes, expected {size:,}"


def delete(folder):
    (folder / "__0_0.distcp").unlink()
    return "__0_0.distcp is missing"


def flip(folder):
    flip_student_bytes(folder)
    return "__0_0.distcp: its bytes differ from its CRC-32 in manifest.json"


@pytest.mark.parametrize("damage", [truncate, delete, flip])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(world, reference, tmp_path, capsys, damage):
    """COMPLETE still there, the newest checkpoint cut short / missing a shard / with flipped bytes:
    the rerun says so in one line, resumes from the one before and ends bit-identical to a run
    that was never damaged."""
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    reason = damage(out / "checkpoints" / SIX)
    capsys.readouterr()
    train(world, out)
    stdout = capsys.readouterr().out
    assert f"checkpoint {SIX} is damaged ({reason}); falling back to step-00000004\n" in stdout
    assert f"resumed from {out / 'checkpoints' / 'step-00000004'} at step 4" in stdout
    assert_same_weights(out, reference)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["dcp_shard", "rank_file"])
def test_a_full_disk_fails_the_save_in_one_line_and_the_rerun_resumes(world, reference, tmp_path, monkeypatch,
                                                                      capsys, where):
    """The disk fills up while step 4 is saved (inside DCP's shard write, or at this rank's own file,
    by LADD_FAULT): one line says so, step 2 is intact, no .tmp is left; with space again the same
    command resumes from step 2 and ends bit-identical to the unbroken run."""
    if where == "dcp_shard":
        import torch.distributed.checkpoint.filesystem as fs

        real = fs._write_item

        def write_item(transforms, stream, *args):
            if "step-00000004" in str(getattr(stream, "name", "")):
                stream.write(b"\0" * 1000)  # part of the shard made it to disk
                _enospc()
            return real(transforms, stream, *args)

        monkeypatch.setattr(fs, "_write_item", write_item)
    else:
        monkeypatch.setenv("LADD_FAULT", "disk_full:4")
    out = tmp_path / "full"
    with pytest.raises(CheckpointError) as failed:
        train(world, out)
    assert str(failed.value) == ("could not write checkpoint step-00000004: No space left on device; the previous "
                                 "checkpoint step-00000002 is intact; free space and rerun the same command to resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert Checkpointer(out / "checkpoints", None).latest().name == "step-00000002"
    if where == "rank_file":
        return  # the rerun is the same as after a failed shard write
    monkeypatch.undo()  # space again
    capsys.readouterr()
    train(world, out)
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in capsys.readouterr().out
    assert_same_weights(out, reference)


def _save(ckpt, step):
    ckpt.save(step, {"w": torch.full((8,), float(step))}, TrainState(), {}, {})


@pytest.mark.parametrize("keep_last, kept", [(1, ["step-00000003", "step-00000004"]),
                                             (2, ["step-00000002", "step-00000003", "step-00000004"])])
def test_keep_last_never_deletes_the_newest_checkpoint_that_verifies(tmp_path, capsys, keep_last, kept):
    """Checkpoints 2 and 4, then 4 is damaged; the rerun resumes from 2 and saves 3. Pruning counts
    only checkpoints that verify, so 3 (and with keep_last = 2, also 2) stays; the damaged 4, newer
    than every good one, is left for the run to overwrite when it gets there."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        _save(Checkpointer(root, Dist(), keep_last=2), step)
    truncate(root / "step-00000004")
    ckpt = Checkpointer(root, Dist(), keep_last=keep_last)  # the rerun's
    assert ckpt.latest().name == "step-00000002"
    assert "checkpoint step-00000004 is damaged" in capsys.readouterr().out
    _save(ckpt, 3)
    assert [p.name for p in ckpt.finished()] == kept
    assert ckpt.latest().name == "step-00000003"


def test_latest_needs_no_collective_once_this_run_has_resumed_or_saved(tmp_path, monkeypatch):
    """After a rank died the loop still names the last checkpoint: `latest()` then answers from the
    verdicts every rank agreed on (the resume's walk, this run's saves) and waits on no other rank."""
    import ladd.distributed

    def dead_peer(*args):
        raise RuntimeError("a collective with a dead rank")

    root = tmp_path / "checkpoints"
    ckpt = Checkpointer(root, Dist())
    assert ckpt.latest() is None  # the resume's walk: nothing there yet
    _save(ckpt, 2)
    ckpt.dist = Dist(rank=0, world_size=2)  # from here on, as rank 0 of two whose rank 1 is gone
    monkeypatch.setattr(ladd.distributed, "broadcast0", dead_peer)
    monkeypatch.setattr(ladd.distributed, "sum_over_ranks", dead_peer)
    assert ckpt.latest().name == "step-00000002"
    fresh = Checkpointer(tmp_path / "none", Dist())
    assert fresh.latest() is None
    fresh.dist = Dist(rank=0, world_size=2)
    assert fresh.latest() is None


def test_checkpoints_without_a_manifest_still_load_and_none_verifying_is_an_error(tmp_path, capsys):
    """A checkpoint from before manifests loads (its .metadata still shows a cut shard); when no
    checkpoint verifies, resuming is refused in one line rather than silently starting from step 0."""
    root = tmp_path / "checkpoints"
    _save(Checkpointer(root, Dist()), 2)
    (root / "step-00000002" / "manifest.json").unlink()
    assert Checkpointer(root, None).latest().name == "step-00000002"
    assert "note: step-00000002 predates checkpoint manifests" in capsys.readouterr().out
    shard = root / "step-00000002" / "__0_0.distcp"
    need = shard.stat().st_size
    os.truncate(shard, 10)
    with pytest.raises(CheckpointError) as none:
        Checkpointer(root, None).latest()
    assert str(none.value) == (f"no checkpoint in {root} verifies: step-00000002 (__0_0.distcp: 10 bytes, "
                               f".metadata needs {need:,}); restore them, or move them away to start this run "
                               "from step 0")


@pytest.mark.slow
def test_two_ranks_agree_on_a_failed_save_and_on_the_fallback(world):
    """2 ranks: rank 1's disk fills up at the step-6 save -> both stop with the one line (no hang);
    then rank 1's shard of step 4 gets flipped bytes, which only rank 1 reads when verifying -> both
    ranks fall back to step 2 and the run completes."""
    out = world / "two-ranks"
    proc = run_cli(overrides(world, out), {"LADD_FAULT": "disk_full:6:1"}, nproc=2)
    assert proc.returncode != 0
    assert ("could not write checkpoint step-00000006 on rank 1: No space left on device; the previous "
            "checkpoint step-00000004 is intact") in proc.stdout + proc.stderr
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000004"]
    with open(ckpts / "step-00000004" / "__1_0.distcp", "r+b") as f:
        f.seek(f.seek(0, os.SEEK_END) // 2)
        data = f.read(4)
        f.seek(-4, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))
    proc = run_cli(overrides(world, out), nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("checkpoint step-00000004 is damaged (__1_0.distcp: its bytes differ from its CRC-32 in "
            "manifest.json); falling back to step-00000002\n") in proc.stdout
    assert f"resumed from {ckpts / 'step-00000002'} at step 2" in proc.stdout
    assert (ckpts / SIX / "COMPLETE").is_file()
