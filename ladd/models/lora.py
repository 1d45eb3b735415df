"""LoRA students: the teacher's weights plus low-rank adapters, one copy of the weights for both roles.

The student is the transformer with adapters enabled; the teacher is the *same* module with adapters
disabled (`TeacherView`), so a 6B model needs 12 GB of bf16 weights once instead of twice, and no
optimizer state for the base. With adapters disabled the output is exactly the teacher's
(tests/test_lora.py pins it). Adapters come from peft through diffusers' `add_adapter`, so the export
is a LoRA file that `ZImagePipeline.load_lora_weights` reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from ladd.models.zimage import AdapterOutput, ZImageAdapter

ADAPTER_NAME = "ladd"
# Attention and feed-forward projections of every block (refiners included). "to_out.0" is the
# attention output projection; w1/w3 are the SwiGLU inputs, w2 its output.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")


def add_lora(transformer: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Attach fresh adapters (B = 0, so the student starts as the teacher). Base weights are frozen.
    Returns the number of trainable parameters."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    transformer.add_adapter(cfg, adapter_name=ADAPTER_NAME)
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)


class TeacherView(ZImageAdapter):
    """The frozen teacher inside a LoRA student: the same transformer, adapters switched off.

    Under gradient checkpointing a block is recomputed during backward, after this forward has
    switched the adapters back on; the recomputation therefore switches them off again itself (else it
    would recompute the *student's* block and fail checkpointing's shape check, or worse, not).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._off_depth = 0

    @contextmanager
    def _adapters_off(self) -> Iterator[None]:
        if self._off_depth == 0:
            self.transformer.disable_adapters()
        self._off_depth += 1
        try:
            yield
        finally:
            self._off_depth -= 1
            if self._off_depth == 0:
                self.transformer.enable_adapters()

    def _run_block(self, block: nn.Module, *args: Tensor | None) -> Tensor:
        with self._adapters_off():
            return block(*args)

    def forward(self, *args, **kwargs) -> AdapterOutput:
        with self._adapters_off():
            return super().forward(*args, **kwargs)


def lora_state_dict(transformer: nn.Module) -> dict:
    """The adapter weights only, in the layout `ZImagePipeline.load_lora_weights` reads."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
