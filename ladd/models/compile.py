"""Compiled blocks: `torch.compile` per transformer block (regional compilation).

Only the `ZImageTransformerBlock`s are compiled (the 30 main layers and the 4 refiner layers); the
adapter around them — taps, early exit, gradient checkpointing, LoRA's adapters-off teacher — stays
eager Python. Each block gets `block.compile()` (PyTorch's regional-compilation recipe, as diffusers'
`compile_repeated_blocks`): dynamo caches graphs on the code object of the block's `forward` and
lifts the parameters to graph inputs, so one graph serves every block of the same kind (all 30 main
layers, the student's and the teacher's) instead of compiling 30 copies. Module hooks (FSDP2's
unshard) run outside the compiled frame, and the state dict keeps its keys.

    from ladd.models.compile import compile_blocks
    compile_blocks(pipe.transformer)                    # or: ZImageAdapter(transformer, compile=True)
    compile_blocks(pipe.transformer, backend="aot_eager")  # CPU tests: dynamo + autograd, no codegen

Caption lengths vary from batch to batch. With static shapes every new padded length is a new graph
and after `recompile_limit` (8) graphs dynamo silently runs the block eagerly; the adapter therefore
marks the batch and caption-dependent sequence dimensions dynamic (`mark_dynamic` below), so each
kind of call compiles once for all lengths. The kinds that remain are a handful per role (grad on or
off, adapters on or off, attention mask or none, refiner or main block): more than 8, hence the
raised limit. docs/performance.md ("Compiled blocks") has the measured counts and the choice against
padding captions to length buckets.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Graphs per block code object. Measured on the tiny model (bench/compile_recompiles.py): 23 over LADD
# steps (full or LoRA student; 6 for no-grad sampling); 64 leaves room without hiding a recompile loop.
RECOMPILE_LIMIT = 64


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a ZImageTransformer2DModel: noise refiner, context refiner, main layers."""
    return [*transformer.noise_refiner, *transformer.context_refiner, *transformer.layers]


def is_compiled(transformer: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(transformer))


def compile_blocks(transformer: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """`torch.compile` each transformer block in place (idempotent); returns how many were compiled now.

    A copy of a compiled model is eager (`Module.__getstate__` drops the compiled call), so compile after
    `copy.deepcopy`; `add_lora` or `.to()` afterwards only cost a recompile. Before FSDP wraps the blocks.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    done = 0
    for block in transformer_blocks(transformer):
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(backend=backend, mode=mode)
            done += 1
    return done


def mark_dynamic(tensors: Iterable[Tensor | None], dims: int | tuple[int, ...]) -> None:
    """Hint dynamo that these dimensions vary (batch; caption-dependent sequence length), so the first
    compile is already shape-generic. A hint only: a dimension the graph must specialise (size 1) is
    specialised, not an error. No effect on eager code."""
    for t in tensors:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, list(dims) if isinstance(dims, tuple) else dims)
