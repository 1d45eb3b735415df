"""`ladd demo`: the whole mission on the toy world, on a CPU — precompute, distill over seeds,
evaluate with statistics, and write report.html + report.json.

    ladd demo --out runs/demo --seeds 5        # what `make demo` runs
    ladd demo --quick                          # one seed, fewer steps

Stages are cached: a rerun skips finished precompute (the job itself says "nothing to do"), seeds
whose run reached its last step, and evaluations already written beside each run.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from ladd.data.buckets import parse_buckets
from ladd.distributed import print0
from ladd.report import grid_png, headline, render_html


@dataclass(kw_only=True)
class DemoConfig:
    out: str | None = None  # default: runs/demo (quick: runs/demo-quick, its data are smaller)
    seeds: int | None = None  # LADD training seeds; default 5 (quick: 1)
    quick: bool = False  # sets only what is not given: quick with seeds=3 trains three seeds
    pipeline: str = "toy"
    config: str = "configs/toy.toml"
    # The 50-step CFG teacher costs ~0.6 s per image on 2 CPU cores: 256 + 192 images (and the
    # teacher's own eval row, 192 more) are a third of the demo's 20 minutes, Inception features of
    # 12 eval rows another third.
    n_train: int | None = None  # default 256 (quick: 128)
    # default 192, with buckets 128 per bucket if more (quick: 128): KID subsets are 100 images, per
    # bucket too; every eval row costs ~0.16 s per image (Inception)
    n_eval: int | None = None
    steps: int | None = None  # training steps; default: the config's (quick: a third)
    # Training samples draw their teacher noise from seeds train_seed + i, the eval set from 0 + i (and
    # eval seed s from i + s·1e6): a student distilled from the teacher's own (noise, latent) pairs
    # (method.distill_weight) never meets a training noise at eval.
    train_seed: int = 500_000
    # Eval seeds every row is scored at (fresh noise, shared by every row; 0, the references' own noise,
    # is refused: it credits a distilled student with reproducing them). Each costs a whole evaluation;
    # with two or more, report.json also holds the gap closed at each (how much the eval noise moves it).
    eval_seeds: tuple[int, ...] = (1,)
    features: str = "inception"
    subsets: int = 20
    subset_size: int = 100
    eval_batch: int = 32
    overrides: tuple[str, ...] = ()  # extra `section.key=value` for training
    buckets: str | None = None  # aspect-ratio buckets for training and eval data (precompute --buckets); None: square
    ablation: bool = False  # also train and score pure LADD and distillation alone (ABLATIONS) on the same seeds
    # Seeds whose earlier checkpoints are scored too (report.json over_steps, the KID-over-steps curve);
    # the others are scored at the untrained start and the end only. Each checkpoint is an eval row.
    curve_seeds: int = 1
    # Training runs at once, each in its own process with an equal share of the cores as torch threads
    # (the toy step is launch-bound: one thread per run trains more runs per second, bench/demo_jobs.py).
    # Default: one per core, at most the runs left to train; 1 trains in this process on every core.
    # A run's numbers depend on its thread count, so on a machine with another core count they differ
    # in the last digits. From a Python script, more than one job needs `if __name__ == "__main__":`.
    jobs: int | None = None

    def __post_init__(self):
        self.seeds = self.seeds if self.seeds is not None else (1 if self.quick else 5)
        self.n_train = self.n_train if self.n_train is not None else (128 if self.quick else 256)
        if self.n_eval is None:
            per_bucket = 128 * len(parse_buckets(self.buckets, factor=1)) if self.buckets else 0
            self.n_eval = 128 if self.quick else max(192, per_bucket)
        if min(self.seeds, self.n_train, self.n_eval) < 1:
            raise ValueError(f"--seeds, --n-train and --n-eval must be >= 1, got {self.seeds}, {self.n_train}, "
                             f"{self.n_eval}")
        if self.curve_seeds < 0:
            raise ValueError(f"--curve-seeds must be >= 0, got {self.curve_seeds}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        self.eval_seeds = tuple(int(s) for s in self.eval_seeds)
        if not self.eval_seeds or min(self.eval_seeds) < 1 or len(set(self.eval_seeds)) < len(self.eval_seeds):
            raise ValueError(f"--eval-seeds must be distinct seeds >= 1 (0 is the references' own noise), got "
                             f"{list(self.eval_seeds)}")
        self.out = self.out or ("runs/demo-quick" if self.quick else "runs/demo") + ("-buckets" if self.buckets else "")


def _stage(timings: dict, name: str):
    class Timer:
        def __enter__(self):
            print0(f"== {name}")
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - self.t0, 1)

    return Timer()


def _mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def paired_difference(values: list[float], baseline: list[float]) -> dict:
    """mean ± std over seeds of values − baseline, seed by seed (same training seed, same eval noise),
    and its standard error."""
    diff = _mean_std([v - b for v, b in zip(values, baseline, strict=True)])
    return {**diff, "se": diff["std"] / math.sqrt(diff["n"]) if diff["n"] > 1 else float("nan")}


def gap_and_significance(kid_u: float, kid_t: float, kid: dict) -> tuple[float, float]:
    """(gap closed, (untrained − it) / SE over seeds) of a student's KID over seeds (`_mean_std`) against
    the untrained student's and the teacher's; NaN where undefined (teacher = untrained, one seed)."""
    se = kid["std"] / math.sqrt(kid["n"]) if kid["n"] > 1 else float("nan")
    gap = (kid_u - kid["mean"]) / (kid_u - kid_t) if kid_u != kid_t else float("nan")
    return gap, (kid_u - kid["mean"]) / se if se and se > 0 else float("nan")


def run_demo(cfg: DemoConfig) -> dict:
    from ladd.config import HealthConfig, load_config
    from ladd.data.precompute import PrecomputeConfig
    from ladd.eval.commands import EvalConfig, evaluate
    from ladd.toy import world
    from ladd.toy.build import pipeline_world
    from ladd.train.checkpoint import Checkpointer, read_config
    from ladd.train.health import read_metrics, replay

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    with _stage(timings, "prompts"):
        scene = pipeline_world(cfg.pipeline)  # the teacher's own world (build.json)
        for split, n in (("train", cfg.n_train), ("eval", cfg.n_eval)):
            path = out / f"{split}.txt"
            if not path.is_file():
                path.write_text("\n".join(world.prompts(n, split, seed=0, **scene)) + "\n")
    base = load_config(cfg.config, list(cfg.overrides))
    # method.paired_target "trajectory" trains on the teacher's states at the student's later timesteps.
    trajectory = base.method.student_timesteps[1:] if base.method.paired_target == "trajectory" else ()
    with _stage(timings, "precompute"):
        summaries = []
        for split in ("train", "eval"):
            summaries.append(precompute_split(out / "data" / split, PrecomputeConfig(
                pipeline=cfg.pipeline, prompts=str(out / f"{split}.txt"), out=str(out / "data" / split),
                steps=50, guidance=5.0, batch_size=32, seed=cfg.train_seed if split == "train" else 0,
                decode_first=cfg.n_eval if split == "eval" else 0, buckets=cfg.buckets,
                trajectory=trajectory if split == "train" else ())))
            if summaries[-1].stopped:  # preempted: its own line said so; the rerun continues
                raise SystemExit(0)
    # Stages whose work an earlier invocation did: the report keeps that one's seconds.
    reused = {"precompute"} if all(s.nothing_to_do for s in summaries) else set()

    ema = base.train.ema_decay > 0  # a run that keeps an EMA is judged (and exported) by it
    steps = cfg.steps or (max(base.train.steps // 3, 1) if cfg.quick else base.train.steps)
    # --ablation: the same data, seeds and steps with one term of the student's loss removed.
    plan = {None: [(out / "runs" / f"seed-{seed}", seed, (), None) for seed in range(cfg.seeds)]}
    for name, (slug, config, extra) in (ABLATIONS.items() if cfg.ablation else ()):
        plan[name] = [(out / "runs" / slug / f"seed-{seed}", seed, extra, config) for seed in range(cfg.seeds)]
    todo = []
    for run, seed, extra, config in (entry for variant in plan.values() for entry in variant):
        latest = Checkpointer(run / "checkpoints", None).latest()
        if latest is None or json.loads((latest / "meta.json").read_text())["step"] < steps:
            sets = [f'model.pipeline="{cfg.pipeline}"', f'data.path="{out / "data" / "train"}"',
                    f'train.out="{run}"', f"train.seed={seed}", f"data.seed={seed}", f"train.steps={steps}",
                    *cfg.overrides, *extra]
            todo.append((run, config or cfg.config, sets))
    if todo:
        with _stage(timings, "train"):
            train_runs(todo, cfg.jobs)
    runs = [run for run, *_ in plan[None]]
    ablation_runs = {name: [run for run, *_ in variant] for name, variant in plan.items() if name is not None}

    reused.update({"train", "evaluate"} - timings.keys())

    def evaluated(cached: Path, source: str, path: Path, teacher: bool = False) -> dict:
        ecfg = EvalConfig(data=str(out / "data" / "eval"), source=source, path=str(path), teacher=teacher, ema=ema,
                          features=cfg.features, subsets=cfg.subsets, subset_size=cfg.subset_size,
                          pipeline=cfg.pipeline, batch_size=cfg.eval_batch, seeds=cfg.eval_seeds)
        # A row scored with another eval config (an earlier --eval-seeds) is scored again, not reused.
        r = json.loads(cached.read_text()) if cached.is_file() else None
        if r is None or r["config"] != json.loads(json.dumps(asdict(ecfg))):
            reused.discard("evaluate")
            r = json.loads(json.dumps(evaluate(ecfg)))  # as read back from the cache: lists, not tuples
            cached.write_text(json.dumps(r, indent=1))
        return r

    rows, over_steps = [], {}
    with _stage(timings, "evaluate"):
        for i, run in enumerate(runs):
            rows.append(evaluated(run / "eval.json", "run", run, teacher=i == 0))
            # The first `curve_seeds` seeds' earlier checkpoints too: the KID over steps (step 0 is the
            # untrained student; each student row names its checkpoint's step, so a run stopped early ends
            # where it stopped).
            curve = Checkpointer(run / "checkpoints", None).finished()[:-1] if i < cfg.curve_seeds else []
            earlier = [evaluated(run / f"eval-{ckpt.name}.json", "checkpoint", ckpt)["rows"][0] for ckpt in curve]
            points = [(0, rows[-1]["untrained"])] + [(r["info"]["step"], r) for r in [*earlier, rows[-1]["rows"][0]]]
            over_steps[run.name] = [{"step": step, "kid": r["kid"]["mean"],
                                     "caption_accuracy": (r.get("caption_accuracy") or {}).get("all")}
                                    for step, r in points]
        ablation_rows = {name: [evaluated(run / "eval.json", "run", run) for run in variant]
                         for name, variant in ablation_runs.items()}
    earlier = json.loads((out / "report.json").read_text()).get("seconds", {}) if (out / "report.json").is_file() else {}
    reused &= earlier.keys()
    timings.update({stage: earlier[stage] for stage in reused})
    with _stage(timings, "report"):
        report = summarize(rows, cfg, timings, steps)  # holds `timings` itself: the report stage lands too
        report["seconds_reused"] = sorted(reused)
        report["over_steps"] = over_steps
        if ablation_rows:
            report["ablation"] = ablation(rows, ablation_rows)
        report["train_config"] = read_config(runs[0])  # seed 0's, fully resolved
        report["method"] = method_line(report["train_config"]["method"])
        def health(variant: list[Path]) -> dict:  # every guard replayed on each seed's metrics
            return {run.name: replay(HealthConfig(**read_config(run)["health"]), read_metrics(run / "metrics.jsonl"))
                    for run in variant}

        report["health"] = health(runs)
        for name, variant in ablation_runs.items():
            report["ablation"][name]["health"] = health(variant)
        grid = grid_png(out / "data" / "eval", runs[0], ema)
        (out / "report.html").write_text(render_html(report, grid, runs))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print0(headline(report))
    print0(f"wrote {out / 'report.html'} and {out / 'report.json'}")
    return report


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def train_runs(todo: list[tuple[Path, str, list[str]]], jobs: int | None = None) -> None:
    """Trains each (run folder, config, overrides). With one job, in this process; with more, in rounds
    of that many at once in spawned processes, every run's output in its folder's train.log. The torch
    threads of each run are fixed before any starts (`thread_plan`), so its numbers do not depend on
    which run finishes first. A preemption signal goes on to every run, which checkpoints and stops; the
    demo then stops too, and a rerun resumes each run where it stopped."""
    from ladd.train.preemption import SIGNALS

    jobs = min(jobs or cores(), len(todo))
    if jobs <= 1:
        for run, config, sets in todo:
            stopped = _train_run(config, sets)
            if stopped:
                print0(f"{run}: training stopped early ({stopped})")
            if stopped == "stop_preempted":
                raise SystemExit(0)
        return
    threads = thread_plan(len(todo), jobs, cores())
    print0(f"training {len(todo)} runs, {jobs} at once with {threads[0]} thread(s) each; "
           f"each run's output is in its folder's train.log")
    received: list[int] = []  # preemption signals: passed on to the running runs; no later round starts
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in SIGNALS}
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    try:
        with tqdm(total=len(todo), desc=f"train ({jobs} at once)", unit="run") as bar:
            for first in range(0, len(todo), jobs):  # a round: its runs share the cores
                running = {pool.submit(_train_run, config, sets, str(run / "train.log"), n): run
                           for (run, config, sets), n in zip(todo[first:first + jobs], threads[first:first + jobs])}
                while running:
                    done, _ = wait(running, timeout=2.0, return_when=FIRST_COMPLETED)
                    if received:  # again every 2 s: a run still loading has no handler yet and would miss it
                        for child in multiprocessing.active_children():
                            os.kill(child.pid, received[0])
                    for future in done:
                        stopped = future.result()  # a run's exception is raised here; its train.log has the rest
                        if stopped:
                            tqdm.write(f"{running[future]}: training stopped early ({stopped})")
                        del running[future]
                        bar.update()
                if received:
                    break
    except BaseException:  # a run failed, or ^C
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print0("preempted: rerun the same `ladd demo` command to resume each run where it stopped")
        raise SystemExit(0)


def thread_plan(runs: int, jobs: int, cores: int) -> list[int]:
    """Torch threads per run when `runs` train in rounds of `jobs` at once: cores // jobs each, and the
    last, smaller round shares every core (5 runs on 2 cores: 1, 1, 1, 1, 2)."""
    rest = runs % jobs
    return [max(cores // jobs, 1)] * (runs - rest) + ([max(cores // rest, 1)] * rest if rest else [])


def _worker_init() -> None:
    """A training worker: preemption signals reach it through the demo, which passes them on; between
    runs they are ignored (a run's trainer handles them itself)."""
    from ladd.train.preemption import SIGNALS

    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _train_run(config: str, sets: list[str], log: str | None = None, threads: int | None = None) -> str | None:
    """One training run; with `log`, this process's stdout and stderr go to that file; with `threads`,
    torch runs on that many. Returns why it stopped early, or None."""
    from ladd.config import load_config
    from ladd.train.loop import train

    if log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(log, "a") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return train(load_config(config, sets))["stopped"]


def precompute_split(folder: Path, cfg):
    """One split's teacher data; data an earlier demo made with other arguments (another version's
    configs/toy.toml) are refused in one line that says how to start afresh."""
    from ladd.data.precompute import OtherJob, PrecomputeError, run_precompute

    try:
        return run_precompute(cfg)
    except OtherJob as err:
        raise PrecomputeError(f"{err} — {folder} holds an earlier demo's data: remove {folder.parent.parent} "
                              "(or give ladd demo another --out) to make them anew") from None


def summarize(rows: list[dict], cfg: DemoConfig, timings: dict, steps: int) -> dict:
    """report.json's numbers: KID and caption accuracy over seeds, gap closed, significance."""
    model = [r["rows"][0] for r in rows]
    untrained, teacher = rows[0]["untrained"], rows[0].get("teacher") or {}
    kid_ladd = _mean_std([m["kid"]["mean"] for m in model])
    kid_u, kid_t = untrained["kid"]["mean"], teacher.get("kid", {}).get("mean", float("nan"))
    gap, significance = gap_and_significance(kid_u, kid_t, kid_ladd)
    acc = [m.get("caption_accuracy") for m in model]

    def acc_of(row):
        return (row or {}).get("caption_accuracy", {}) or {}

    report = {
        "kid": {
            "teacher": {"mean": kid_t, "std": teacher.get("kid", {}).get("std", float("nan")), "n": 1},
            "untrained": {"mean": kid_u, "std": untrained["kid"].get("std", float("nan")), "n": 1},
            "ladd": kid_ladd,
            "ladd_subset_std": [m["kid"].get("subset_std", m["kid"].get("std")) for m in model],
        },
        "caption_accuracy": {
            "teacher": acc_of(teacher).get("all"),
            "untrained": acc_of(untrained).get("all"),
            "ladd": _mean_std([a["all"] for a in acc]) if all(a for a in acc) else None,
        },
        "latent_mse": {"untrained": untrained.get("latent_mse"),
                       "ladd": _mean_std([m["latent_mse"] for m in model if m.get("latent_mse") is not None])
                       if any(m.get("latent_mse") is not None for m in model) else None},
        "gap_closed": gap,
        "ladd_vs_untrained_se": significance,
        "eval_seeds": list(model[0].get("seeds", [])),  # fresh noise, shared by every row (docs/evaluation.md)
        **({"gap_closed_per_eval_seed": gap_per_eval_seed(untrained, teacher, model)}
           if len(model[0].get("seeds", [])) > 1 and teacher else {}),
        "train_steps": steps,
        **({"buckets": per_bucket(rows)} if "buckets" in model[0] else {}),
        "config": {**asdict(cfg)},
        "seconds": timings,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version()},
    }
    return report


def gap_per_eval_seed(untrained: dict, teacher: dict, model: list[dict]) -> list[float]:
    """The gap closed at each eval seed alone: the untrained, teacher and every student row at that
    seed's noise (each row's kid.per_seed), the students' mean against the other two."""
    per = [m["kid"]["per_seed"] for m in model]
    return [gap_and_significance(untrained["kid"]["per_seed"][i], teacher["kid"]["per_seed"][i],
                                 _mean_std([p[i] for p in per]))[0] for i in range(len(per[0]))]


# `ladd demo --ablation`: name -> (run folder, its config (None: the demo's), what it changes in it).
# Pure LADD trains its own recipe: at the default's rates, without the paired term, it walks away from
# the teacher (docs/toy-world.md, "Pure LADD").
ABLATIONS = {
    "pure LADD (configs/toy-ladd.toml: no distillation term, its own rates)":
        ("pure-ladd", "configs/toy-ladd.toml", ()),
    # The default's distillation terms (paired, and score distillation when on), without the adversarial one.
    "distillation alone (no adversarial term)": ("distill-only", None, ("method.adversarial_weight=0",)),
}


def ablation(rows: list[dict], variants: dict[str, list[dict]]) -> dict:
    """Each variant beside the default, on the same data, seeds and eval: its KID over seeds, gap closed,
    significance against the untrained student, caption accuracy, and the per-seed paired difference
    of its KID to the default's (same training seed, same eval noise)."""
    untrained, teacher = rows[0]["untrained"], rows[0].get("teacher") or {}
    kid_u, kid_t = untrained["kid"]["mean"], teacher.get("kid", {}).get("mean", float("nan"))
    default = [r["rows"][0]["kid"]["mean"] for r in rows]
    out = {}
    for name, vrows in variants.items():
        model = [r["rows"][0] for r in vrows]
        kids = [m["kid"]["mean"] for m in model]
        kid = _mean_std(kids)
        gap, significance = gap_and_significance(kid_u, kid_t, kid)
        acc = [m.get("caption_accuracy") for m in model]
        out[name] = {
            "kid": kid,
            "gap_closed": gap,
            "vs_untrained_se": significance,
            "kid_minus_default": paired_difference(kids, default),
            "caption_accuracy": _mean_std([a["all"] for a in acc]) if all(acc) else None,
        }
    return out


def per_bucket(rows: list[dict]) -> dict:
    """report.json's `buckets`: each bucket's KID (teacher, untrained, LADD over seeds), gap closed and
    significance, and caption accuracy — the same numbers as the whole-set ones, at one size."""
    out = {}
    for name in rows[0]["rows"][0]["buckets"]:
        u, t = rows[0]["untrained"]["buckets"][name], (rows[0].get("teacher") or {}).get("buckets", {}).get(name, {})
        ladd = [r["rows"][0]["buckets"][name] for r in rows]
        if u["kid"] is None or any(b["kid"] is None for b in ladd):
            out[name] = {"num_images": u["num_images"], "kid": None}
            continue
        kid = _mean_std([b["kid"]["mean"] for b in ladd])
        kid_u, kid_t = u["kid"]["mean"], (t.get("kid") or {}).get("mean", float("nan"))
        gap, significance = gap_and_significance(kid_u, kid_t, kid)
        acc = [b.get("caption_accuracy") for b in ladd]
        out[name] = {
            "num_images": u["num_images"],
            "kid": {"teacher": kid_t, "untrained": kid_u, "ladd": kid},
            "gap_closed": gap,
            "ladd_vs_untrained_se": significance,
            "caption_accuracy": {"teacher": (t.get("caption_accuracy") or {}).get("all"),
                                 "untrained": (u.get("caption_accuracy") or {}).get("all"),
                                 "ladd": _mean_std([a["all"] for a in acc]) if all(acc) else None},
        }
    return out


def method_line(m: dict) -> str:
    """The student's loss in words, from the resolved `[method]` section."""
    line = f"LADD ({m['loss']} loss, G every {m['gen_update_interval']} steps, re-noise m = {m['renoise_m']})"
    if m.get("distill_weight", 0) > 0 and m.get("paired_target") == "trajectory":
        line += (f" + {m['distill_weight']:g} × paired distillation along the teacher's path (each step from the "
                 "teacher's state to its next one)")
    elif m.get("distill_weight", 0) > 0:
        line += f" + {m['distill_weight']:g} × paired distillation ‖x̂0 − x0‖² (from each latent's own teacher noise)"
        if m.get("adversarial_noise") == "fresh":
            line += "; the disc judges a second pass from fresh noise"
    if m.get("adversarial_inputs") == "simulate" and m.get("student_inputs") != "simulate":
        line += "; the adversarial and score terms judge the student's own earlier steps at t < 1"
    if m.get("student_inputs") == "simulate":
        line += "; student inputs from its own earlier steps"
    if m.get("last_step_rollout", 0) > 0:
        n = m.get("rollout_steps", 1)
        line += (f"; the last {'step' if n == 1 else f'{n} steps'} from the student's own state, towards the "
                 f"guided teacher's {m['last_step_rollout']} steps from there")
    last = [name for name, key in (("adversarial", "adversarial_timesteps"), ("score", "score_timesteps"))
            if m.get(key) == "last" and (name == "adversarial" or m.get("score_weight", 0) > 0)]
    if last:
        line += f"; the {' and '.join(last)} {'terms train' if len(last) > 1 else 'term trains'} the last step only"
    return line
