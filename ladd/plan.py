"""`ladd plan`: per-GPU memory of a LADD run, before renting the GPUs.

    ladd plan --config configs/zimage-1024-8gpu.toml --gpus 8 --gpu-mem 79.2
    ladd plan --config configs/zimage-1024-1gpu-lora.toml --gpus 1 --student lora
    ladd plan --config configs/zimage-512-8gpu.toml --gpus 8 --buckets 1024x1024,832x1216

Memory is sized for the largest bucket (the most image tokens: every bucket's step must fit); the
plan lists each bucket's token count. Buckets come from --buckets, else the config's data.buckets,
else --resolution (one square).

Parameter counts are exact (the transformer is built on the meta device from its config); the
activation term is an estimate — bytes kept per token per block for backward — whose two constants
were calibrated against peaks measured on an H100 (bench/gpu.sh; docs/performance.md).

What a LADD G-step keeps alive: the student's graph through every block, and the teacher's graph for
the fake pass up to the deepest tapped block (the gradient reaches the student through it). D-steps
build no graph. Everything else is weights, gradients and optimizer state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GB = 1e9
GIB = 2**30
# Bytes one ZImageTransformerBlock keeps per token per unit of D for backward, under bf16 autocast.
# Counting the block's ops gives ~44 (22 bf16 values: norm inputs, q/k/v before and after qk-norm and
# RoPE, attention output, gated residuals, the SwiGLU's three 8/3·D tensors); an H100 measured 65
# (6B, 512 px, batch 2, no checkpointing: 38.9 GB of activations), the rest being fp32 norm and
# modulation intermediates. Checkpointed, a block keeps its inputs: measured 2.5 bytes (a mix of bf16
# and fp32 streams) per token per D, plus one block's full set during its recomputation.
ACT_BYTES_PER_TOKEN_PER_DIM = 65
CKPT_BYTES_PER_TOKEN_PER_DIM = 2.5
OVERHEAD_GB = 2.0  # CUDA context, allocator slack, workspace


@dataclass(kw_only=True)
class PlanInput:
    transformer_config: dict
    buckets: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height) pixels; the largest sizes memory
    vae_factor: int = 8
    caption_tokens: int = 256
    batch_per_rank: int = 2
    gpus: int = 1
    gpu_mem_gib: float = 79.2  # what torch.cuda reports as total for an "80 GB" H100/A100
    student: str = "full"  # "full" | "lora"
    lora_rank: int = 64
    optimizer: str = "adamw"  # "adamw" | "adamw8bit"
    checkpointing: bool = True
    teacher_sharded: bool = False
    disc_layers: tuple[int, ...] = (5, 10, 15, 20, 25, 29)
    disc_hidden: int = 256


def count_params(config: dict) -> dict[str, int]:
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    block = sum(p.numel() for p in model.layers[0].parameters())
    lora = sum(  # rank-r adapters on attention and feed-forward projections of the main blocks
        m.in_features + m.out_features
        for blk in model.layers for name, m in blk.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0", "w1", "w2", "w3")
        and "adaLN" not in name
    )
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "block": block,
        "n_blocks": len(model.layers) + len(model.noise_refiner) + len(model.context_refiner),
        "n_layers": len(model.layers),
        "dim": model.config.dim,
        "lora_per_rank": lora,
    }


def plan(p: PlanInput) -> tuple[list[tuple[str, float]], dict]:
    """(rows of (component, GB per GPU), summary)."""
    c = count_params(p.transformer_config)
    P, N, D = c["total"], p.gpus, c["dim"]
    per_bucket = bucket_tokens(p)
    tokens = max(t for _, t in per_bucket) + p.caption_tokens
    rows: list[tuple[str, float]] = []
    shard = 1 / N if N > 1 else 1.0
    if p.student == "full":
        trainable = P
        rows.append(("student weights (fp32 master)", 4 * P * shard / GB))
        rows.append(("student gradients (fp32)", 4 * P * shard / GB))
    else:
        trainable = c["lora_per_rank"] * p.lora_rank
        rows.append((f"LoRA adapters r={p.lora_rank} (fp32, + grads)", 8 * trainable / GB))
    opt_bytes = 2 if p.optimizer == "adamw8bit" else 8
    rows.append((f"optimizer state ({p.optimizer})", opt_bytes * trainable * (shard if p.student == "full" else 1) / GB))
    teacher = 2 * P * (shard if p.teacher_sharded else 1.0)
    rows.append(("teacher (bf16; LoRA: the one shared base)" if p.student == "lora" else
                 f"teacher (bf16, {'sharded' if p.teacher_sharded else 'replicated'})", teacher / GB))
    if N > 1:
        rows.append(("FSDP all-gathered blocks in flight (bf16, 2 blocks)", 2 * 2 * c["block"] / GB))
    disc = disc_params(D, len(p.disc_layers), p.disc_hidden)
    rows.append(("discriminator (weights, grads, Adam)", 16 * disc / GB))
    per_block = ACT_BYTES_PER_TOKEN_PER_DIM * D * tokens  # bytes per block per sample
    taps_deepest = max(p.disc_layers) + 1
    graph_blocks = c["n_blocks"] + taps_deepest + (c["n_blocks"] - c["n_layers"])  # student + teacher fake pass
    if p.checkpointing:
        act = graph_blocks * CKPT_BYTES_PER_TOKEN_PER_DIM * D * tokens + per_block  # inputs + one recompute
    else:
        act = graph_blocks * per_block
    rows.append((f"activations, batch {p.batch_per_rank} ({'checkpointed' if p.checkpointing else 'stored'})",
                 act * p.batch_per_rank / GB))
    rows.append(("CUDA context + allocator slack", OVERHEAD_GB))
    total = sum(gb for _, gb in rows)
    fixed = total - act * p.batch_per_rank / GB
    capacity = p.gpu_mem_gib * GIB / GB
    largest = int((capacity - fixed) // (act / GB)) if capacity > fixed else 0
    summary = {"params": P, "trainable": trainable, "tokens": tokens, "total_gb": total, "capacity_gb": capacity,
               "fits": total <= capacity, "largest_batch_per_rank": largest, "bucket_tokens": per_bucket,
               "largest_bucket": max(per_bucket, key=lambda b: b[1])[0]}
    return rows, summary


def bucket_tokens(p: PlanInput) -> list[tuple[str, int]]:
    """(bucket name, image tokens) for each bucket: (H / vae / 2) · (W / vae / 2) patches."""
    from ladd.data.buckets import Bucket

    return [(Bucket(w, h).name, Bucket(w, h).tokens(p.vae_factor)) for w, h in p.buckets]


def disc_params(dim: int, heads: int, hidden: int, cond_dim: int = 256, text_dim: int = 2560) -> int:
    per_head = dim * hidden + hidden + 2 * cond_dim * hidden + hidden + hidden * 2 * hidden + 2 * hidden
    per_head += hidden * hidden * 9 + hidden + hidden * (hidden // 2) * 9 + hidden // 2 + hidden // 2 + 1
    per_head += 2 * hidden + hidden  # group norms
    return heads * per_head + text_dim * cond_dim + cond_dim


def format_plan(p: PlanInput, rows, summary) -> str:
    head = (f"plan: {p.student} student, {p.gpus} GPU(s) × {p.gpu_mem_gib:g} GiB = {summary['capacity_gb']:.1f} GB, "
            f"largest bucket {summary['largest_bucket']} "
            f"({summary['tokens']} tokens/sample with the caption), batch {p.batch_per_rank}/rank, {p.optimizer}, "
            f"checkpointing {'on' if p.checkpointing else 'off'}; {summary['params'] / 1e9:.2f}B params, "
            f"{summary['trainable'] / 1e6:.1f}M trainable")
    lines = [head, "  buckets (image tokens): " + ", ".join(f"{n} ({t})" for n, t in summary["bucket_tokens"])]
    lines += [f"  {name:<58} {gb:8.2f} GB" for name, gb in rows]
    verdict = "fits" if summary["fits"] else "does NOT fit"
    lines.append(f"  {'total per GPU':<58} {summary['total_gb']:8.2f} GB  -> {verdict}; "
                 f"largest batch per rank that fits: {summary['largest_batch_per_rank']}")
    return "\n".join(lines)


def transformer_config_of(pipeline: str) -> dict:
    """The pipeline's transformer config; Z-Image's own (the diffusers defaults) if the folder is absent."""
    from ladd.models.loading import TOY_PIPELINE

    path = TOY_PIPELINE if pipeline == "toy" else Path(pipeline)
    cfg = path / "transformer" / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text())
    return {}  # ZImageTransformer2DModel() defaults = Z-Image 6B (dim 3840, 30 layers)


def vae_factor_of(pipeline: str) -> int:
    """The pipeline's VAE downsampling factor; Z-Image's 8 if the folder is absent."""
    from ladd.models.loading import PipelineError, vae_factor

    try:
        return vae_factor(pipeline)[0]
    except (PipelineError, OSError):
        return 8


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory plan for a config")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=79.2,
                   help="GiB per GPU as torch.cuda.mem_get_info reports its total (an '80 GB' H100: 79.2)")
    p.add_argument("--resolution", type=int, default=None, help="one square bucket (default 512)")
    p.add_argument("--buckets", default=None, help="zimage-1024, zimage-512, toy or WxH,... (default: data.buckets)")
    p.add_argument("--student", choices=("full", "lora", "both"), default="both")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from ladd.config import load_config

    from ladd.data.buckets import parse_buckets, square

    cfg = load_config(args.config, args.set)
    if args.resolution is not None and args.buckets is not None:
        raise ValueError(f"--resolution {args.resolution} and --buckets {args.buckets!r} both given: pass one of them")
    vae = vae_factor_of(cfg.model.pipeline)
    spec = args.buckets or (None if args.resolution else cfg.data.buckets)
    buckets = parse_buckets(spec, 2 * vae) if spec else square(args.resolution or 512)
    students = ("full", "lora") if args.student == "both" else (args.student,)
    for student in students:
        inp = PlanInput(
            transformer_config=transformer_config_of(cfg.model.pipeline), vae_factor=vae,
            buckets=tuple(b.size for b in buckets),
            batch_per_rank=cfg.data.batch_per_rank, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, student=student,
            optimizer=cfg.optim.optimizer, checkpointing=cfg.model.gradient_checkpointing,
            teacher_sharded=cfg.train.teacher_sharded, disc_layers=tuple(cfg.model.disc_layers),
            disc_hidden=cfg.model.disc_hidden,
        )
        print(format_plan(inp, *plan(inp)))
    return 0
