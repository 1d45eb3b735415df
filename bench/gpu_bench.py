"""GPU measurements for the 6B Z-Image config (random weights, bf16), eager and compiled blocks side by
side: run by bench/gpu.sh. One JSON line per measurement.

  sampling   teacher sampling as precompute runs it (Euler steps, CFG = cond + uncond in one batch) at
             each --sample-res × --sample-batch: seconds per step, images/s (50 steps), MFU
  ladd       LADD cycles (gen_update_interval = 3: a G+D step, two D-only steps) at 512 px, LoRA and full
             student, batch 2 and the largest batch `ladd plan` says fits (≤ --max-batch): G-step and
             D-step seconds, GPU-busy fraction of a profiled cycle, MFU of the cycle (its FLOPs counted by
             FlopCounterMode, recomputation included), peak memory beside the plan
  lora1024   the LoRA student at 1024 px, batch 2: step times, peak beside the plan
  cards      smaller cards simulated with torch.cuda.set_per_process_memory_fraction: the configuration
             the plan picks for a 24 GB and a 48 GB card (student, optimizer, checkpointing, batch), run
Single LADD rows: ladd:STUDENT@BATCH/RES[:nockpt], e.g. ladd:lora@8/512, ladd:full@max/512.
`--compile both` (default) gives every sampling and LADD row twice, "compiled": false, then the
backend ("inductor"); the compiled row's first_*_s includes the compile.

    python bench/gpu_bench.py --what sampling ladd lora1024 cards
    python bench/gpu_bench.py --what ladd:lora@2/512 --compile on --profile
    python bench/gpu_bench.py --tiny --device cpu     # a dry run of the same code on the tiny config
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from contextlib import contextmanager, nullcontext

import torch

from ladd.config import MethodConfig, ModelConfig
from ladd.models.compile import compile_blocks
from ladd.models.discriminator import Discriminator
from ladd.models.zimage import ZImageAdapter
from ladd.plan import PlanInput, plan
from ladd.train.loop import build_optimizer, build_roles
from ladd.train.step import Batch, LaddModels, ladd_step, trainable

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
CAPTION_TOKENS = 128
# Usable GiB that torch reports for the simulated cards (an L4 / A10 reports ~22, an L40S ~44.4).
CARDS = {"24GB": 22.0, "48GB": 44.4}
# What the picker tries, most capable first: the first one the plan fits at batch >= 2 is run.
CANDIDATES = [("full", "adamw", False), ("full", "adamw8bit", False), ("full", "adamw", True),
              ("full", "adamw8bit", True), ("lora", "adamw", False), ("lora", "adamw", True),
              ("lora", "adamw8bit", True)]
PROGRESS: dict = {}  # what the running measurement got to, for its error row
FLOPS: dict = {}  # FLOPs per cycle / per sampling step, counted on the eager row, reused by the compiled one


def tiny_config() -> dict:
    """The tests' tiny transformer config, for a dry run on CPU (same code path, seconds)."""
    from ladd.models.tiny import TinyConfig, build_transformer

    return {k: v for k, v in build_transformer(TinyConfig()).config.items() if not k.startswith("_")}


def dtype_on(device) -> torch.dtype:
    """bf16 on the GPU (as the trainer); fp32 on a CPU, where bf16 kernels are slow and only the dry run goes."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def zimage(device, config: dict) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    with torch.device(device):
        model = ZImageTransformer2DModel(**config)  # {}: Z-Image's config (dim 3840, 30 layers, 30 heads)
    return model.to(dtype_on(device)).eval().requires_grad_(False)


def cap_dim(config: dict) -> int:
    return config.get("cap_feat_dim", 2560)


def inputs(batch: int, res: int, device, config: dict, cap_tokens: int = CAPTION_TOKENS):
    lat = res // 8
    x = torch.randn(batch, 16, lat, lat, device=device)
    caps = [torch.randn(cap_tokens, cap_dim(config), device=device, dtype=dtype_on(torch.device(device)))
            for _ in range(batch)]
    return x, caps


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mem_gb(device, peak: bool) -> float:
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 1e9


def gpu_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def peak_flops(device) -> float:
    name = gpu_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), 989e12)


@contextmanager
def profiled(on: bool, device):
    if not on:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        yield prof


def busy_fraction(prof, wall_s: float) -> float | None:
    """Share of the wall time in which at least one GPU kernel ran (kernel intervals merged)."""
    if prof is None:
        return None
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > hi:
            busy, lo, hi = busy + hi - lo, s, e
        else:
            hi = max(hi, e)
    return (busy + hi - lo) / 1e6 / wall_s


def print_profile(prof, title: str, device, rows: int = 12) -> None:
    """Top ops by self device time and by self CPU time (where a step's time goes)."""
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for sort in (key, "self_cpu_time_total"):
        print(f"# {title}: top {rows} by {sort}", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60), flush=True)


# ------------------------------------------------------------------------------------------- sampling


def bench_sampling(device, config: dict, resolutions: list[int], batches: list[int], compiled: bool,
                   backend: str, steps: int = 10) -> list[dict]:
    """Rows for each resolution × batch; one model for all of them (compiled: after the eager rows)."""
    from torch.utils.flop_counter import FlopCounterMode

    PROGRESS.update(stage="build")
    tr = zimage(device, config)
    adapter = ZImageAdapter(tr)
    if compiled:
        compile_blocks(tr, backend=backend)
    rows = []
    for res in resolutions:
        for batch in batches:
            PROGRESS.update(stage=f"sampling {res}px batch {batch}")
            x, caps = inputs(batch, res, device, config)
            neg = [c[:32] for c in caps]
            x2, sigma = torch.cat([x, x]), torch.full((2 * batch,), 0.5, device=device)
            key = ("sampling", res, batch)
            with torch.no_grad():
                if not compiled and key not in FLOPS:
                    with FlopCounterMode(display=False) as counter:
                        adapter(x2, sigma, caps + neg)
                    FLOPS[key] = counter.get_total_flops()
                sync(device)
                t0 = time.perf_counter()
                adapter(x2, sigma, caps + neg)  # compiled: the first call of a new shape may compile
                sync(device)
                first = time.perf_counter() - t0
                adapter(x2, sigma, caps + neg)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    adapter(x2, sigma, caps + neg)
                sync(device)
            per_step = (time.perf_counter() - t0) / steps
            flops = FLOPS.get(key)
            rows.append({"what": "sampling", "compiled": backend if compiled else False, "resolution": res,
                         "batch": batch,
                         "cfg_batch": 2 * batch, "s_per_step": per_step, "first_call_s": first,
                         "images_per_s": batch / (50 * per_step),
                         "tflop_per_step": flops / 1e12 if flops else None,
                         "mfu": flops / per_step / peak_flops(device) if flops else None,
                         "peak_gb": mem_gb(device, peak=True), "gpu": gpu_name(device)})
    del adapter, tr
    return rows


# ------------------------------------------------------------------------------------------- LADD step


def plan_for(config: dict, res: int, batch: int, student: str, optimizer: str, ckpt: bool, layers,
             gpu_mem_gib: float | None = None) -> dict:
    kw = {"gpu_mem_gib": gpu_mem_gib} if gpu_mem_gib else {}
    return plan(PlanInput(transformer_config=config or {}, buckets=((res, res),), batch_per_rank=batch, student=student,
                          optimizer=optimizer, caption_tokens=CAPTION_TOKENS, disc_layers=tuple(layers),
                          checkpointing=ckpt, **kw))[1]


def disc_layers(config: dict) -> list[int]:
    return ModelConfig().disc_layers if not config else [1, 3, 5]


def bench_ladd(device, config: dict, res: int, batch: int, student: str, ckpt: bool, compiled: bool, backend: str,
               optimizer: str | None = None, profile: bool = False, cycles: int = 3) -> dict:
    """Cycles of 3 steps (G+D, D, D): the first warms up (and compiles), the second is timed, the third
    is profiled; the eager row also counts one cycle's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    PROGRESS.update(stage="build")
    tr = zimage(device, config)
    layers = disc_layers(config)
    s_ad, t_ad = build_roles(tr, student, 64, 64, ckpt)  # as the trainer builds them
    if compiled:
        compile_blocks(s_ad.transformer, backend=backend)
        compile_blocks(t_ad.transformer, backend=backend)
    opt_kind = optimizer or ("adamw" if student == "lora" else "adamw8bit")
    disc = Discriminator(feature_dim=tr.config.dim, layers=layers, text_dim=cap_dim(config)).to(device)
    models = LaddModels(s_ad, t_ad, disc)
    try:
        opt_g = build_optimizer(trainable(s_ad), 5e-6, (0.0, 0.99), 0.0, opt_kind)
    except Exception as e:  # bitsandbytes missing (or CPU): say so and use fp32 AdamW
        opt_kind = f"adamw ({opt_kind} unavailable: {str(e).splitlines()[0][:120]})"
        opt_g = build_optimizer(trainable(s_ad), 5e-6, (0.0, 0.99), 0.0)
    opt_d = build_optimizer(trainable(disc), 1e-5, (0.0, 0.99), 0.0)
    PROGRESS.update(optimizer=opt_kind, built_gb=mem_gb(device, peak=False))
    x, caps = inputs(batch, res, device, config)
    b = Batch(x, caps, torch.randn(batch, cap_dim(config), device=device))
    cfg = MethodConfig()
    rng = torch.Generator(device).manual_seed(0)
    step, per_cycle, busy, static, first_cycle = 0, [], None, float("nan"), None

    def cycle(prof_on: bool = False, counter=None) -> list[float]:
        nonlocal step, busy
        times = []
        with profiled(prof_on, device) as prof, counter or nullcontext():
            for _ in range(cfg.gen_update_interval):
                PROGRESS.update(stage=f"step {step}")
                sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False,  # as the trainer
                                    enabled=device.type == "cuda"):
                    ladd_step(models, opt_g, opt_d, [b], step, cfg, rng)
                sync(device)
                times.append(time.perf_counter() - t0)
                step += 1
        if prof is not None:
            busy = busy_fraction(prof, sum(times))
            if profile:
                print_profile(prof, f"{student} {'compiled' if compiled else 'eager'} cycle", device)
        return times

    t0 = time.perf_counter()
    per_cycle.append(cycle())
    first_cycle = time.perf_counter() - t0
    static = mem_gb(device, peak=False)  # weights + optimizer state (grads are freed after each update)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for k in range(1, cycles):
        per_cycle.append(cycle(prof_on=k == 2))
    key = ("ladd", student, res, batch, ckpt)
    if not compiled and key not in FLOPS:
        counter = FlopCounterMode(display=False)
        cycle(counter=counter)
        FLOPS[key] = counter.get_total_flops()
    timed = per_cycle[1] if len(per_cycle) > 1 else per_cycle[0]
    flops = FLOPS.get(key)
    opt_plan = "adamw8bit" if opt_kind == "adamw8bit" else "adamw"
    est = plan_for(config, res, batch, student, opt_plan, ckpt, layers)
    return {"what": f"ladd_{student}", "compiled": backend if compiled else False, "resolution": res, "batch": batch,
            "optimizer": opt_kind, "checkpointing": ckpt, "step_s": [[round(t, 3) for t in c] for c in per_cycle],
            "first_cycle_s": first_cycle, "g_step_s": timed[0], "d_step_s": min(timed[1:]),
            "cycle_s": sum(timed), "gpu_busy_fraction": busy,
            "tflop_per_cycle": flops / 1e12 if flops else None,
            "mfu_cycle": flops / sum(timed) / peak_flops(device) if flops else None,
            "static_gb": static, "peak_gb": mem_gb(device, peak=True), "plan_gb": est["total_gb"],
            "plan_largest_batch": est["largest_batch_per_rank"], "gpu": gpu_name(device)}


def largest_batch(config: dict, res: int, student: str, ckpt: bool, cap: int, device) -> int:
    opt = "adamw" if student == "lora" else "adamw8bit"
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 79.2
    est = plan_for(config, res, 2, student, opt, ckpt, disc_layers(config), gpu_mem_gib=gib)
    return max(2, min(cap, est["largest_batch_per_rank"]))


# ------------------------------------------------------------------------------------------- smaller cards


def pick(config: dict, res: int, gib: float, cap: int) -> dict | None:
    """The plan's choice for a card of `gib` GiB: the first candidate whose largest batch is >= 2."""
    for student, opt, ckpt in CANDIDATES:
        est = plan_for(config, res, 2, student, opt, ckpt, disc_layers(config), gpu_mem_gib=gib)
        if est["largest_batch_per_rank"] >= 2:
            batch = min(cap, est["largest_batch_per_rank"])
            at = plan_for(config, res, batch, student, opt, ckpt, disc_layers(config), gpu_mem_gib=gib)
            return {"student": student, "optimizer": opt, "checkpointing": ckpt, "batch": batch,
                    "plan_gb": at["total_gb"], "capacity_gb": at["capacity_gb"]}
    return None


def bench_card(device, config: dict, name: str, gib: float, res: int, cap: int, backend: str) -> dict:
    choice = pick(config, res, gib, cap)
    row = {"what": "card", "card": name, "usable_gib": gib, "picked": choice}
    if choice is None:
        return {**row, "runs": None, "note": "no configuration fits by the plan"}
    simulated = device.type == "cuda"
    if simulated:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)
    try:
        r = bench_ladd(device, config, res, choice["batch"], choice["student"], choice["checkpointing"], False,
                       backend, optimizer=choice["optimizer"], cycles=2)
        return {**row, "simulated": simulated, "runs": True, **{k: r[k] for k in (
            "optimizer", "g_step_s", "d_step_s", "peak_gb", "plan_gb", "static_gb")}}
    except torch.OutOfMemoryError as e:
        return {**row, "simulated": simulated, "runs": False, "error": "out of memory",
                "detail": str(e).splitlines()[0][:200], "peak_gb": mem_gb(device, peak=True), **PROGRESS}
    finally:
        if simulated:
            torch.cuda.set_per_process_memory_fraction(1.0, device)


# ------------------------------------------------------------------------------------------- driver


def jobs(args, device, config: dict) -> list[tuple[str, object]]:
    """(name, thunk returning a row or rows) for each requested measurement, eager before compiled."""
    scale = 8 if args.tiny else 1  # the tiny dry run: 1/8 of the resolutions (same code, seconds on CPU)
    res_ladd = 512 // scale
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    # A CPU run is a dry run of the code: dynamo's capture without codegen (tests/test_compile.py pins
    # aot_eager and inductor against eager).
    be = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    steps = 2 if args.tiny else 10
    out = []
    for what in args.what:
        if what == "sampling":
            for c in modes:
                out.append((f"sampling{' compiled' if c else ''}", lambda c=c: bench_sampling(
                    device, config, [r // scale for r in args.sample_res], args.sample_batch, c, be, steps)))
            continue
        specs = {"ladd": [("lora", "2", res_ladd, True), ("full", "2", res_ladd, True),
                          ("lora", "max", res_ladd, True), ("full", "max", res_ladd, True)],
                 "lora1024": [("lora", "2", 1024 // scale, True)]}.get(what)
        if what == "cards":
            for name, gib in CARDS.items():
                out.append((f"card {name}", lambda name=name, gib=gib: bench_card(
                    device, config, name, gib, res_ladd, args.max_batch, be)))
            continue
        if specs is None:
            m = re.fullmatch(r"ladd:(lora|full)@(\d+|max)/(\d+)(:nockpt)?", what)
            if not m:
                raise SystemExit(f"unknown measurement {what!r}: sampling, ladd, lora1024, cards or "
                                 "ladd:STUDENT@BATCH/RES[:nockpt]")
            specs = [(m[1], m[2], int(m[3]), not m[4])]
        for student, batch, res, ckpt in specs:
            for c in modes:
                def run(student=student, batch=batch, res=res, ckpt=ckpt, c=c):
                    n = largest_batch(config, res, student, ckpt, args.max_batch, device) if batch == "max" \
                        else int(batch)
                    return bench_ladd(device, config, res, n, student, ckpt, c, be, profile=args.profile)
                out.append((f"ladd:{student}@{batch}/{res}{'' if ckpt else ':nockpt'}{' compiled' if c else ''}", run))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", nargs="+", default=["sampling", "ladd", "lora1024", "cards"],
                    help="sampling | ladd | lora1024 | cards | ladd:STUDENT@BATCH/RES[:nockpt]")
    ap.add_argument("--sample-res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--sample-batch", type=int, nargs="+", default=[4, 8], help="prompts per forward (×2 with CFG)")
    ap.add_argument("--max-batch", type=int, default=None, help="cap on the plan's largest batch (time; "
                    "default 32, --tiny 4)")
    ap.add_argument("--compile", choices=("both", "on", "off"), default="both")
    ap.add_argument("--compile-backend", default=None, help="default: inductor on cuda, eager on cpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny transformer config (a dry run of the code)")
    ap.add_argument("--profile", action="store_true", help="also print the profiled cycle's top ops")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = tiny_config() if args.tiny else {}
    args.max_batch = args.max_batch or (4 if args.tiny else 32)
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu_name(device)}), flush=True)
    for name, thunk in jobs(args, device, config):
        t0 = time.perf_counter()
        PROGRESS.clear()
        try:
            rows = thunk()
        except torch.OutOfMemoryError as e:
            rows = {"what": name, "error": "out of memory", "detail": str(e).splitlines()[0],
                    "peak_gb": mem_gb(device, peak=True), **PROGRESS}
        except Exception as e:  # one failed measurement must not cost the others (device time is scarce)
            rows = {"what": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", **PROGRESS}
        gc.collect()  # the models hold reference cycles (peft, hooks): free them before the next measurement
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for row in rows if isinstance(rows, list) else [rows]:
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            row["left_allocated_gb"] = mem_gb(device, peak=False)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
