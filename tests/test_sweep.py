"""`ladd sweep`: the t distribution and Welch's test, resume after an interruption, health marks, and
one real two-trial sweep on the tiny pipeline."""

import json
import math
import tomllib

import numpy as np
import pytest

from ladd.sweep import (
    SweepSpec,
    betainc,
    bootstrap_test,
    health_status,
    read_results,
    run_sweep,
    t_two_sided_p,
    welch_test,
)


def test_t_distribution_against_known_values():
    assert t_two_sided_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T| > 1) = 1/2
    assert t_two_sided_p(2.228139, 10) == pytest.approx(0.05, abs=1e-6)  # the 97.5 % quantile
    assert t_two_sided_p(12.706205, 1) == pytest.approx(0.05, abs=1e-6)
    assert t_two_sided_p(1.959964, 1e7) == pytest.approx(0.05, abs=1e-6)  # -> the normal
    assert t_two_sided_p(0.0, 5) == 1.0
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # a finite binomial sum
    assert betainc(0.5, 0.5, 0.3) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)), abs=1e-12)


def test_welch_finds_a_true_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.3, 10), rng.normal(2.5, 0.6, 10)
    assert welch_test(a, b)["p"] < 0.01 and bootstrap_test(a, b)["p"] < 0.05
    c = rng.normal(1.0, 0.3, 10)
    assert welch_test(a, c)["p"] > 0.05 and bootstrap_test(a, c)["p"] > 0.05
    # by hand: t = -3.5 / sqrt(5/12 + 2), df = (29/12)^2 / ((5/12)^2 / 3 + 2^2 / 4)
    w = welch_test([1, 2, 3, 4], [2, 4, 6, 8, 10])
    assert w["t"] == pytest.approx(-3.5 / math.sqrt(29 / 12))
    assert w["df"] == pytest.approx((29 / 12) ** 2 / (25 / 432 + 1))
    # calibrated: under the null about 5 % of p-values fall below 0.05
    p = [welch_test(rng.normal(0, 1, 4), rng.normal(0, 3, 6))["p"] for _ in range(400)]
    assert 0.02 < np.mean(np.array(p) < 0.05) < 0.09
    # a deterministic baseline (one value): a one-sample test
    one = welch_test([1.1, 1.2, 1.0, 1.15], [2.0])
    assert one["df"] == pytest.approx(3.0) and one["p"] < 0.001


def fake_spec(tmp_path, **kw):
    return SweepSpec(out=str(tmp_path / "sweep"), seeds=[0, 1], set={"train.steps": 5},
                     space={"optim.lr_g": [1e-5, 3e-5, 1e-4]}, eval={"data": "unused"}, **kw)


def fake_runner(calls, stop_after=None, crash=()):
    """KID falls with lr_g (the truth), plus seed noise; the untrained baseline is worse."""

    def run(trial, job, env):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # killed mid-sweep
        calls.append(trial.trial_id)
        if trial.trial_id in crash:
            return {"status": "failed", "error": "exit 1: CUDA out of memory"}
        assert f"train.seed={trial.seed}" in job["overrides"] and "train.steps=5" in job["overrides"]
        lr = trial.params["optim.lr_g"]
        kid = 0.02 - 100 * lr + 0.0005 * (trial.seed - 0.5)
        status = "collapsed" if lr == 1e-4 and trial.seed == 1 else "ok"
        return {"status": status, "kid": {"mean": kid, "std": 0.001, "n": 2, "per_seed": [kid]},
                "untrained": {"kid": {"mean": 0.03, "per_seed": [0.0301, 0.0299, 0.0302]}}}

    return run


def first_ids(spec):
    from ladd.sweep import configurations, trials_of

    return [t.trial_id for t in trials_of(spec, configurations(spec))]


def test_interrupted_sweep_resumes_without_rerunning(tmp_path):
    from ladd.config import load_config

    spec = fake_spec(tmp_path)
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, fake_runner(first, stop_after=4, crash={first_ids(spec)[1]}), workers=[{}])
    assert [r["trial_id"] for r in read_results(spec.out)] == first and len(first) == 4
    with open(tmp_path / "sweep" / "results.jsonl", "a") as f:
        f.write('{"trial_id": "half-writ')  # a line cut by the kill: ignored, never fatal
    second: list[str] = []
    result = run_sweep(spec, fake_runner(second), workers=[{}])
    # only the unfinished trials ran, and the one that crashed (a failure is retried, a collapse is not)
    assert second == [first_ids(spec)[1]] + first_ids(spec)[4:]
    tsv = (tmp_path / "sweep" / "results.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 4 + 3 and tsv[0].startswith("trial_id\tconfig_id")

    ranking = result["ranking"]
    # lr 1e-4 has the lowest KID but one of its seeds collapsed: marked, reported, ranked after the healthy
    assert [c["params"]["optim.lr_g"] for c in ranking] == [3e-5, 1e-5, 1e-4]
    assert ranking[2]["status"]["collapsed"] == 1 and ranking[2]["n"] == 1 and ranking[2]["rank"] == 3
    assert ranking[0]["n"] == 2 and ranking[0]["std"] == pytest.approx(0.0005 / math.sqrt(2), rel=1e-6)
    assert all(c["vs_untrained"]["diff"] < 0 for c in ranking)
    assert ranking[0]["vs_untrained"]["significant"]
    winner = load_config(result["winner"])
    assert winner.optim.lr_g == 3e-5 and winner.train.steps == 5
    assert "collapsed:1" in (tmp_path / "sweep" / "report.txt").read_text()
    again: list[str] = []
    run_sweep(spec, fake_runner(again), workers=[{}])
    assert again == []  # a finished sweep runs nothing


def test_health_rules_mark_trials(tmp_path):
    from ladd.config import load_config

    cfg = load_config(None, [f'train.out="{tmp_path}"', "health.collapse_window=5"])
    assert health_status(cfg, {"stopped": "stop_nonfinite"}) == "diverged"
    rows = [{"step": i, "d_loss": 1.0, "logit_gap": 2.0} for i in range(10)]
    rows.append({"step": 10, "val_diversity_ratio": 0.9})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert health_status(cfg, {"stopped": None}) == "ok"
    rows += [{"step": 10 + i, "d_loss": 2.0, "logit_gap": 0.001} for i in range(6)]
    # The disc at chance with no fresh validation: the loop validates next, and that drift decides.
    for drift, verdict in ((1.5, "collapsed"), (1.1, "ok")):
        logged = rows + [{"step": 16, "val_diversity_ratio": 0.9, "val_drift": drift}]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
        assert health_status(cfg, {"stopped": None}) == verdict
    near = rows[:10] + [{"step": 10, "val_diversity_ratio": 0.9, "val_drift": 1.1}] + rows[11:]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in near))
    assert health_status(cfg, {"stopped": None}) == "ok"  # the disc at chance, the student near the teacher
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "val_diversity_ratio": 0.05}) + "\n")
    assert health_status(cfg, {"stopped": None}) == "collapsed"
    drifted = [{"step": 0, "val_diversity_ratio": 0.9, "val_drift": 1.0},
               {"step": 9, "val_diversity_ratio": 0.7, "val_drift": 5.1}]  # varied noise: only drift sees it
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in drifted))
    assert health_status(cfg, {"stopped": None}) == "collapsed"


@pytest.mark.slow
def test_real_two_trial_sweep_on_the_tiny_pipeline(tmp_path_factory, tmp_path):
    from tests.test_eval import make_world, train_overrides

    world = make_world(tmp_path_factory)
    fixed = {k: tomllib.loads(f"v = {v}")["v"] for k, v in train_overrides(world, tmp_path).items() if k != "train.out"}
    spec = SweepSpec(out=str(tmp_path / "sweep"), seeds=[0, 1], set=fixed, space={"optim.lr_g": [1e-3]},
                     eval={"data": str(world / "eval"), "features": "random-conv", "subsets": 3, "subset_size": 4,
                           "ema": True, "fid": False, "device": "cpu", "dtype": "fp32"})
    result = run_sweep(spec, workers=[{"OMP_NUM_THREADS": "1"}])
    rows = read_results(spec.out)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    assert all(math.isfinite(r["kid"]["mean"]) and r["untrained"]["kid"]["per_seed"] for r in rows)
    assert (tmp_path / "sweep" / "trials" / rows[0]["trial_id"] / "run" / "checkpoints").is_dir()
    assert result["ranking"][0]["n"] == 2 and result["winner"].endswith("winner.toml")
