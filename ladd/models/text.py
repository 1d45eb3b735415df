"""Prompt encoding and the discriminator's text conditioning.

Caption features come from `ZImagePipeline.encode_prompt` itself (Qwen3's second-to-last hidden
state over the chat-templated prompt, padding dropped) — never a re-implementation, so the student
and teacher see exactly what the pipeline gives them at inference.

The discriminator's FiLM conditioning is one vector per sample: by default the mean of the caption
features over their tokens ("pooled"); or precomputed CLIP text embeddings (512-d), which the blog's
v3 found a stronger semantic signal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ZImagePipeline
from torch import Tensor


@torch.no_grad()
def encode_prompts(
    pipe: ZImagePipeline, prompts: Sequence[str], max_sequence_length: int = 512, device=None
) -> list[Tensor]:
    """Caption features per prompt, each (L_i, cap_feat_dim), via the pipeline's own encode_prompt."""
    feats, _ = pipe.encode_prompt(
        list(prompts),
        device=device or pipe.text_encoder.device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return [f.float() for f in feats]


def token_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Tokens per prompt as ZImagePipeline counts them: chat template, then the tokenizer (untruncated)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        for p in prompts
    ]
    return [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]  # verbose: no "too long" warning


def pooled(cap_feats: Sequence[Tensor]) -> Tensor:
    """Mean over each caption's tokens: (B, cap_feat_dim). The default disc text conditioning."""
    return torch.stack([f.float().mean(dim=0) for f in cap_feats], dim=0)


def pack(cap_feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Variable-length list -> (ΣL, D) features and (B,) int64 lengths (the storage layout)."""
    lens = torch.tensor([len(f) for f in cap_feats], dtype=torch.int64)
    return torch.cat(list(cap_feats), dim=0), lens


def unpack(flat: Tensor, lens: Tensor) -> list[Tensor]:
    """Inverse of `pack`."""
    return list(flat.split(lens.tolist(), dim=0))
