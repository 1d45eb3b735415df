"""`ladd demo` end to end on a tiny pipeline: stages, caching, report.json fields, report.html."""

import json

from ladd.demo import DemoConfig, run_demo
from ladd.models.tiny import build_tiny_pipeline


def test_demo_runs_caches_and_reports(tmp_path):
    build_tiny_pipeline(seed=1).save_pretrained(tmp_path / "tiny")
    cfg = DemoConfig(out=str(tmp_path / "demo"), seeds=2, pipeline=str(tmp_path / "tiny"), n_train=8, n_eval=8,
                     steps=3, features="random-conv", subsets=5, subset_size=4,
                     overrides=("validation.num_prompts=2",))
    report = run_demo(cfg)
    for key in ("teacher", "untrained", "ladd"):
        assert {"mean", "std", "n"} <= report["kid"][key].keys()
    assert report["kid"]["ladd"]["n"] == 2 and "gap_closed" in report and "ladd_vs_untrained_se" in report
    assert {"precompute", "train", "evaluate", "report"} <= report["seconds"].keys()
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["kid"]["ladd"]["mean"] == report["kid"]["ladd"]["mean"]
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "gap closed" in html  # self-contained
    again = run_demo(cfg)  # finished stages are reused: no training, no evaluation
    assert "train" not in again["seconds"] and again["kid"]["ladd"] == report["kid"]["ladd"]
