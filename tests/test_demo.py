"""`ladd demo` end to end on a tiny pipeline: stages, caching, report.json fields, report.html."""

import json
import shutil

import pytest
from safetensors import safe_open

from ladd.demo import DemoConfig, method_line, run_demo
from ladd.models.tiny import build_tiny_pipeline
from tests.clitools import error_lines, run_cli


@pytest.mark.slow
def test_demo_runs_caches_and_reports(tmp_path):
    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    cfg = DemoConfig(out=str(tmp_path / "demo"), seeds=2, jobs=1, pipeline=str(tmp_path / "tiny"), n_train=8, n_eval=8,
                     steps=3, features="random-conv", subsets=5, subset_size=4,
                     overrides=("validation.num_prompts=2", "train.checkpoint_every=2"))
    report = run_demo(cfg)
    for key in ("teacher", "untrained", "ladd"):
        assert {"mean", "std", "n"} <= report["kid"][key].keys()
    assert report["kid"]["ladd"]["n"] == 2 and "gap_closed" in report and "ladd_vs_untrained_se" in report
    assert {"precompute", "train", "evaluate", "report"} <= report["seconds"].keys()
    # KID over steps: the untrained student at 0, each earlier checkpoint (step 2, of the first
    # `curve_seeds` = 1 seed only), the final weights.
    assert [p["step"] for p in report["over_steps"]["seed-1"]] == [0, 3]
    assert not (tmp_path / "demo" / "runs" / "seed-1" / "eval-step-00000002.json").exists()
    points = report["over_steps"]["seed-0"]
    assert [p["step"] for p in points] == [0, 2, 3]
    final = json.loads((tmp_path / "demo" / "runs" / "seed-0" / "eval.json").read_text())["rows"][0]
    assert points[0]["kid"] == report["kid"]["untrained"]["mean"] and points[-1]["kid"] == final["kid"]["mean"]
    step2 = json.loads((tmp_path / "demo" / "runs" / "seed-0" / "eval-step-00000002.json").read_text())
    assert " step 2 " in step2["rows"][0]["label"] and points[1]["kid"] == step2["rows"][0]["kid"]["mean"]
    # The training data's teacher noise never reappears at eval (a paired-distillation student saw it).
    seeds = {split: set(safe_open(tmp_path / "demo" / "data" / split / "shard-00000.safetensors", "pt")
                        .get_tensor("seeds").tolist()) for split in ("train", "eval")}
    assert len(seeds["train"]) == 8 and seeds["eval"] == set(range(8)) and not seeds["train"] & seeds["eval"]
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["kid"]["ladd"]["mean"] == report["kid"]["ladd"]["mean"]
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "gap closed" in html  # self-contained
    assert saved["train_config"]["train"]["seed"] == 0 and "+ 10 × paired distillation" in saved["method"]
    # configs/toy.toml's paired term runs along the teacher's path: the train data hold its states there.
    assert "along the teacher's path" in saved["method"] and "last step only" in saved["method"]
    manifests = {split: json.loads((tmp_path / "demo" / "data" / split / "manifest.json").read_text())
                 for split in ("train", "eval")}
    assert manifests["train"]["sampling"]["trajectory"] == [0.9, 0.75, 0.5]
    assert manifests["eval"]["sampling"]["trajectory"] == []
    # The guards, replayed per seed from metrics.jsonl (3 steps: too few for the 100-step logit-gap window).
    assert set(saved["health"]) == {"seed-0", "seed-1"}
    assert not any(v["collapse_logits"] for v in saved["health"].values()) and "health guard" in html
    again = run_demo(cfg)  # finished stages are reused: no training, no evaluation
    assert again["kid"]["ladd"] == report["kid"]["ladd"]
    # ... and the report keeps the seconds the first run measured for them, saying so.
    assert again["seconds_reused"] == ["evaluate", "precompute", "train"]
    assert all(again["seconds"][k] == report["seconds"][k] for k in again["seconds_reused"])
    assert "reused: an earlier run did this stage" in (tmp_path / "demo" / "report.html").read_text()
    # Other eval seeds: every row scored again there (nothing reused), training reused. Eval seed 1 is
    # the first run's noise and KID subsets, so its part of each row, and its gap closed, are the first run's.
    two = run_demo(DemoConfig(**{**cfg.__dict__, "eval_seeds": (1, 2)}))
    assert two["eval_seeds"] == [1, 2] and "evaluate" not in two["seconds_reused"] and "train" in two["seconds_reused"]
    rows = [json.loads((tmp_path / "demo" / "runs" / s / "eval.json").read_text()) for s in ("seed-0", "seed-1")]
    for first, row in zip(report["over_steps"].values(), rows):
        per_seed = row["rows"][0]["kid"]["per_seed"]
        assert row["config"]["seeds"] == [1, 2] and per_seed[0] == first[-1]["kid"]
        assert row["rows"][0]["kid"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert two["gap_closed_per_eval_seed"][0] == pytest.approx(report["gap_closed"])
    assert len(two["gap_closed_per_eval_seed"]) == 2 and "gap_closed_per_eval_seed" not in report
    assert "gap closed at each eval seed" in (tmp_path / "demo" / "report.html").read_text()


@pytest.mark.slow
def test_demo_judges_a_run_with_ema_by_its_ema_weights(tmp_path):
    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    common = dict(seeds=1, pipeline=str(tmp_path / "tiny"), n_train=8, n_eval=8, steps=3, features="random-conv",
                  subsets=5, subset_size=4)
    raw = run_demo(DemoConfig(out=str(tmp_path / "raw"), overrides=("validation.num_prompts=2",), **common))
    (tmp_path / "ema").mkdir()
    for name in ("train.txt", "eval.txt"):  # the raw run's prompts and teacher data: precompute is reused
        shutil.copy(tmp_path / "raw" / name, tmp_path / "ema" / name)
    shutil.copytree(tmp_path / "raw" / "data", tmp_path / "ema" / "data")
    ema = run_demo(DemoConfig(out=str(tmp_path / "ema"), overrides=("validation.num_prompts=2", "train.ema_decay=0.5"),
                              **common))
    row = json.loads((tmp_path / "ema" / "runs" / "seed-0" / "eval.json").read_text())["rows"][0]
    assert " ema (4 steps)" in row["label"]
    raw_row = json.loads((tmp_path / "raw" / "runs" / "seed-0" / "eval.json").read_text())["rows"][0]
    assert " ema" not in raw_row["label"]
    # Same data, seeds and training: only the judged weights differ (EMA 0.5 over 3 steps ≠ the raw student).
    assert ema["kid"]["untrained"] == raw["kid"]["untrained"]
    assert row["latent_mse"] != raw_row["latent_mse"]


@pytest.mark.slow
def test_demo_on_buckets_reports_each_bucket(tmp_path):
    """`ladd demo --buckets`: the data are drawn over the buckets, and report.json, the headline and
    report.html carry each bucket's KID, gap closed and significance."""
    from ladd.data.shards import read_manifest
    from ladd.report import headline

    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    cfg = DemoConfig(out=str(tmp_path / "demo"), seeds=2, jobs=1, pipeline=str(tmp_path / "tiny"), n_train=16, n_eval=12,
                     steps=2, features="random-conv", subsets=3, subset_size=3, buckets="32x32,40x24",
                     overrides=("validation.num_prompts=2", "data.batch_per_rank=2"))
    report = run_demo(cfg)
    for split in ("train", "eval"):
        assert [b["name"] for b in read_manifest(tmp_path / "demo" / "data" / split)["buckets"]] == ["32x32", "40x24"]
    counts = {b["name"]: b["count"] for b in read_manifest(tmp_path / "demo" / "data" / "eval")["buckets"]}
    assert set(report["buckets"]) == {"32x32", "40x24"}
    for name, b in report["buckets"].items():
        assert b["num_images"] == counts[name] and b["kid"]["ladd"]["n"] == 2
        assert {"gap_closed", "ladd_vs_untrained_se", "caption_accuracy"} <= b.keys()
        assert f"at {name}: gap closed" in headline(report)
    assert "Per bucket" in (tmp_path / "demo" / "report.html").read_text()


@pytest.mark.slow
def test_demo_ablation_trains_each_variant_on_the_same_seeds(tmp_path):
    """`ladd demo --ablation`: pure LADD and distillation alone beside the default, same data and seeds,
    each with its KID, gap closed and per-seed difference to the default; the default's runs are reused."""
    from ladd.demo import ABLATIONS
    from ladd.train.checkpoint import read_config

    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    common = dict(out=str(tmp_path / "demo"), seeds=2, jobs=1, pipeline=str(tmp_path / "tiny"), n_train=8, n_eval=8,
                  steps=2, features="random-conv", subsets=3, subset_size=4, overrides=("validation.num_prompts=2",))
    plain = run_demo(DemoConfig(**common))
    report = run_demo(DemoConfig(**common, ablation=True))
    assert report["kid"]["ladd"] == plain["kid"]["ladd"]  # the default's runs and rows are reused
    assert set(report["ablation"]) == set(ABLATIONS)
    for name, (slug, _, _) in ABLATIONS.items():
        v = report["ablation"][name]
        assert v["kid"]["n"] == 2 and v["kid_minus_default"]["n"] == 2
        runs = [tmp_path / "demo" / "runs" / slug / f"seed-{s}" for s in range(2)]
        kids = [json.loads((r / "eval.json").read_text())["rows"][0]["kid"]["mean"] for r in runs]
        default = [json.loads((tmp_path / "demo" / "runs" / f"seed-{s}" / "eval.json").read_text())["rows"][0]["kid"]["mean"]
                   for s in range(2)]
        assert v["kid_minus_default"]["mean"] == pytest.approx(sum(k - d for k, d in zip(kids, default)) / 2)
        method, optim = read_config(runs[0])["method"], read_config(runs[0])["optim"]
        terms = (method["distill_weight"], method["score_weight"], method["adversarial_weight"],
                 method["gen_update_interval"], optim["lr_g"])
        # pure LADD: its own recipe; distillation alone: the default's paired and score terms, no adversarial one
        assert terms == ((0.0, 0.0, 1.0, 3, 3e-5) if slug == "pure-ladd" else (10.0, 6.0, 0.0, 1, 6e-5))
        assert set(v["health"]) == {"seed-0", "seed-1"} and "drift" in v["health"]["seed-0"]  # replayed per seed
    assert "Ablation (same data, seeds and steps)" in (tmp_path / "demo" / "report.html").read_text()


def test_guards_line_names_the_seeds_and_guards_that_fired():
    from ladd.report import guards_line

    calm = {"collapse_logits": False, "diversity": False, "drift": False, "excused_steps": 40}
    assert guards_line({"health": {"seed-0": calm}}) == "no health guard fired"
    fired = {"seed-0": calm, "seed-2": {**calm, "collapse_logits": True, "drift": True}}
    assert guards_line({"health": fired}) == "health guards fired: seed-2 (collapse_logits, drift)"


def test_demo_eval_set_holds_a_kid_subset_per_bucket_and_bad_input_is_one_line(capsys, tmp_path):
    assert DemoConfig().n_eval == 192 and DemoConfig(quick=True, buckets="toy").n_eval == 128
    assert DemoConfig(buckets="toy").n_eval == 384 and DemoConfig(buckets="64x64").n_eval == 192
    assert DemoConfig(buckets="toy", n_eval=96).n_eval == 96  # given: kept
    for bad in (["--buckets", "64x64,wide"], ["--seeds", "0"], ["--jobs", "0"], ["--eval-seeds", "0", "1"],
                ["--eval-seeds", "2", "2"]):
        rc, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo", *bad)
        assert rc == 2 and len(error_lines(err)) == 1, err
    assert not (tmp_path / "demo").exists()


def test_demo_data_made_for_another_config_are_refused_in_one_line(capsys, tmp_path):
    """An earlier demo's train data without the teacher's states configs/toy.toml now trains on: one
    line that names the flag and says how to start afresh; nothing is overwritten."""
    from ladd.data.precompute import PrecomputeConfig, run_precompute

    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "train.txt").write_text("a red circle\na blue square\n")
    run_precompute(PrecomputeConfig(pipeline=str(tmp_path / "tiny"), prompts=str(demo / "train.txt"),
                                    out=str(demo / "data" / "train"), steps=50, seed=500_000))
    before = (demo / "data" / "train" / "manifest.json").read_text()
    rc, _, err = run_cli(capsys, "demo", "--out", demo, "--pipeline", tmp_path / "tiny", "--n-train", 2, "--n-eval", 2)
    assert rc == 2 and len(error_lines(err)) == 1, err
    assert "--trajectory differs" in err and f"remove {demo}" in err
    assert (demo / "data" / "train" / "manifest.json").read_text() == before


def test_method_line_names_the_last_step_rollout():
    """The report's method line says when the last step trains from the student's own state."""
    m = dict(loss="hinge", gen_update_interval=1, renoise_m=-2.5, distill_weight=10.0, paired_target="trajectory",
             last_step_rollout=2)
    assert "the last step from the student's own state, towards the guided teacher's 2 steps" in method_line(m)
    assert "own state" not in method_line({**m, "last_step_rollout": 0})
    assert "the last 2 steps from the student's own state" in method_line({**m, "rollout_steps": 2})


@pytest.mark.slow
def test_demo_jobs_train_runs_in_processes_with_the_numbers_of_this_process(tmp_path):
    """--jobs 2: the seeds train two at once in spawned processes with cores() // 2 torch threads each,
    each run's output in its train.log; every number equals the same demo trained in this process at
    that thread count."""
    import torch

    from ladd.demo import cores

    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    common = dict(seeds=2, pipeline=str(tmp_path / "tiny"), n_train=8, n_eval=8, steps=3, features="random-conv",
                  subsets=5, subset_size=4, overrides=("validation.num_prompts=2",))
    parallel = run_demo(DemoConfig(out=str(tmp_path / "jobs-2"), jobs=2, **common))
    (tmp_path / "jobs-1").mkdir()
    for name in ("train.txt", "eval.txt", "data"):  # the same prompts and teacher data: precompute is reused
        (shutil.copytree if name == "data" else shutil.copy)(tmp_path / "jobs-2" / name, tmp_path / "jobs-1" / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(cores() // 2, 1))
    try:
        here = run_demo(DemoConfig(out=str(tmp_path / "jobs-1"), jobs=1, **common))
    finally:
        torch.set_num_threads(threads)
    assert parallel["kid"]["ladd"] == here["kid"]["ladd"] and parallel["latent_mse"] == here["latent_mse"]
    timing = {"step_time", "samples_per_s", "peak_mem_gb"}
    for seed in range(2):
        runs = [tmp_path / out / "runs" / f"seed-{seed}" for out in ("jobs-2", "jobs-1")]
        metrics = [[{k: v for k, v in json.loads(line).items() if k not in timing}
                    for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
        assert len(metrics[0]) == 5 and metrics[0] == metrics[1]  # validations at steps 0 and 3, and 3 steps
        assert "train: 100%" in (runs[0] / "train.log").read_text() and not (runs[1] / "train.log").exists()


def test_thread_plan_fixes_each_runs_threads_and_the_last_round_shares_every_core():
    from ladd.demo import thread_plan

    assert thread_plan(5, 2, 2) == [1, 1, 1, 1, 2]  # the demo's 5 seeds on 2 cores
    assert thread_plan(4, 2, 2) == [1, 1, 1, 1] and thread_plan(3, 3, 16) == [5, 5, 5]
    assert thread_plan(6, 4, 16) == [4, 4, 4, 4, 8, 8] and thread_plan(3, 2, 1) == [1, 1, 1]


PREEMPTED_DEMO = """
import sys
from ladd.demo import DemoConfig, run_demo
run_demo(DemoConfig(out=sys.argv[1], seeds=3, jobs=2, pipeline=sys.argv[2], n_train=8, n_eval=4, steps=100_000,
                    features="random-conv", subsets=2, subset_size=2, overrides=("validation.num_prompts=2",)))
"""


@pytest.mark.slow
def test_demo_jobs_pass_a_preemption_signal_to_each_run_and_stop(tmp_path):
    """SIGTERM to a demo training two runs at once: both checkpoint and stop, the third never starts,
    the demo exits 0 with one line saying to rerun, and no report is written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ladd.train.checkpoint import Checkpointer

    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-c", PREEMPTED_DEMO, str(out), str(tmp_path / "tiny")],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    runs = [out / "runs" / f"seed-{seed}" for seed in range(3)]
    try:
        deadline = time.monotonic() + 240
        while not all((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count('"d_loss"') >= 2
                      for run in runs[:2]):
            assert proc.poll() is None and time.monotonic() < deadline, "the demo ended before the signal"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "preempted: rerun the same `ladd demo` command to resume each run where it stopped" in output
    for run in runs[:2]:
        result = json.loads((run / "result.json").read_text())
        assert result["stopped"] == "stop_preempted" and 2 <= result["step"] < 100_000
        assert Checkpointer(run / "checkpoints", None).latest().name == f"step-{result['step']:08d}"
        assert "preempted (SIGTERM)" in (run / "train.log").read_text()
    assert not runs[2].exists() and not (out / "report.json").exists()
