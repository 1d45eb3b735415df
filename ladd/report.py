"""The demo's report: report.html with its figures (sample grid, training curves) and the headline.

Rendering only: `ladd demo` (ladd/demo.py) computes report.json's numbers and calls these.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np


def headline(r: dict) -> str:
    k = r["kid"]
    return (f"KID teacher {k['teacher']['mean']:.4f} | untrained {k['untrained']['mean']:.4f} | LADD "
            f"{k['ladd']['mean']:.4f} ± {k['ladd']['std']:.4f} (n={k['ladd']['n']}); gap closed "
            f"{r['gap_closed']:.2f}; (untrained − LADD) / SE = {r['ladd_vs_untrained_se']:.1f}; "
            + "".join(f"at {name}: gap closed {b['gap_closed']:.2f}, SE {b['ladd_vs_untrained_se']:.1f}; "
                      for name, b in r.get("buckets", {}).items() if b["kid"] is not None)
            + guards_line(r))


def guards_line(r: dict) -> str:
    """Which health guards fired in which seed (replayed from each run's metrics.jsonl)."""
    guards = ("collapse_logits", "diversity", "drift")
    fired = [f"{name} ({', '.join(g for g in guards if v[g])})"
             for name, v in r.get("health", {}).items() if any(v[g] for g in guards)]
    return "health guards fired: " + "; ".join(fired) if fired else "no health guard fired"


def grid_png(eval_dir: Path, run: Path, ema: bool = False, n: int = 8) -> str:
    """teacher 50 steps | untrained 4 steps | LADD 4 steps on the first `n` prompts of the eval set (its
    references' own seeds; with several buckets those of the first bucket), as base64 PNG."""
    from ladd.eval.kid import load_references
    from ladd.eval.samplers import load_sampler, untrained_sampler
    from ladd.images import png_bytes, tile

    refs = load_references(eval_dir, limit=n)
    g = refs.groups[0]  # the first bucket's prompts (all of them with one bucket): one size tiles
    prompts, seeds = [refs.prompts[i] for i in g.indices], [refs.seeds[i] for i in g.indices]
    student = load_sampler("run", run, ema=ema, steps=4, device="cpu", dtype="fp32")
    # The untrained row visits the student's own timesteps, as the table's baseline does.
    untrained = untrained_sampler(student.pipe, 4, student.info["timesteps"])
    rows = [g.images] + [s.images(s.latents(prompts, seeds, g.bucket.size)) for s in (untrained, student)]
    grid = tile(np.concatenate(rows), cols=len(rows[0]), upscale=2)
    return base64.b64encode(png_bytes(grid)).decode()


def curves_png(runs: list[Path], report: dict) -> str:
    """The training metrics of every seed, then KID and caption accuracy on the eval set over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["d_loss", "g_loss", "logit_gap", "accuracy_real", "accuracy_fake", "val_latent_mse"]
    evals = {"KID on the eval set (dashed: teacher)": ("kid", report["kid"]["teacher"]["mean"]),
             "caption accuracy on the eval set (dashed: teacher)": ("caption_accuracy",
                                                                    report["caption_accuracy"]["teacher"])}
    fig, axes = plt.subplots(2, 4, figsize=(16, 6))
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for ax, key in zip(axes.flat, keys):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if pts:
                ax.plot(*zip(*pts), label=run.name, lw=1)
        points = report.get("over_steps", {}).get(run.name, [])
        for ax, (key, _) in zip(axes.flat[len(keys):], evals.values()):
            pts = [(p["step"], p[key]) for p in points if p[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=run.name, lw=1)
    for ax, (title, (_, teacher)) in zip(axes.flat[len(keys):], evals.items()):
        if teacher is not None and math.isfinite(teacher):
            ax.axhline(teacher, ls="--", color="gray", lw=1)
    for ax, title in zip(axes.flat, keys + list(evals)):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def bucket_table(buckets: dict, fmt) -> str:
    """The per-bucket results of a multi-aspect demo: each size's KID, gap closed, SE and captions."""
    rows = []
    for name, b in buckets.items():
        if b["kid"] is None:
            rows.append(f"<tr><td>{name} ({b['num_images']} images)</td><td colspan=6>too few images for KID</td></tr>")
            continue
        k, c = b["kid"], b["caption_accuracy"]
        rows.append(f"<tr><td>{name} ({b['num_images']} images)</td><td>{fmt(k['teacher'])}</td><td>{fmt(k['untrained'])}"
                    f"</td><td>{fmt(k['ladd']['mean'])} ± {fmt(k['ladd']['std'])}</td><td>{fmt(b['gap_closed'])}</td>"
                    f"<td>{fmt(b['ladd_vs_untrained_se'])}</td><td>{fmt(c['teacher'])} / {fmt(c['untrained'])} / "
                    f"{fmt((c['ladd'] or {}).get('mean'))}</td></tr>")
    return ("<h3>Per bucket</h3><table><tr><th>bucket</th><th>KID teacher</th><th>KID untrained</th><th>KID LADD</th>"
            "<th>gap closed</th><th>SE</th><th>captions teacher / untrained / LADD</th></tr>" + "".join(rows) + "</table>")


def ablation_table(variants: dict, fmt) -> str:
    """`ladd demo --ablation`: one loss term removed at a time (pure LADD at its own rates), on the default's
    data and seeds."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{fmt(v['kid']['mean'])} ± {fmt(v['kid']['std'])}</td>"
        f"<td>{fmt(v['gap_closed'])}</td><td>{fmt(v['vs_untrained_se'])}</td>"
        f"<td>{fmt(v['kid_minus_default']['mean'])} ± {fmt(v['kid_minus_default']['std'])}</td>"
        f"<td>{fmt((v['caption_accuracy'] or {}).get('mean'))}</td>"
        f"<td>{html.escape(guards_line(v))}</td></tr>" for name, v in variants.items())
    return ("<h3>Ablation (same data, seeds and steps)</h3><table><tr><th>variant</th><th>KID ↓</th>"
            "<th>gap closed</th><th>(untrained − it) / SE</th><th>KID − default's, per seed (mean ± std)</th>"
            "<th>caption accuracy</th><th>health guards</th></tr>" + rows + "</table>")


def render_html(r: dict, grid: str, runs: list[Path]) -> str:
    def fmt(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    k, a = r["kid"], r["caption_accuracy"]
    ladd_acc = a["ladd"] or {}
    gaps = r.get("gap_closed_per_eval_seed")
    per_eval_seed = f" · gap closed at each eval seed: {', '.join(fmt(g) for g in gaps)}" if gaps else ""
    table = f"""
<table>
<tr><th></th><th>KID ↓ (mean ± std over seeds)</th><th>caption accuracy ↑</th><th>latent MSE to teacher ↓</th></tr>
<tr><td>teacher, 50 steps, CFG 5 (noise floor)</td><td>{fmt(k['teacher']['mean'])}</td><td>{fmt(a['teacher'])}</td><td>—</td></tr>
<tr><td>untrained student, 4 steps</td><td>{fmt(k['untrained']['mean'])}</td><td>{fmt(a['untrained'])}</td>
<td>{fmt(r['latent_mse']['untrained'])}</td></tr>
<tr><td>LADD student, 4 steps ({k['ladd']['n']} seeds)</td><td>{fmt(k['ladd']['mean'])} ± {fmt(k['ladd']['std'])}
 <small>(subset std per seed: {', '.join(fmt(s) for s in k['ladd_subset_std'])})</small></td>
<td>{fmt(ladd_acc.get('mean'))} ± {fmt(ladd_acc.get('std'))}</td>
<td>{fmt((r['latent_mse']['ladd'] or {}).get('mean'))}</td></tr>
</table>
<p>gap closed (KID): <b>{fmt(r['gap_closed'])}</b> · (untrained − LADD) / standard error:
<b>{fmt(r['ladd_vs_untrained_se'])}</b>{per_eval_seed}</p>
<p><small>Every row samples the eval prompts from the same fresh noise (eval seeds {r.get('eval_seeds', '—')}),
which the references do not use; latent MSE is at the references' own noise.</small></p>"""
    if r.get("buckets"):
        table += bucket_table(r["buckets"], fmt)
    if r.get("ablation"):
        table += ablation_table(r["ablation"], fmt)
    reused = set(r.get("seconds_reused", []))
    timing = "".join(f"<tr><td>{name}</td><td>{sec:.0f} s{' (reused: an earlier run did this stage)' if name in reused else ''}"
                     f"</td></tr>" for name, sec in r["seconds"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ladd demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>LADD on the toy world</h1>
<p>{headline(r)}</p>
<p>Student loss: {html.escape(r.get('method', ''))}</p>
<h2>Same prompts and seeds: teacher 50 steps | untrained 4 steps | LADD 4 steps (rows)</h2>
<img src="data:image/png;base64,{grid}">
<h2>Metrics</h2>{table}
<h2>Training curves</h2><img src="data:image/png;base64,{curves_png(runs, r)}">
<h2>Stage timings</h2><table>{timing}</table>
<h2>Configuration</h2><pre>{json.dumps(r['config'], indent=1)}</pre>
<h3>Training (seed 0, resolved)</h3><pre>{html.escape(json.dumps(r.get('train_config'), indent=1))}</pre>
<h2>Machine</h2><pre>{json.dumps(r['machine'], indent=1)}</pre>
</body></html>"""
