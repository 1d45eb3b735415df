"""How many graphs compiled blocks cost, with captions of varying length: the caption-length choice.

Runs the tiny model (6 main layers + 2 refiners, dim 64) on CPU through calls whose captions change
length every time, with its blocks compiled four ways, and counts dynamo's graphs:
  static   static shapes (`dynamic=False`): one graph per padded caption length
  auto     dynamo's default: static first, then dynamic after a shape changes (a second compile)
  mark     what `ladd` does: batch and caption-dependent sequence dims marked dynamic up front
  bucket   the joint and caption sequences padded (masked) to multiples of --bucket, static shapes
Scenarios: "sample" (no-grad forwards, CFG-doubled batch, as precompute/eval), "ladd-full" and
"ladd-lora" (LADD steps, gradient checkpointing on). One JSON line per (scenario, mode); counting
graphs needs no real compiler, so the default backend is aot_eager (inductor gives the same guards).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/compile_recompiles.py            # all, one process each
    HF_HUB_OFFLINE=1 .venv/bin/python bench/compile_recompiles.py --scenario ladd-lora --mode mark
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

SCENARIOS = ("sample", "ladd-full", "ladd-lora")
MODES = ("static", "auto", "mark", "bucket")
# (caption tokens of sample 0, of sample 1): padded to 32s, mixed equal / unequal (mask or none).
LENGTHS = [(7, 20), (40, 41), (100, 13), (250, 70), (33, 180), (5, 300), (64, 64), (120, 30), (9, 9),
           (200, 111), (77, 3), (150, 150)]


class LimitHits(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings: from then on the block runs eagerly."""

    def __init__(self):
        super().__init__()
        self.hits = 0

    def emit(self, record):
        if "recompile_limit" in record.getMessage():
            self.hits += 1


def pad_to_buckets(tr, bucket: int) -> dict:
    """Pad the caption and joint sequences to multiples of `bucket` with masked tokens (exact for the
    real tokens: padded keys are masked out, padded queries are never read). Returns token counts."""
    seen = {"real": 0, "unbucketed": 0, "padded": 0}
    prep, unified = tr._prepare_sequence, tr._build_unified_sequence

    def pad(feats, freqs, mask):
        L = feats.shape[1]
        Lb = -(-L // bucket) * bucket
        mask = torch.ones(feats.shape[:2], dtype=torch.bool) if mask is None else mask
        seen["real"] += int(mask.sum())
        seen["unbucketed"] += feats.shape[0] * L  # padded to the batch's longest, as without buckets
        seen["padded"] += feats.shape[0] * Lb
        return F.pad(feats, (0, 0, 0, Lb - L)), F.pad(freqs, (0, 0, 0, Lb - L)), F.pad(mask, (0, Lb - L))

    def prep_padded(**kw):
        feats, freqs, mask, lens, nm = prep(**kw)
        if kw["pad_token"] is tr.cap_pad_token:
            feats, freqs, mask = pad(feats, freqs, mask)
        return feats, freqs, mask, lens, nm

    def unified_padded(**kw):
        u, f, m, nm = unified(**kw)
        return (*pad(u, f, m), nm)

    tr._prepare_sequence, tr._build_unified_sequence = prep_padded, unified_padded
    return seen


def run(scenario: str, mode: str, backend: str, bucket: int) -> dict:
    from torch._dynamo.utils import counters

    import ladd.models.zimage as zimage
    from ladd.config import MethodConfig
    from ladd.models.compile import RECOMPILE_LIMIT, transformer_blocks
    from ladd.models.discriminator import Discriminator
    from ladd.models.lora import TeacherView, add_lora
    from ladd.models.tiny import build_tiny_pipeline
    from ladd.models.zimage import ZImageAdapter
    from ladd.train.step import Batch, LaddModels, ladd_step, trainable

    hits = LimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    if mode != "mark":
        zimage.mark_dynamic = lambda tensors, dims: None  # the adapter's hint off: dynamo's own choice
    tr = build_tiny_pipeline(seed=5).transformer
    roots, tokens = [tr], None
    if scenario == "ladd-lora":
        add_lora(tr, 4, 4)
        student, teacher = ZImageAdapter(tr).train(), TeacherView(tr)
    elif scenario == "ladd-full":
        st = copy.deepcopy(tr).requires_grad_(True)
        student, teacher, roots = ZImageAdapter(st).train(), ZImageAdapter(tr), [tr, st]
    else:
        teacher = ZImageAdapter(tr.eval().requires_grad_(False))
    if mode == "bucket":
        tokens = [pad_to_buckets(r, bucket) for r in roots]
    for r in roots:
        for block in transformer_blocks(r):
            block.compile(backend=backend, dynamic=False if mode in ("static", "bucket") else None)
    g = torch.Generator().manual_seed(0)
    if scenario != "sample":
        student.gradient_checkpointing = teacher.gradient_checkpointing = True
        torch.manual_seed(0)
        disc = Discriminator(feature_dim=64, layers=[1, 3, 5], text_dim=32, hidden=64, cond_dim=64,
                             num_teacher_layers=6)
        models = LaddModels(student, teacher, disc)
        opt_g, opt_d = torch.optim.AdamW(trainable(student), lr=1e-4), torch.optim.AdamW(trainable(disc), lr=1e-4)
        rng = torch.Generator().manual_seed(1)
    graphs, last_new, t0 = [], 0, time.perf_counter()
    for step, (a, b) in enumerate(LENGTHS):
        caps = [torch.randn(a, 32, generator=g), torch.randn(b, 32, generator=g)]
        x = torch.randn(2, 16, 24, 24, generator=g)  # 144 image tokens: no size equal to dim 64
        if scenario == "sample":  # CFG: cond + a short negative prompt in one batch of 4
            with torch.no_grad():
                teacher(torch.cat([x, x]), torch.full((4,), 0.5), caps + [c[:8] for c in caps])
        else:
            ladd_step(models, opt_g, opt_d, [Batch(x, caps, torch.randn(2, 32, generator=g))], step,
                      MethodConfig(), rng)
        graphs.append(counters["stats"]["unique_graphs"])
        if len(graphs) > 1 and graphs[-1] > graphs[-2]:
            last_new = step
    row = {"scenario": scenario, "mode": mode, "backend": backend, "calls": len(LENGTHS),
           "graphs": graphs[-1], "graphs_after_each_call": graphs, "last_call_with_a_new_graph": last_new,
           "recompile_limit": RECOMPILE_LIMIT, "recompile_limit_hits": hits.hits,
           "graph_breaks": sum(counters["graph_break"].values()), "wall_s": round(time.perf_counter() - t0, 1)}
    if tokens:
        real, padded = sum(t["real"] for t in tokens), sum(t["padded"] for t in tokens)
        unbucketed = sum(t["unbucketed"] for t in tokens)
        row.update(bucket=bucket, tokens_over_unbucketed=round(padded / unbucketed, 3),
                   tokens_over_real=round(padded / real, 3))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=SCENARIOS, nargs="+", default=list(SCENARIOS))
    ap.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES))
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--bucket", type=int, default=64, help="bucket size in tokens (mode bucket)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation on a shared machine
    warnings.filterwarnings("ignore")
    if len(args.scenario) == 1 and len(args.mode) == 1:
        print(json.dumps(run(args.scenario[0], args.mode[0], args.backend, args.bucket)), flush=True)
        return
    for scenario in args.scenario:  # one process each: dynamo's caches and counters are global
        for mode in args.mode:
            cmd = [sys.executable, __file__, "--scenario", scenario, "--mode", mode, "--backend", args.backend,
                   "--bucket", str(args.bucket)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            print(lines[-1] if lines else json.dumps({"scenario": scenario, "mode": mode,
                                                      "error": out.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
