"""Faults in teacher data and in precompute (issue 19): data damaged after precompute is never trained
on, a rerun of precompute repairs it, and a preempted precompute stops cleanly and resumes exactly."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ladd.cli import main
from ladd.data import shards as fmt
from ladd.data.shards import DataError, ShardDataset

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [f"a shape number {i} " + "and more " * (i % 4) for i in range(7)]
STOP_LINE = re.compile(r"precompute: stopped by SIGTERM after shard (\d+) \((\d+) of (\d+) samples done\); "
                       r"rerun the same command to continue")


@pytest.fixture(scope="module")
def world(tiny_pipe, tmp_path_factory):
    """(root, precompute args without --out, clean dataset): 7 samples in shards 3 + 3 + 1, 2 steps,
    one prompt per batch (the bytes depend on the batch size, so every run here uses the same)."""
    root = tmp_path_factory.mktemp("faults")
    tiny_pipe.save_pretrained(root / "tiny", safe_serialization=True)
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = [str(a) for a in ["precompute", "--pipeline", root / "tiny", "--prompts", root / "p.txt", "--steps", 2,
                             "--shard-size", 3, "--batch-size", 1]]
    assert main(args + ["--out", str(root / "clean")]) == 0
    return root, args, root / "clean"


def _copy(clean: Path, to: Path) -> Path:
    shutil.copytree(clean, to)
    return to


def _flip(path: Path, n: int = 16) -> None:
    """Flip n bytes in the middle of a file (the tensor data), size unchanged."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_flipped_bytes_are_refused_when_the_shard_is_opened(world, tmp_path):
    bad = _copy(world[2], tmp_path / "bad")
    _flip(bad / fmt.shard_name(1))
    ds = ShardDataset(bad, batch_size=7)  # the size is right: construction passes
    assert ds[0]["latents"].shape == ds[6]["latents"].shape  # shards 0 and 2 are whole and readable
    with pytest.raises(DataError) as err:
        ds[3]
    line = str(err.value)
    assert "\n" not in line and line.startswith(str(bad / "shard-00001.safetensors") + ": checksum mismatch (expected sha256:")
    assert "found sha256:" in line and "rerun `ladd precompute` with the same arguments" in line
    with pytest.raises(DataError, match="checksum mismatch"):  # refused every time, not only the first
        ds.next_batch()
    assert ShardDataset(bad, verify=False)[3]["index"] == 3  # the explicit opt-out reads it as it is
    assert ShardDataset(world[2]).verify_shards() is None
    assert "shard-00001.safetensors: checksum mismatch" in ShardDataset(bad).verify_shards()


def test_truncated_or_missing_shard_is_refused_at_construction(world, tmp_path):
    bad = _copy(world[2], tmp_path / "bad")
    last = bad / fmt.shard_name(2)
    size = last.stat().st_size
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        ShardDataset(bad)
    assert str(err.value) == (f"{last}: truncated ({size - 100:,} of {size:,} bytes); the file was damaged after "
                              f"precompute wrote it — {fmt.REPAIR}")
    last.unlink()
    with pytest.raises(DataError, match=r"shard-00002.safetensors: missing; the file was removed"):
        ShardDataset(bad)


def test_train_on_damaged_data_stops_with_one_line_and_no_checkpoint(world, tmp_path, capsys):
    root = world[0]
    data = _copy(world[2], tmp_path / "data")
    for k in (1, 2):  # not shard 0: the run's preflight and validation read it before the first step
        _flip(data / fmt.shard_name(k))
    out = tmp_path / "run"
    sets = {
        "model.pipeline": f'"{root / "tiny"}"', "data.path": f'"{data}"', "train.out": f'"{out}"',
        "model.disc_layers": "[1]", "model.disc_hidden": "32", "model.disc_cond_dim": "32",
        "train.steps": "4", "train.checkpoint_every": "1", "validation.every": "0", "validation.num_prompts": "1",
        "health.collapse_window": "1000",
    }
    rc = main(["train"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ladd ")]
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("ladd train: error: ") and "checksum mismatch" in err[0], err
    assert "rerun `ladd precompute`" in err[0]
    assert not any((out / "checkpoints").glob("step-*"))


def test_rerun_of_precompute_repairs_a_damaged_shard(world, tmp_path, capsys):
    _, args, clean = world
    bad = _copy(clean, tmp_path / "bad")
    _flip(bad / fmt.shard_name(1))
    assert main(["data", "check", str(bad)]) == 1
    assert "to repair: rerun the `ladd precompute` command" in capsys.readouterr().out
    first = (bad / fmt.shard_name(0)).stat().st_mtime_ns
    assert main(args + ["--out", str(bad)]) == 0
    stdout = capsys.readouterr().out
    assert "shard-00001.safetensors: checksum mismatch" in stdout and "repairing: 1 damaged shard(s)" in stdout
    assert (bad / fmt.shard_name(0)).stat().st_mtime_ns == first  # whole shards are not rewritten
    assert _files(bad) == _files(clean)
    assert main(args + ["--out", str(bad)]) == 0 and "nothing to do" in capsys.readouterr().out


def test_sigterm_stops_after_the_batch_in_flight_and_resumes_exactly(world, tmp_path, capsys, monkeypatch):
    """In process and deterministic: the signal arrives during the second batch of shard 1."""
    import ladd.sampling

    _, args, clean = world
    args = args + ["--out", str(tmp_path / "out")]
    real_sample, calls = ladd.sampling.euler_sample, []

    def before(signum, frame):  # the handler outside the job: it must not see the job's signal
        raise AssertionError("SIGTERM reached the handler installed before the job")

    def sample_and_get_signalled(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # shard 0 took batches 1-3; this is shard 1's second
            os.kill(os.getpid(), signal.SIGTERM)  # as SLURM before preemption
        return real_sample(*a, **k)

    monkeypatch.setattr(ladd.sampling, "euler_sample", sample_and_get_signalled)
    previous = signal.signal(signal.SIGTERM, before)
    try:
        assert main(args) == 0
        assert signal.getsignal(signal.SIGTERM) is before  # the job's handler is gone with the job
    finally:
        signal.signal(signal.SIGTERM, previous)
    monkeypatch.undo()
    assert len(calls) == 5  # the batch in flight finished, no other started
    stopped = [line for line in capsys.readouterr().out.splitlines() if "stopped" in line]
    assert stopped == ["precompute: stopped by SIGTERM after shard 0 (3 of 7 samples done); "
                       "rerun the same command to continue"]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == ["shard-00000.safetensors"]
    assert not list(out.glob("*.tmp")) and not fmt.read_manifest(out, require_complete=False)["complete"]
    assert main(args) == 0
    assert _files(out) == _files(clean)


@pytest.mark.slow
def test_sigterm_to_a_precompute_process(world, tmp_path):
    """A real process, signalled once its first shard appears: exit 0, one line, nothing half-written,
    and the same command finishes it, byte-identical to an uninterrupted run."""
    root = world[0]
    prompts = root / "p8.txt"
    prompts.write_text("\n".join(f"prompt {i} " + "word " * i for i in range(8)) + "\n")
    # 24 steps: ~0.1 s per sample on the tiny pipeline, so the signal lands well before the end.
    args = [str(a) for a in ["precompute", "--pipeline", root / "tiny", "--prompts", prompts, "--steps", 24,
                             "--shard-size", 2, "--batch-size", 1]]
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "ladd", *args, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / fmt.shard_name(0)).is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "precompute ended before its first shard"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    lines = [m for line in stdout.splitlines() if (m := STOP_LINE.fullmatch(line))]
    assert len(lines) == 1, stdout
    last, done, total = map(int, lines[0].groups())
    assert total == 8 and done == 2 * (last + 1) and last < 3
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [fmt.shard_name(k) for k in range(last + 1)]
    assert not list(out.glob("*.tmp"))
    assert main(args + ["--out", str(out)]) == 0
    assert main(args + ["--out", str(tmp_path / "clean")]) == 0
    assert _files(out) == _files(tmp_path / "clean")
