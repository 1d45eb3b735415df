"""Compiled blocks under FSDP2: one LADD G+D step of FSDP2-sharded roles (as the trainer shards them),
eager blocks and then compiled ones, from the same start; one JSON line per rank and student with the
largest difference in metrics and updated student weights (plain SGD, no clipping: the gradients).

    torchrun --nproc_per_node 2 bench/fsdp_compile.py            # CPU: two gloo ranks
    torchrun --nproc_per_node 1 bench/fsdp_compile.py            # one GPU: one NCCL rank, still sharded

Tiny model, gradient checkpointing on. Measured on CPU (2 gloo ranks, aot_eager): bitwise equal for
the full and the LoRA student.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch


def one_step(student_kind: str, compiled: bool, backend: str, device, rank: int) -> tuple[dict, dict]:
    from ladd import distributed
    from ladd.config import MethodConfig
    from ladd.models.compile import compile_blocks
    from ladd.models.discriminator import Discriminator
    from ladd.models.text import pooled
    from ladd.models.tiny import build_tiny_pipeline
    from ladd.train.loop import build_roles
    from ladd.train.step import Batch, LaddModels, ladd_step, trainable

    torch.manual_seed(123)  # peft draws LoRA's A from the global generator
    tr = build_tiny_pipeline(seed=5).transformer.to(device)
    s, t = build_roles(tr, student_kind, 4, 4.0, checkpointing=True)
    if compiled:
        compile_blocks(s.transformer, backend=backend)
        compile_blocks(t.transformer, backend=backend)
    torch.manual_seed(0)
    disc = Discriminator(feature_dim=64, layers=[1, 3, 5], text_dim=32, hidden=64, cond_dim=64,
                         num_teacher_layers=6).to(device)
    distributed.shard_adapter(s, False)
    distributed.shard_module(disc)
    if student_kind == "full":
        distributed.shard_adapter(t, False)
    models = LaddModels(s, t, disc)
    opt_g, opt_d = torch.optim.SGD(trainable(s), lr=1.0), torch.optim.SGD(trainable(disc), lr=1.0)
    g = torch.Generator().manual_seed(10 + rank)
    caps = [torch.randn(n, 32, generator=g).to(device) for n in ((40, 9) if rank % 2 == 0 else (70, 100))]
    batch = Batch(torch.randn(2, 16, 16, 16, generator=g).to(device), caps, pooled(caps))
    metrics = ladd_step(models, opt_g, opt_d, [batch], 0, MethodConfig(grad_clip_g=0, grad_clip_d=0),
                        torch.Generator(device).manual_seed(1))
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in s.named_parameters() if v.requires_grad}
    return metrics, weights


def main() -> None:
    import torch.distributed as dist

    from ladd import distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--student", nargs="+", choices=("full", "lora"), default=["full", "lora"])
    ap.add_argument("--backend", default="aot_eager", help="compile backend (inductor: the real thing, slower)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():  # also with one rank: FSDP2 needs a process group, the trainer makes none
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    for kind in args.student:
        row = {"what": "fsdp_compiled_step", "student": kind, "rank": rank, "world_size": dist.get_world_size(),
               "backend": args.backend, "device": device.type}
        try:
            m0, w0 = one_step(kind, False, args.backend, device, rank)
            m1, w1 = one_step(kind, True, args.backend, device, rank)
            row.update(metrics_max_abs_diff=max(abs(m0[k] - m1[k]) for k in m0),
                       weights_max_abs_diff=max((w0[k] - w1[k]).abs().max().item() for k in w0),
                       d_loss=m1["d_loss"])
        except Exception as e:  # the answer, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(json.dumps(row), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
