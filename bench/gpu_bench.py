"""GPU measurements for the 6B Z-Image config (random weights, bf16): run by bench/gpu.sh.

(a) teacher sampling at 512 px with CFG: seconds per 50-step image, images/s, MFU;
(b) LADD step time and peak memory at 512 px, batch 2, for the LoRA student and for the full student
    (gradient checkpointing, 8-bit AdamW when bitsandbytes is there);
(c) `ladd plan`'s estimate beside each measured peak.
Prints one JSON line per measurement.

    python bench/gpu_bench.py --what sampling lora full
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from ladd.config import MethodConfig
from ladd.models.discriminator import Discriminator
from ladd.models.lora import TeacherView, add_lora
from ladd.models.zimage import ZImageAdapter
from ladd.plan import PlanInput, plan
from ladd.train.step import Batch, LaddModels, ladd_step, trainable

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def zimage(device) -> torch.nn.Module:
    from diffusers import ZImageTransformer2DModel

    with torch.device(device):
        model = ZImageTransformer2DModel()  # Z-Image's config: dim 3840, 30 layers, 30 heads
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def inputs(batch: int, res: int, device, cap_tokens: int = 128):
    lat = res // 8
    x = torch.randn(batch, 16, lat, lat, device=device)
    caps = [torch.randn(cap_tokens, 2560, device=device, dtype=torch.bfloat16) for _ in range(batch)]
    return x, caps


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), 989e12)


def bench_sampling(device, res: int, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    adapter = ZImageAdapter(zimage(device))
    x, caps = inputs(batch, res, device)
    neg = [c[:32] for c in caps]
    x2, sigma = torch.cat([x, x]), torch.full((2 * batch,), 0.5, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter(x2, sigma, caps + neg)
    flops_per_step = counter.get_total_flops()
    with torch.no_grad():
        for _ in range(2):
            adapter(x2, sigma, caps + neg)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        steps = 10
        for _ in range(steps):
            adapter(x2, sigma, caps + neg)
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    per_image_50 = 50 * per_step / batch
    return {"what": "teacher_sampling_cfg", "resolution": res, "batch": batch, "s_per_image_50_steps": per_image_50,
            "images_per_s": 1 / per_image_50, "mfu": flops_per_step / per_step / peak_flops(),
            "gpu": torch.cuda.get_device_name()}


def bench_ladd(device, res: int, batch: int, student: str, steps: int = 4) -> dict:
    torch.cuda.reset_peak_memory_stats()
    tr = zimage(device)
    if student == "lora":
        add_lora(tr, 64, 64)
        for p in tr.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        s_ad, t_ad = ZImageAdapter(tr).train(), TeacherView(tr)
        opt_kind = "adamw"
    else:
        s_ad = ZImageAdapter(copy.deepcopy(tr).float().requires_grad_(True)).train()
        t_ad = ZImageAdapter(tr)
        opt_kind = "adamw8bit"
    s_ad.gradient_checkpointing = True
    disc = Discriminator(feature_dim=3840, layers=[5, 10, 15, 20, 25, 29], text_dim=2560).to(device)
    models = LaddModels(s_ad, t_ad, disc)
    try:
        import bitsandbytes as bnb

        make = bnb.optim.AdamW8bit if opt_kind == "adamw8bit" else torch.optim.AdamW
    except ImportError:
        make, opt_kind = torch.optim.AdamW, "adamw (bitsandbytes missing)"
    opt_g = make(trainable(s_ad), lr=5e-6)
    opt_d = torch.optim.AdamW(trainable(disc), lr=1e-5)
    x, caps = inputs(batch, res, device)
    b = Batch(x, caps, torch.randn(batch, 2560, device=device))
    cfg = MethodConfig()
    rng = torch.Generator(device).manual_seed(0)
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ladd_step(models, opt_g, opt_d, [b], step % 3, cfg, rng)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    est = plan(PlanInput(transformer_config={}, resolution=res, batch_per_rank=batch, student=student,
                         optimizer="adamw8bit" if "8bit" in opt_kind else "adamw", caption_tokens=128))[1]
    return {"what": f"ladd_step_{student}", "resolution": res, "batch": batch, "optimizer": opt_kind,
            "g_step_s": times[0 if steps < 4 else 3], "d_step_s": min(times[1:3]) if steps > 2 else None,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "plan_gb": est["total_gb"],
            "gpu": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--what", nargs="+", default=["sampling", "lora", "full"])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cuda")
    for what in args.what:
        try:
            if what == "sampling":
                row = bench_sampling(device, args.resolution, args.batch)
            else:
                row = bench_ladd(device, args.resolution, args.batch, what)
        except torch.OutOfMemoryError as e:
            row = {"what": what, "error": "out of memory", "detail": str(e).splitlines()[0],
                   "peak_gb": torch.cuda.max_memory_allocated() / 1e9}
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
