"""GPU measurements for the 6B Z-Image config (random weights, bf16): run by bench/gpu.sh.

(a) teacher sampling at 512 px with CFG: seconds per 50-step image, images/s, MFU;
(b) LADD step time and peak memory at 512 px, batch 2, for the LoRA student and for the full student
    (gradient checkpointing, 8-bit AdamW when bitsandbytes is there);
(c) `ladd plan`'s estimate beside each measured peak.
Prints one JSON line per measurement.

    python bench/gpu_bench.py --what sampling lora full
    python bench/gpu_bench.py --tiny --device cpu      # a dry run of the same code on a tiny config
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import contextmanager

import torch

from ladd.config import MethodConfig, ModelConfig
from ladd.models.discriminator import Discriminator
from ladd.models.zimage import ZImageAdapter
from ladd.plan import PlanInput, plan
from ladd.train.loop import build_optimizer, build_roles
from ladd.train.step import Batch, LaddModels, ladd_step, trainable

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
def tiny_config() -> dict:
    """The tests' tiny transformer config, for a dry run on CPU (same code path, seconds)."""
    from ladd.models.tiny import TinyConfig, build_transformer

    return {k: v for k, v in build_transformer(TinyConfig()).config.items() if not k.startswith("_")}


def zimage(device, config: dict) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    with torch.device(device):
        model = ZImageTransformer2DModel(**config)  # {}: Z-Image's config (dim 3840, 30 layers, 30 heads)
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def cap_dim(config: dict) -> int:
    return config.get("cap_feat_dim", 2560)


def inputs(batch: int, res: int, device, config: dict, cap_tokens: int = 128):
    lat = res // 8
    x = torch.randn(batch, 16, lat, lat, device=device)
    caps = [torch.randn(cap_tokens, cap_dim(config), device=device, dtype=torch.bfloat16) for _ in range(batch)]
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


def bench_sampling(device, config: dict, res: int, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    adapter = ZImageAdapter(zimage(device, config))
    x, caps = inputs(batch, res, device, config)
    neg = [c[:32] for c in caps]
    x2, sigma = torch.cat([x, x]), torch.full((2 * batch,), 0.5, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter(x2, sigma, caps + neg)
    flops_per_step = counter.get_total_flops()
    with torch.no_grad():
        for _ in range(2):
            adapter(x2, sigma, caps + neg)
        sync(device)
        t0 = time.perf_counter()
        steps = 10
        for _ in range(steps):
            adapter(x2, sigma, caps + neg)
        sync(device)
    per_step = (time.perf_counter() - t0) / steps
    per_image_50 = 50 * per_step / batch
    return {"what": "teacher_sampling_cfg", "resolution": res, "batch": batch, "cfg_batch": 2 * batch,
            "s_per_step": per_step, "s_per_image_50_steps": per_image_50, "images_per_s": 1 / per_image_50,
            "tflop_per_step": flops_per_step / 1e12, "mfu": flops_per_step / per_step / peak_flops(device),
            "peak_gb": mem_gb(device, peak=True), "gpu": gpu_name(device)}


PROGRESS: dict = {}  # what the running measurement got to, for its error row


@contextmanager
def profiled(on: bool, device):
    if not on:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        yield prof


def print_profile(prof, title: str, device, rows: int = 12) -> None:
    """Top ops by self device time and by self CPU time (where a step's time goes)."""
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for sort in (key, "self_cpu_time_total"):
        print(f"# {title}: top {rows} by {sort}", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60), flush=True)


def bench_ladd(device, config: dict, res: int, batch: int, student: str, ckpt: bool = True, steps: int = 4,
               profile: bool = False) -> dict:
    PROGRESS.update(stage="build")
    tr = zimage(device, config)
    layers = ModelConfig().disc_layers if not config else [1, 3, 5]
    s_ad, t_ad = build_roles(tr, student, 64, 64, ckpt)  # as the trainer builds them
    opt_kind = "adamw" if student == "lora" else "adamw8bit"
    disc = Discriminator(feature_dim=tr.config.dim, layers=layers, text_dim=cap_dim(config)).to(device)
    models = LaddModels(s_ad, t_ad, disc)
    try:
        opt_g = build_optimizer(trainable(s_ad), 5e-6, (0.0, 0.99), 0.0, opt_kind)
    except Exception as e:  # bitsandbytes missing (or CPU): say so and use fp32 AdamW
        opt_kind = f"adamw ({opt_kind} unavailable: {str(e).splitlines()[0][:80]})"
        opt_g = build_optimizer(trainable(s_ad), 5e-6, (0.0, 0.99), 0.0)
    opt_d = build_optimizer(trainable(disc), 1e-5, (0.0, 0.99), 0.0)
    PROGRESS.update(optimizer=opt_kind, built_gb=mem_gb(device, peak=False))
    x, caps = inputs(batch, res, device, config)
    b = Batch(x, caps, torch.randn(batch, cap_dim(config), device=device))
    cfg = MethodConfig()
    rng = torch.Generator(device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, static = [], float("nan")
    for step in range(steps):
        PROGRESS.update(stage=f"step {step}")
        sync(device)
        t0 = time.perf_counter()
        with profiled(profile and step == steps - 1, device) as prof:
            with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):  # as the trainer
                ladd_step(models, opt_g, opt_d, [b], step % cfg.gen_update_interval, cfg, rng)
            sync(device)
        times.append(time.perf_counter() - t0)
        if prof is not None:
            print_profile(prof, f"{student} G-step", device)
        if step == 0:
            static = mem_gb(device, peak=False)  # weights + optimizer state (grads are freed after each update)
    est = plan(PlanInput(transformer_config=config, resolution=res, batch_per_rank=batch, student=student,
                         optimizer="adamw8bit" if opt_kind == "adamw8bit" else "adamw", caption_tokens=128,
                         disc_layers=tuple(layers), checkpointing=ckpt))[1]
    return {"what": f"ladd_step_{student}", "resolution": res, "batch": batch, "optimizer": opt_kind,
            "checkpointing": ckpt, "step_s": [round(t, 3) for t in times],
            "g_step_s": times[3] if steps > 3 else times[0], "d_step_s": min(times[1:3]) if steps > 2 else None,
            "static_gb": static, "peak_gb": mem_gb(device, peak=True), "plan_gb": est["total_gb"],
            "plan_largest_batch": est["largest_batch_per_rank"], "gpu": gpu_name(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", nargs="+", default=["lora", "full", "sampling", "lora-nockpt"],
                    help="sampling | lora | full | lora-nockpt | full-nockpt, each optionally @BATCH")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="LADD batch per rank")
    ap.add_argument("--sample-batch", type=int, default=4, help="prompts per sampling forward (×2 with CFG)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny transformer config (a dry run of the code)")
    ap.add_argument("--profile", action="store_true", help="profile the last LADD step (a G-step) of each run")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = tiny_config() if args.tiny else {}
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu_name(device)}), flush=True)
    for what in args.what:
        t0 = time.perf_counter()
        name, _, batch = what.partition("@")
        PROGRESS.clear()
        try:
            if name == "sampling":
                row = bench_sampling(device, config, args.resolution, int(batch or args.sample_batch))
            else:
                student, _, nockpt = name.partition("-")
                if student not in ("lora", "full") or nockpt not in ("", "nockpt"):
                    raise ValueError(f"unknown measurement {what!r}")
                row = bench_ladd(device, config, args.resolution, int(batch or args.batch), student, ckpt=not nockpt,
                                 profile=args.profile)
        except torch.OutOfMemoryError as e:
            row = {"what": what, "error": "out of memory", "detail": str(e).splitlines()[0],
                   "peak_gb": mem_gb(device, peak=True), **PROGRESS}
        except Exception as e:  # one failed measurement must not cost the others (device time is scarce)
            row = {"what": what, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", **PROGRESS}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        gc.collect()  # the models hold reference cycles (peft, hooks): free them before the next measurement
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row["left_allocated_gb"] = mem_gb(device, peak=False)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
