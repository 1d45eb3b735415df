"""Benchmark: `ladd precompute`'s loop against ZImagePipeline(..., output_type="latent").

Same model object, same prompts, same seeds, same batch size, one process: the pipeline is called on
consecutive batches of the prompt list (what a hand-written precompute script does); ours is
`Teacher.shard` plus writing the shard (what `ladd precompute` does per shard). Repeats alternate the
two and the fastest time of each is compared (the machine may be shared; on CPU the process's CPU time
is reported too). Model loading is excluded from both. Prints one JSON line with
the speedup, the max abs difference of the latents, and the 500K-prompt projection on 8×H100.

    python bench/precompute_vs_pipeline.py                      # tiny random-weight pipeline, CPU, ~4 min
    python bench/precompute_vs_pipeline.py --pipeline DIR       # any ZImagePipeline folder (GPU if present)

The projection: FLOPs per image are counted by torch's FlopCounterMode on the real Z-Image transformer
config (built on the meta device, no memory) at 512 px (1024 image tokens) with --caption-tokens,
times 2 for CFG, times 50 steps. Efficiency: measured when this runs the real model on a GPU, else
the assumed --mfu of --peak-tflops (H100 SXM bf16 dense: 989 TFLOP/s). A projection, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ladd.data import shards as fmt
from ladd.data.precompute import PrecomputeConfig, Teacher
from ladd.models.text import token_lengths

WORDS = ("a the red blue small large old cat dog on under near with photo painting of bright dark tree house "
         "river mountain sky portrait woman man city street night light golden hour wide shot close-up film "
         "grain soft focus watercolor detailed texture reflection glass rain snow forest ocean").split()
BLOG_HOURS_8XA100, BLOG_S_PER_IMAGE_A100, A100_PEAK_TFLOPS = 127.0, 7.3, 312.0


def make_prompts(n: int, seed: int = 0, lo: int = 10, hi: int = 300) -> list[str]:
    """Caption-like prompts whose lengths are log-uniform in [lo, hi] characters; with the tiny byte-level
    tokenizer that is ~the spread of real caption sets in Qwen tokens (short alt-texts to long recaptions)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target, words = int(math.exp(rng.uniform(math.log(lo), math.log(hi)))), []
        while len(" ".join(words)) < target:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def zimage_tflop_per_image(steps: int, image_tokens: int, caption_tokens: int, negative_tokens: int = 32) -> float:
    """FLOPs of `steps` CFG forwards (cond + uncond in one batch) of the real 6B config, counted on meta."""
    from diffusers import ZImageTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from ladd.models.zimage import ZImageAdapter

    with torch.device("meta"):
        adapter = ZImageAdapter(ZImageTransformer2DModel())  # defaults = Z-Image: dim 3840, 30 + 2 + 2 layers
        side = 2 * int(math.isqrt(image_tokens))
        x = torch.zeros(2, adapter.transformer.config.in_channels, side, side)
        caps = [torch.zeros(caption_tokens, 2560), torch.zeros(negative_tokens, 2560)]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            adapter(x, torch.full((2,), 0.5), caps)
    return counter.get_total_flops() * steps / 1e12


class _Quiet:
    def update(self, n: int) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=None, help="ZImagePipeline folder (default: the tiny one, built here)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: robust on a shared machine)")
    ap.add_argument("--caption-tokens", type=int, default=128, help="projection: caption tokens per prompt")
    ap.add_argument("--mfu", type=float, default=0.40, help="projection: assumed efficiency when not measured")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="projection: H100 SXM bf16 dense")
    ap.add_argument("--num-images", type=int, default=500_000)
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as tmp:
        pipeline = args.pipeline
        if pipeline is None:
            from ladd.models.tiny import build_tiny_pipeline

            pipeline = str(Path(tmp) / "tiny")
            build_tiny_pipeline().save_pretrained(pipeline, safe_serialization=True)
        cfg = PrecomputeConfig(pipeline=pipeline, prompts="-", out=tmp, resolution=args.resolution, steps=args.steps,
                               guidance=args.guidance, negative_prompt=args.negative_prompt,
                               batch_size=args.batch_size, shard_size=args.num_prompts)
        from ladd.data.precompute import resolve_resolution

        resolution = resolve_resolution(pipeline, args.resolution)
        teacher = Teacher(cfg, resolution, device)
        pipe = teacher.pipe
        prompts = make_prompts(args.num_prompts)
        seeds = list(range(args.num_prompts))

        def theirs() -> torch.Tensor:
            out = []
            for b in range(0, len(prompts), args.batch_size):
                batch = prompts[b : b + args.batch_size]
                out.append(pipe(list(batch), height=resolution, width=resolution, num_inference_steps=args.steps,
                                guidance_scale=args.guidance, negative_prompt=[args.negative_prompt] * len(batch),
                                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[b : b + len(batch)]],
                                output_type="latent").images.float().cpu())
            return torch.cat(out)

        def ours() -> torch.Tensor:
            tensors = teacher.shard(prompts, seeds, _Quiet())
            fmt.write_shard(Path(tmp) / fmt.shard_name(0), tensors, 0)
            return tensors["latents"].float()

        # Wall time, and on CPU also this process's CPU time: with one thread that is the work done, and
        # it does not count the time other jobs on a shared machine took the core away.
        times: dict[str, list[float]] = {"pipeline": [], "precompute": []}
        cpu: dict[str, list[float]] = {"pipeline": [], "precompute": []}
        for r in range(args.repeats):
            for name, fn in ((("pipeline", theirs), ("precompute", ours))[:: 1 if r % 2 == 0 else -1]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                result = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                if name == "pipeline":
                    ref = result
                else:
                    got = result
            print(f"repeat {r}: pipeline {times['pipeline'][-1]:.2f} s (cpu {cpu['pipeline'][-1]:.2f}), "
                  f"precompute {times['precompute'][-1]:.2f} s (cpu {cpu['precompute'][-1]:.2f})", file=sys.stderr)
        lengths = token_lengths(pipe.tokenizer, prompts)

    t_pipe, t_ours = min(times["pipeline"]), min(times["precompute"])
    tflop = zimage_tflop_per_image(50, 1024, args.caption_tokens)
    real_model = pipe.transformer.config.dim == 3840 and device.type == "cuda" and resolution == 512
    if real_model:  # the real teacher on a GPU: efficiency measured here
        tflop_here = zimage_tflop_per_image(args.steps, 1024, 32 * math.ceil(statistics.mean(lengths) / 32))
        mfu, mfu_source = tflop_here * len(prompts) / t_ours / args.peak_tflops, "measured"
    else:
        mfu, mfu_source = args.mfu, "assumed (no real Z-Image on a GPU in this run)"
    seconds_per_image = tflop / (args.peak_tflops * mfu)
    hours = args.num_images * seconds_per_image / args.gpus / 3600
    result = {
        "speedup_vs_pipeline": round(t_pipe / t_ours, 3),
        "max_abs_diff": (got - ref).abs().max().item(),
        "pipeline_s": round(t_pipe, 3),
        "precompute_s": round(t_ours, 3),
        "ratios_per_repeat": [round(a / b, 3) for a, b in zip(times["pipeline"], times["precompute"])],
        "speedup_cpu_time": round(min(cpu["pipeline"]) / min(cpu["precompute"]), 3) if device.type == "cpu" else None,
        "images": len(prompts), "batch_size": args.batch_size, "steps": args.steps, "guidance": args.guidance,
        "resolution": resolution, "prompt_tokens_min_median_max": [min(lengths), int(statistics.median(lengths)),
                                                                   max(lengths)],
        "device": str(device), "threads": args.threads if device.type == "cpu" else None,
        "projection": {
            "zimage_tflop_per_image_512px": round(tflop, 1), "caption_tokens": args.caption_tokens,
            "mfu": round(mfu, 3), "mfu_source": mfu_source, "peak_tflops": args.peak_tflops,
            "seconds_per_image_per_gpu": round(seconds_per_image, 2),
            f"hours_{args.num_images}_images_{args.gpus}xH100": round(hours, 1),
            "blog_hours_8xA100": BLOG_HOURS_8XA100,
            "blog_implied_a100_mfu": round(tflop / BLOG_S_PER_IMAGE_A100 / A100_PEAK_TFLOPS, 3),
        },
    }
    print(f"projection (not a measurement): {args.num_images} images at 512 px on {args.gpus}×H100 at "
          f"{mfu:.0%} MFU ({mfu_source}): {hours:.1f} h, vs the blog's {BLOG_HOURS_8XA100:.0f} h on 8×A100",
          file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
