"""Cluster faults end in "continued exactly" or "stopped with one line, nothing lost": preemption
signals and the wall-clock budget (checkpoint, exit 0, resume bit-identically), a dead rank (the
survivors exit within seconds naming it; the rerun resumes exactly), a non-finite loss on one rank
(every rank skips the update together), and a health stop decided from rank-averaged metrics (every
rank stops at the same step, no hang). docs/training.md "Faults" lists each with its test."""

import json
import signal
import subprocess
import time

import pytest

from ladd.cli import main
from ladd.config import load_config
from ladd.train.checkpoint import Checkpointer
from tests.worlds import assert_same_weights as same_weights
from tests.worlds import make_train_world, run_train, train_command, train_env, train_overrides

STEPS = 8
TIMEOUT = 180  # seconds: no test here may hang


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_train_world(tmp_path_factory.mktemp("faults"))


def overrides(root, out, steps=STEPS, **extra):
    return train_overrides(root, out, steps, **extra)


def run(args, nproc=2, fault=None, check=True):
    return run_train(args, nproc, TIMEOUT, fault, check)


def assert_same_weights(a, b, step=STEPS):
    same_weights(a, b, step)


@pytest.fixture(scope="module")
def reference(world):
    """An uninterrupted 2-rank run: what every interrupted-and-resumed 2-rank run must reproduce."""
    out = world / "reference"
    run(overrides(world, out))
    return out


def result_of(out) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def single_reference(world):
    """An uninterrupted run in this process."""
    out = world / "single-reference"
    assert main(["train", *[a for o in overrides(world, out) for a in ("--set", o)]]) == 0
    return out


def test_sigterm_checkpoints_exits_0_and_resumes_exactly(world, single_reference, monkeypatch, capsys):
    """One process: SIGTERM after step 3 → a checkpoint at step 3, exit 0, one line; the rerun ends
    bit-identical to an unbroken run."""
    out = world / "single-sigterm"
    args = [a for o in overrides(world, out) for a in ("--set", o)]
    monkeypatch.setenv("LADD_FAULT", "sigterm:3")
    assert main(["train", *args]) == 0
    assert "preempted (SIGTERM) at step 3; rerun the same command to resume" in capsys.readouterr().out
    assert Checkpointer(out / "checkpoints", None).latest().name == "step-00000003"
    assert result_of(out)["stopped"] == "stop_preempted" and not result_of(out)["finished"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler lives only as long as the loop
    monkeypatch.delenv("LADD_FAULT")
    assert main(["train", *args]) == 0 and result_of(out)["finished"]
    assert_same_weights(single_reference, out)


def test_max_minutes_checkpoints_exits_0_and_resumes_exactly(world, single_reference, capsys):
    """A budget spent before the first step (it counts from the start, loading included): the run
    checkpoints where it is and says so; the rerun without a budget ends as the unbroken run."""
    from ladd.train.loop import train

    out = world / "budget"
    result = train(load_config(None, overrides(world, out, **{"train.max_minutes": "1e-6"})))
    assert result["stopped"] == "stop_time_limit" and result["step"] == 0
    assert "train.max_minutes = 1e-06 reached at step 0; rerun the same command to resume" in capsys.readouterr().out
    assert Checkpointer(out / "checkpoints", None).latest().name == "step-00000000"
    assert train(load_config(None, overrides(world, out)))["finished"]
    assert_same_weights(single_reference, out)


@pytest.mark.slow
def test_sigterm_to_torchrun_resumes_bit_identically(world, reference):
    """SIGTERM to torchrun (as SLURM sends it) mid-training: both workers finish their step, agree,
    checkpoint and exit 0; rerunning the same command ends with the unbroken run's weights."""
    out = world / "torchrun-sigterm"
    proc = subprocess.Popen(train_command(overrides(world, out), 2), env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count('"d_loss"') >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    stopped = result_of(out)
    assert stopped["stopped"] == "stop_preempted" and 3 <= stopped["step"] < STEPS, output[-3000:]
    assert f"preempted (SIGTERM) at step {stopped['step']}; rerun the same command to resume" in output
    assert Checkpointer(out / "checkpoints", None).latest().name == f"step-{stopped['step']:08d}"
    assert "resumed from" in run(overrides(world, out)).stdout
    assert_same_weights(reference, out)


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(world):
    out = world / "one-rank-signal"
    proc = run(overrides(world, out), fault="sigterm:2:1")  # exit 0: every worker stopped cleanly
    assert result_of(out)["step"] == 2 and result_of(out)["stopped"] == "stop_preempted"
    assert "preempted (a signal on another rank) at step 2" in proc.stdout  # rank 0 did not get it
    assert Checkpointer(out / "checkpoints", None).latest().name == "step-00000002"


@pytest.mark.slow
def test_a_dead_rank_ends_the_survivor_with_its_name_and_the_rerun_resumes(world, reference):
    out = world / "dead-rank"
    t0 = time.monotonic()
    proc = run(overrides(world, out), fault="step:3:1", check=False)  # rank 1 is SIGKILLed after step 3
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    lines = [l for l in proc.stderr.splitlines() if l.startswith("ladd train: error:")]
    assert len(lines) == 1 and "rank 0 lost contact with rank 1 at step 3" in lines[0], proc.stderr[-3000:]
    assert "the last complete checkpoint is" in lines[0] and "step-00000002" in lines[0]
    assert "resumed from" in run(overrides(world, out)).stdout
    assert_same_weights(reference, out)


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(world):
    """A NaN batch on rank 1 alone, or on rank 0 alone, at step 3: both give the same weights (the
    update is skipped everywhere, not on the rank that saw it), and the run counts one skip."""
    outs = []
    for rank in (1, 0):
        out = world / f"nan-rank{rank}"
        run(overrides(world, out), fault=f"nan_batch:3:{rank}")
        assert result_of(out)["skipped_updates"] == 1 and result_of(out)["finished"]
        outs.append(out)
    assert_same_weights(*outs)


@pytest.mark.slow
def test_a_health_stop_is_reached_by_every_rank(world):
    """A drift collapse decided from gathered validation latents stops both ranks at one step."""
    out = world / "health-stop"
    run(overrides(world, out, steps=12, **{"optim.lr_g": "0.3", "method.gen_update_interval": "1",
                                           "validation.every": "2", "health.on_collapse": '"stop"'}))
    assert result_of(out)["stopped"] == "stop_collapse" and result_of(out)["step"] < 12
