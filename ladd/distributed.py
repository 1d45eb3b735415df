"""Everything distributed lives here: process group, FSDP2 wrapping, DCP checkpoints, agreement.

Model code never imports torch.distributed; the trainer calls these helpers. The same code runs as
one process on a CPU (world size 1: no process group, no wrapping) and under torchrun on many GPUs:

    torchrun --nproc_per_node 8 -m ladd train --config configs/zimage-512-8gpu.toml

Cross-rank invariants (each cost the blog's authors a hang):
  * state-dict gathers and DCP saves are collectives: every rank calls them, rank 0 alone does file
    bookkeeping afterwards;
  * every stop / skip / rollback decision is reduced across ranks before anyone acts on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(timeout_hours: float | None = None) -> Dist:
    """Read torchrun's environment; start the process group when there is more than one rank.

    `timeout_hours` for jobs whose ranks meet rarely (precompute: hours of work between meetings).
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kw = {"timeout": timedelta(hours=timeout_hours)} if timeout_hours else {}
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", **kw)
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """The one way rank-0 side effects reach the terminal."""
    if int(os.environ.get("RANK", 0)) == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (stop and rollback decisions)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """`any_rank` for several flags in one all-reduce (the loop's per-step stop requests)."""
    if not dist.is_initialized():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def broadcast0(value: int, device: torch.device) -> int:
    """Rank 0's integer, on every rank (e.g. rank 0's verdict on an output folder)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def sum_over_ranks(values: list[int], device: torch.device) -> list[int]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics across ranks (every rank gets the same numbers, so decisions agree)."""
    if not dist.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


class RankLost(RuntimeError):
    """A collective failed because another rank died or hung; the message is the one line to print."""


def lost_ranks(wait_s: float = 3.0) -> tuple[list[int], list[int]] | None:
    """After a collective failed on this rank: (ranks that did not answer, ranks that did).

    Every rank that survives a failed collective reports itself in the rendezvous store (torchrun's,
    which outlives its workers) and waits up to `wait_s` for the others: a rank that never reports is
    dead or hung. None when the store itself cannot be reached (its host is gone)."""
    if not dist.is_initialized():
        return None
    import time

    from torch.distributed.distributed_c10d import _get_default_store

    world = dist.get_world_size()
    # Keys are per restart of an elastic job (a fresh store otherwise), so a rerun never reads old ones.
    prefix = f"ladd/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    try:
        store = _get_default_store()
        store.set(prefix + str(dist.get_rank()), "1")
        deadline = time.monotonic() + wait_s
        while True:
            present = [r for r in range(world) if store.check([prefix + str(r)])]
            if len(present) == world or time.monotonic() >= deadline:
                return [r for r in range(world) if r not in present], present
            time.sleep(0.1)
    except Exception:  # the store's host is gone too: nothing more to learn
        return None


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped per-rank tensors along dim 0, in rank order, on every rank."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shard_adapter(adapter: nn.Module, mixed_bf16: bool) -> None:
    """FSDP2: one unit per ZImageTransformerBlock (main and refiners), then the adapter as the root.

    The adapter is the root because its forward calls the blocks directly; sharding it registers the
    unshard hooks for the embedders and the final layer that live outside the blocks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    tr = adapter.transformer
    for block in [*tr.noise_refiner, *tr.context_refiner, *tr.layers]:
        fully_shard(block, **kw)
    fully_shard(adapter, **kw)


def shard_module(module: nn.Module) -> None:
    """FSDP2 on a small module (the disc): sharded params, gradients averaged across ranks."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Skip the gradient reduce-scatter on intermediate micro-batches (a no-op without FSDP)."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(enabled)


# ----------------------------------------------------------------------------- checkpoints (DCP)


def model_state(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Sharded (FSDP) or plain model + optimizer state, keyed by parameter names. No full gather."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Frozen weights (a LoRA student's base) come from the pipeline folder; checkpoints skip them.
    options = StateDictOptions(ignore_frozen_params=True)
    fresh = opt is not None and not opt.state
    model_sd, opt_sd = get_state_dict(model, optimizers=[opt] if opt is not None else [], options=options)
    if fresh:
        # get_state_dict creates a never-stepped optimizer's state with one step of zero gradients at
        # lr 0: moments stay zero but Adam's step counter becomes 1, which changes every later bias
        # correction — saving (at step 0, or before the first G-step) would change the run. Step 0
        # with zero moments is exactly the state the first real step would create.
        for param_state in opt.state.values():
            if "step" in param_state:
                step = param_state["step"]
                param_state["step"] = step.zero_() if isinstance(step, torch.Tensor) else 0
        model_sd, opt_sd = get_state_dict(model, optimizers=[opt], options=options)  # now with step 0
    return {"model": model_sd, "optim": opt_sd} if opt is not None else {"model": model_sd}


def load_model_state(model: nn.Module, opt: torch.optim.Optimizer | None, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model, optimizers=[opt] if opt is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}), options=options)


def dcp_save(state: dict, path: str) -> None:
    """Collective: every rank writes its shards into the folder `path`.

    A rank that cannot write (a full disk) makes every rank raise that rank's OSError: DCP gathers each
    rank's outcome before any rank returns, so none is left waiting for the one that failed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(state, checkpoint_id=path)
    except CheckpointException as e:  # a BaseException carrying {rank: (exception, traceback)}
        for _, (exc, _) in sorted(e.failures.items()):
            if isinstance(exc, OSError):
                raise OSError(exc.errno, exc.strerror or str(exc), exc.filename) from None
        raise


def dcp_extents(path: str) -> dict[str, int]:
    """{data file: the bytes it must hold} from a DCP checkpoint's `.metadata` (raises if unreadable).

    Every saved chunk is recorded there as (file, offset, length): a missing or truncated shard file
    shows up here without reading any tensor data."""
    from torch.distributed.checkpoint import FileSystemReader

    need: dict[str, int] = {}
    for info in FileSystemReader(path).read_metadata().storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def dcp_load(state: dict, path: str) -> None:
    """Collective: fill `state` (its tensors give the target layout, sharded or not) from `path`."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=path)


def dcp_load_keys(path: str, keys: set[str]) -> dict:
    """Read the named top-level entries of a DCP checkpoint as plain tensors, in one process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(keys=keys, checkpoint_id=path)
