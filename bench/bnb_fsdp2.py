"""Does bitsandbytes' 8-bit AdamW step FSDP2's sharded (DTensor) parameters? One JSON line per rank.

A two-layer model (128×128 linears: 8-bit state, as bitsandbytes keeps for tensors of >= 4096
elements), `fully_shard` per layer, one AdamW8bit step, compared with the same step unsharded.
bitsandbytes >= 0.49 has CPU kernels, so the CPU run (gloo) answers the question without a GPU:

    python bench/bnb_fsdp2.py                                                    # unsharded reference
    torchrun --nproc_per_node 2 bench/bnb_fsdp2.py                               # CPU, gloo
    torchrun --nproc_per_node 1 bench/bnb_fsdp2.py                               # GPU, NCCL, one rank

Measured on CPU (bitsandbytes 0.50.2, torch 2.13): the unsharded step runs; on FSDP2 the first
step raises "bitsandbytes.optimizer_update_8bit_blockwise.default got mixed torch.Tensor and DTensor"
(its state buffers are plain tensors, the parameters DTensors). bitsandbytes issue #1633.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))


def one_step(m: nn.Module, device) -> None:
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(m.parameters(), lr=1e-2)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).to(device)
    m(x).square().mean().backward()
    opt.step()


def main() -> None:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        print(json.dumps({"what": "bnb_adamw8bit_fsdp2", "error": f"bitsandbytes not importable: {e}"}), flush=True)
        return
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    row = {"what": "bnb_adamw8bit_fsdp2", "bitsandbytes": bnb.__version__, "torch": torch.__version__,
           "device": device.type}
    if "RANK" not in os.environ:
        m = model().to(device)
        one_step(m, device)
        print(json.dumps({**row, "sharded": False, "runs": True}), flush=True)
        return
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    m = model().to(device)
    for layer in (m[0], m[2]):
        fully_shard(layer)
    fully_shard(m)
    row.update(sharded=True, rank=dist.get_rank(), world_size=dist.get_world_size(),
               param_type=type(m[0].weight).__name__)
    reference = model().to(device)
    try:
        one_step(m, device)
        one_step(reference, device)
        full = {k: v.full_tensor() for k, v in m.state_dict().items()}
        diff = max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items())
        row.update(runs=True, max_abs_diff_vs_unsharded=diff)
    except Exception as e:  # the answer, not a crash: one line says why
        row.update(runs=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
