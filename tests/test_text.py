"""Prompt encoding goes through ZImagePipeline.encode_prompt; pooled and packed layouts."""

import torch

from ladd.models.text import encode_prompts, pack, pooled, unpack
from tests.conftest import PROMPTS


def test_encode_prompts_is_the_pipelines(tiny_pipe):
    ours = encode_prompts(tiny_pipe, PROMPTS)
    theirs, _ = tiny_pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)
    assert len(ours) == 2 and ours[0].shape[1] == tiny_pipe.transformer.config.cap_feat_dim
    assert ours[0].shape[0] != ours[1].shape[0]  # variable length: padding dropped
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # encode_prompt rewrites the list it is given in place; ours must leave the caller's alone.
    prompts = list(PROMPTS)
    encode_prompts(tiny_pipe, prompts)
    assert prompts == PROMPTS


def test_pooled_and_pack_round_trip(tiny_pipe):
    feats = encode_prompts(tiny_pipe, PROMPTS)
    p = pooled(feats)
    assert p.shape == (2, feats[0].shape[1])
    torch.testing.assert_close(p[1], feats[1].mean(0))
    flat, lens = pack(feats)
    assert flat.shape[0] == sum(len(f) for f in feats) and lens.dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(unpack(flat, lens), feats))
