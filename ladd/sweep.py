"""`ladd sweep SWEEP.toml`: short trainings + evaluations over a search space, K seeds each, with statistics.

    ladd sweep sweeps/lr.toml              # runs what is not done yet; re-run the same command to resume
    ladd sweep sweeps/lr.toml --dry-run    # list the trials
    ladd sweep sweeps/lr.toml --report     # the report from the results so far

SWEEP.toml:

    out = "runs/sweep-lr"                  # trials/, results.tsv, results.jsonl, report.txt, winner.toml
    base = "configs/toy.toml"              # the training config every trial starts from
    method = "grid"                        # "grid" | "random" (`trials` draws) | "optuna" (needs optuna)
    trials = 8                             # configurations for random / optuna
    seeds = [0, 1, 2]                      # K training seeds (train.seed) per configuration
    sample_seed = 0                        # random / optuna draws
    test = "welch"                         # "welch" | "bootstrap": the test against the untrained baseline
    [set]                                  # overrides for every trial
    "train.steps" = 200
    [space]
    "optim.lr_g" = [1e-6, 5e-6, 1e-5]                       # grid values / random choice
    "method.renoise_m" = { low = 0.0, high = 1.5 }          # random: uniform
    "optim.lr_d" = { low = 1e-6, high = 1e-4, log = true }  # random: log-uniform
    [eval]                                 # `ladd eval` options (EvalConfig fields); data is required
    data = "runs/eval"
    features = "inception"

A trial = one training run + `ladd eval` of its last checkpoint, in a subprocess (`python -m ladd.sweep
trial SPEC.json`), one per GPU (CUDA_VISIBLE_DEVICES) or one after another on CPU; appended to
results.tsv/.jsonl as it finishes, never run again (unless it crashed: "failed"). The training health
rules mark trials "collapsed" or "diverged": reported, never dropped. Lower KID is better; the statistics
are explained in docs/evaluation.md.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STATUSES = ("ok", "collapsed", "diverged", "failed")


# --------------------------------------------------------------------------------------------------
# statistics: Welch's t-test with the t distribution written out, and a bootstrap


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this; use the symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    frac = d = 1.0 / (d if abs(d) > tiny else tiny)
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * frac / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_test(a, b) -> dict:
    """Welch's unequal-variance t-test of mean(a) − mean(b). With len(b) == 1 (a deterministic
    baseline), a one-sample t-test of a against that value; with len(a) < 2, no p-value."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2:
        return {"test": "welch", "diff": diff, "t": None, "df": None, "p": None}
    va = a.var(ddof=1) / len(a)
    vb = b.var(ddof=1) / len(b) if len(b) > 1 else 0.0
    se = math.sqrt(va + vb)
    if se == 0:
        return {"test": "welch", "diff": diff, "t": None, "df": None, "p": 0.0 if diff else 1.0}
    t = diff / se
    # Welch–Satterthwaite; a single baseline value contributes no variance and no degrees of freedom.
    df = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + (vb**2 / (len(b) - 1) if len(b) > 1 else 0.0)))
    return {"test": "welch", "diff": diff, "t": float(t), "df": df, "p": t_two_sided_p(float(t), df)}


def bootstrap_test(a, b, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Two-sided bootstrap test of mean(a) − mean(b) = 0 (both samples shifted to the pooled mean)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = float(a.mean() - b.mean())
    pooled = np.concatenate([a, b]).mean()
    rng = np.random.default_rng(seed)
    a0, b0 = a - a.mean() + pooled, b - b.mean() + pooled
    ra = a0[rng.integers(0, len(a), (n_resamples, len(a)))].mean(1)
    rb = b0[rng.integers(0, len(b), (n_resamples, len(b)))].mean(1)
    p = (np.sum(np.abs(ra - rb) >= abs(diff)) + 1) / (n_resamples + 1)
    return {"test": "bootstrap", "diff": diff, "t": None, "df": None, "p": float(p)}


# --------------------------------------------------------------------------------------------------
# the sweep file and its trials


@dataclass(kw_only=True)
class SweepSpec:
    out: str
    base: str | None = None
    method: str = "grid"
    trials: int = 8
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sample_seed: int = 0
    test: str = "welch"
    alpha: float = 0.05
    set: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    def __post_init__(self):
        from ladd.eval.commands import EvalConfig

        if self.method not in ("grid", "random", "optuna"):
            raise ValueError(f"sweep method {self.method!r}: choose grid, random or optuna")
        if self.test not in ("welch", "bootstrap"):
            raise ValueError(f"sweep test {self.test!r}: choose welch or bootstrap")
        if not self.seeds:
            raise ValueError("sweep seeds: at least one training seed")
        if "data" not in self.eval:
            raise ValueError("[eval] needs data = a `ladd precompute` folder of held-out prompts")
        bad = (set(self.eval) - set(EvalConfig.__dataclass_fields__)) | ({"source", "path", "out"} & set(self.eval))
        if bad:
            raise ValueError(f"[eval]: unknown or reserved keys {sorted(bad)}")
        for key, values in self.space.items():
            if "." not in key:
                raise ValueError(f"[space] key {key!r}: expected section.key")
            if self.method == "grid" and not isinstance(values, list):
                raise ValueError(f"[space] {key}: a grid needs a list of values, got {values!r}")
            if isinstance(values, dict) and not {"low", "high"} <= set(values):
                raise ValueError(f"[space] {key}: a range needs low and high")


def load_sweep(path: str | Path) -> SweepSpec:
    data = tomllib.loads(Path(path).read_text())
    if unknown := set(data) - set(SweepSpec.__dataclass_fields__):
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return SweepSpec(**data)


def config_id(params: dict) -> str:
    return "c" + hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def _draw(values, rng: np.random.Generator):
    if isinstance(values, list):
        return values[int(rng.integers(len(values)))]
    low, high = float(values["low"]), float(values["high"])
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if values.get("log") else rng.uniform(low, high)
    return int(round(x)) if values.get("int") else float(x)


def configurations(spec: SweepSpec) -> list[dict]:
    """Every configuration of a grid, or `trials` random draws (the same list on every resume)."""
    keys = sorted(spec.space)
    if spec.method == "grid":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(spec.space[k] for k in keys))]
    rng = np.random.default_rng(spec.sample_seed)
    return [{k: _draw(spec.space[k], rng) for k in keys} for _ in range(spec.trials)]


@dataclass
class Trial:
    trial_id: str  # config_id-s<seed>
    config_id: str  # a hash of the params: the same configuration has the same id on every resume
    params: dict
    seed: int
    dir: Path  # OUT/trials/<trial_id>: trial.json, log.txt, result.json, eval.json, run/


def trials_of(spec: SweepSpec, params_list: list[dict]) -> list[Trial]:
    out = Path(spec.out)
    return [Trial(f"{config_id(p)}-s{s}", config_id(p), p, s, out / "trials" / f"{config_id(p)}-s{s}")
            for p in params_list for s in spec.seeds]


def overrides(spec: SweepSpec, trial: Trial) -> list[str]:
    """`--set` overrides of a trial: the sweep's fixed ones, the configuration's, the seed and the folder."""
    sets = {**spec.set, **trial.params, "train.seed": trial.seed, "train.out": str(trial.dir / "run")}
    return [f"{k}={json.dumps(v) if isinstance(v, str | bool | list) else repr(v)}" for k, v in sets.items()]


# --------------------------------------------------------------------------------------------------
# one trial, in its own process


def run_trial_here(spec_file: str | Path) -> dict:
    """Train, check health, evaluate; write result.json beside the spec. Runs inside the subprocess."""
    from ladd.config import load_config
    from ladd.eval.commands import EvalConfig, evaluate
    from ladd.train.loop import train

    job = json.loads(Path(spec_file).read_text())
    folder = Path(spec_file).parent
    cfg = load_config(job["base"], job["overrides"])
    trained = train(cfg)
    status = health_status(cfg, trained)
    row = {"status": status, "train": trained}
    if status != "diverged":
        result = evaluate(EvalConfig(**job["eval"], source="run", path=cfg.train.out, out=str(folder / "eval.json")))
        student, base = result["rows"][0], result["untrained"]
        row.update({k: student[k] for k in ("kid", "fid", "latent_mse", "caption_accuracy")},
                   untrained={"kid": base["kid"], "fid": base["fid"]})
        if not math.isfinite(student["kid"]["mean"]):
            row["status"] = "diverged"
    (folder / "result.json").write_text(json.dumps(row, indent=1) + "\n")
    return row


def health_status(cfg, trained: dict) -> str:
    """The trainer's own health rules, replayed over the run's metrics.jsonl."""
    from ladd.train.health import read_metrics, replay

    stopped = {"stop_nonfinite": "diverged", "stop_collapse": "collapsed"}.get(trained.get("stopped"))
    if stopped:
        return stopped
    fired = replay(cfg.health, read_metrics(Path(cfg.train.out) / "metrics.jsonl"))
    collapsed = fired["collapse_logits"] or fired["diversity"] or fired["drift"]
    return "collapsed" if collapsed else "ok"


def subprocess_runner(trial: Trial, job: dict, env: dict[str, str]) -> dict:
    """The default runner: `python -m ladd.sweep trial SPEC.json` with this worker's GPU."""
    trial.dir.mkdir(parents=True, exist_ok=True)
    spec_file = trial.dir / "trial.json"
    spec_file.write_text(json.dumps(job, indent=1) + "\n")
    (trial.dir / "result.json").unlink(missing_ok=True)
    with open(trial.dir / "log.txt", "w") as log:
        proc = subprocess.run([sys.executable, "-m", "ladd.sweep", "trial", str(spec_file)], env={**os.environ, **env},
                              stdout=log, stderr=subprocess.STDOUT)
    result = trial.dir / "result.json"
    if proc.returncode != 0 or not result.is_file():
        tail = (trial.dir / "log.txt").read_text()[-400:].strip().splitlines()
        return {"status": "failed", "error": f"exit {proc.returncode}: {tail[-1] if tail else ''}"}
    return json.loads(result.read_text())


def devices() -> list[dict[str, str]]:
    """One environment per worker: each visible GPU alone; on CPU a single sequential worker."""
    import torch

    if not torch.cuda.is_available():
        return [{}]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return [{"CUDA_VISIBLE_DEVICES": i} for i in ids]


# --------------------------------------------------------------------------------------------------
# the sweep: resumable, results appended as trials finish


def read_results(out: str | Path) -> list[dict]:
    """The latest row of each trial in results.jsonl; a line cut by a kill is ignored (that trial runs
    again), and so is a "failed" row followed by a newer one (a failed trial is retried on resume)."""
    path = Path(out) / "results.jsonl"
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.pop(row["trial_id"], None)  # keep file order of the latest rows
        rows[row["trial_id"]] = row
    return list(rows.values())


def finished(out: str | Path) -> set[str]:
    """Trials never to run again: every recorded one but those that failed (crashed, no result)."""
    return {r["trial_id"] for r in read_results(out) if r["status"] != "failed"}


TSV_COLUMNS = ("trial_id", "config_id", "seed", "status", "kid_mean", "kid_std", "fid", "latent_mse",
               "caption_all", "untrained_kid", "params")


def _append(out: Path, row: dict) -> None:
    path = out / "results.jsonl"
    cut = path.is_file() and not path.read_bytes().endswith(b"\n") and path.stat().st_size > 0
    with open(path, "a") as f:  # after a line cut by a kill, a fresh line (the cut one stays unreadable)
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")
    tsv = out / "results.tsv"
    new = not tsv.is_file()
    kid, fid, cap = row.get("kid") or {}, row.get("fid") or {}, row.get("caption_accuracy") or {}
    values = [row["trial_id"], row["config_id"], row["seed"], row["status"], kid.get("mean"), kid.get("std"),
              fid.get("mean"), row.get("latent_mse"), cap.get("all"),
              (row.get("untrained") or {}).get("kid", {}).get("mean"), json.dumps(row["params"], sort_keys=True)]
    with open(tsv, "a") as f:
        if new:
            f.write("\t".join(TSV_COLUMNS) + "\n")
        f.write("\t".join("" if v is None else str(v) for v in values) + "\n")


def run_sweep(spec: SweepSpec, runner=subprocess_runner, workers: list[dict[str, str]] | None = None) -> dict:
    """Run every trial not yet in results.jsonl, then write and return the report."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.method == "optuna":
        return _run_optuna(spec, runner, workers)
    done = finished(out)
    todo = [t for t in trials_of(spec, configurations(spec)) if t.trial_id not in done]
    print(f"sweep {out}: {len(done)} trials done, {len(todo)} to run")
    _run_trials(spec, todo, runner, workers or devices())
    return report(spec)


def _run_trials(spec: SweepSpec, todo: list[Trial], runner, workers: list[dict[str, str]]) -> None:
    out, lock = Path(spec.out), threading.Lock()
    free = list(workers)

    def one(trial: Trial) -> None:
        with lock:
            env = free.pop()
        try:
            job = {"base": spec.base, "overrides": overrides(spec, trial), "eval": spec.eval}
            row = runner(trial, job, env)
        finally:
            with lock:
                free.append(env)
        row = {"trial_id": trial.trial_id, "config_id": trial.config_id, "seed": trial.seed,
               "params": trial.params, **row}
        with lock:  # appended as each trial finishes, so a kill loses at most the running ones
            _append(out, row)
            kid = (row.get("kid") or {}).get("mean")
            print(f"trial {trial.trial_id} {row['status']}" + (f" kid {kid:.5f}" if kid is not None else "")
                  + f" {json.dumps(trial.params)}", flush=True)

    if len(workers) == 1:
        for trial in todo:
            one(trial)
        return
    pool = futures.ThreadPoolExecutor(len(workers))
    try:
        for f in futures.as_completed([pool.submit(one, t) for t in todo]):
            f.result()
    finally:  # on Ctrl-C: queued trials are cancelled, running ones (interrupted too) are waited for
        pool.shutdown(wait=True, cancel_futures=True)


def _run_optuna(spec: SweepSpec, runner, workers) -> dict:
    """TPE over the space, one configuration (K seeds) at a time. On resume the recorded configurations
    are finished (an interrupted one runs its missing seeds) and told to a fresh study, in order."""
    try:
        import optuna
    except ImportError:
        raise ValueError("method = 'optuna' needs optuna: pip install optuna (or use grid / random)") from None
    d = optuna.distributions
    dist = {k: d.CategoricalDistribution(v) if isinstance(v, list) else (
        d.IntDistribution if v.get("int") else d.FloatDistribution)(v["low"], v["high"], log=bool(v.get("log")))
        for k, v in spec.space.items()}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=spec.sample_seed))

    def finish(params: dict) -> float | None:  # run the missing seeds; the mean KID of the healthy ones
        _run_trials(spec, [t for t in trials_of(spec, [params]) if t.trial_id not in finished(spec.out)],
                    runner, workers or devices())
        ok = [r["kid"]["mean"] for r in read_results(spec.out) if r["config_id"] == config_id(params)
              and r["status"] == "ok"]
        return float(np.mean(ok)) if ok else None

    for params in {r["config_id"]: r["params"] for r in read_results(spec.out)}.values():
        value = finish(params)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=value,
                                                  state=optuna.trial.TrialState.COMPLETE if value is not None
                                                  else optuna.trial.TrialState.FAIL))
    while len(study.trials) < spec.trials:
        trial = study.ask(dist)
        value = finish(trial.params)
        study.tell(trial, value, state=None if value is not None else optuna.trial.TrialState.FAIL)
    return report(spec)


# --------------------------------------------------------------------------------------------------
# the report


def report(spec: SweepSpec) -> dict:
    """Per configuration: KID mean ± std over seeds, the difference to the untrained baseline with a
    significance test, a ranking; the winner written as a ready `ladd train` config."""
    rows = read_results(spec.out)
    configs: dict[str, dict] = {}
    for r in rows:
        c = configs.setdefault(r["config_id"], {"config_id": r["config_id"], "params": r["params"], "values": [],
                                                "status": {s: 0 for s in STATUSES}, "baseline": None})
        c["status"][r["status"]] = c["status"].get(r["status"], 0) + 1
        if r["status"] == "ok":
            c["values"].append(r["kid"]["mean"])
            c["baseline"] = c["baseline"] or r["untrained"]["kid"]
    for c in configs.values():
        v = np.array(c["values"])
        c.update(n=len(v), mean=float(v.mean()) if len(v) else None, std=float(v.std(ddof=1)) if len(v) > 1 else None)
        if len(v) and c["baseline"]:
            base = c["baseline"]["per_seed"]
            test = welch_test(v, base) if spec.test == "welch" else bootstrap_test(v, base)
            c["vs_untrained"] = {**test, "significant": test["p"] is not None and test["p"] < spec.alpha}
    # Configurations where every seed trained healthily rank first; a failed, collapsed or diverged
    # seed puts a configuration after them however good its surviving seeds look; no data last.
    ranking = sorted(configs.values(), key=lambda c: (c["mean"] is None, c["n"] < sum(c["status"].values()),
                                                      c["mean"] if c["mean"] is not None else 0))
    for rank, c in enumerate(ranking, 1):
        c["rank"] = rank if c["mean"] is not None else None
    result = {"out": spec.out, "metric": "kid (lower is better)", "test": spec.test, "alpha": spec.alpha,
              "ranking": ranking, "winner": None}
    if ranking and ranking[0]["mean"] is not None:
        result["winner"] = write_winner(spec, ranking[0])
    text = format_report(result)
    print(text)
    Path(spec.out, "report.txt").write_text(text + "\n")
    Path(spec.out, "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def write_winner(spec: SweepSpec, best: dict) -> str:
    from ladd.config import load_config, to_toml

    trial = Trial("winner", best["config_id"], best["params"], spec.seeds[0], Path(spec.out) / "winner")
    cfg = load_config(spec.base, overrides(spec, trial))  # trains into OUT/winner/run
    path = Path(spec.out) / "winner.toml"
    path.write_text(f"# winner of {spec.out}: {json.dumps(best['params'])}, KID {best['mean']:.5f} over "
                    f"{best['n']} seeds\n# ladd train --config {path}\n" + to_toml(cfg))
    return str(path)


def format_report(result: dict) -> str:
    head = f"{'rank':>4}  {'config':<10} {'KID x1e3 mean ± std':>22} {'n':>3}  {'vs untrained':>13} {'p':>8}  " \
           f"{'bad':>9}  params"
    lines = [f"sweep {result['out']}: {result['metric']}, {result['test']} test at alpha {result['alpha']}", head]
    for c in result["ranking"]:
        mean = "—" if c["mean"] is None else f"{1e3 * c['mean']:.3f}" + (
            f" ± {1e3 * c['std']:.3f}" if c["std"] is not None else "")
        vs = c.get("vs_untrained") or {}
        diff = f"{1e3 * vs['diff']:+.3f}" if vs else "—"
        p = "—" if vs.get("p") is None else f"{vs['p']:.3g}{'*' if vs['significant'] else ''}"
        bad = ",".join(f"{k}:{n}" for k, n in c["status"].items() if k != "ok" and n) or "0"
        lines.append(f"{c['rank'] or '-':>4}  {c['config_id']:<10} {mean:>22} {c['n']:>3}  {diff:>13} {p:>8}  "
                     f"{bad:>9}  {json.dumps(c['params'])}")
    if result["winner"]:
        lines.append(f"winner: {result['ranking'][0]['config_id']} -> {result['winner']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweeps with seeds and statistics (resumable)")
    p.add_argument("spec", help="a sweep TOML file")
    p.add_argument("--dry-run", action="store_true", help="list the trials and exit")
    p.add_argument("--report", action="store_true", help="only the report from the results so far")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    spec = load_sweep(args.spec)
    if args.dry_run:
        done = finished(spec.out)
        for t in trials_of(spec, configurations(spec)) if spec.method != "optuna" else []:
            print(f"{t.trial_id}  {'done' if t.trial_id in done else 'todo'}  {' '.join(overrides(spec, t))}")
        return 0
    report(spec) if args.report else run_sweep(spec)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "trial":
        run_trial_here(sys.argv[2])
    else:
        sys.exit("usage: python -m ladd.sweep trial TRIAL.json (the sweep's own subprocess)")
