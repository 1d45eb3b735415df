"""The toy-teacher builder: deterministic per seed, a loadable ZImagePipeline, word-level captions."""

import json

import torch
from diffusers import ZImagePipeline

from ladd.models.text import encode_prompts
from ladd.models.tiny import build_tiny_pipeline, build_tokenizer
from ladd.toy.build import build_toy, encode_captions, quick_config, word_merges

MICRO = dict(n_images=32, vae_steps=2, vae_batch=4, steps=2, batch=4, warmup=1, threads=1)


def test_build_is_deterministic_and_loads(tmp_path):
    a = build_toy(tmp_path / "a", quick_config(**MICRO))
    build_toy(tmp_path / "b", quick_config(**MICRO))
    pa = ZImagePipeline.from_pretrained(tmp_path / "a")
    pb = ZImagePipeline.from_pretrained(tmp_path / "b")
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(pa, name).state_dict(), getattr(pb, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert len(pa.transformer.layers) >= 6 and pa.vae.config.latent_channels == 16
    assert pa.vae.config.sample_size == 64 and pa.vae.config.scaling_factor == a["vae_scaling_factor"]
    report = json.loads((tmp_path / "a" / "build.json").read_text())
    assert {"vae_psnr_db", "teacher_final_loss", "seconds"} <= report.keys()


def test_world_words_are_single_tokens():
    tok = build_tokenizer(word_merges())
    text = "an orange striped triangle, a blue dotted square and a red circle on a gray background"
    pieces = [tok.decode([i]) for i in tok(text).input_ids]
    assert pieces == ["an", " orange", " striped", " triangle", ",", " a", " blue", " dotted", " square",
                      " and", " a", " red", " circle", " on", " a", " gray", " background"]


def test_encode_captions_matches_full_padding():
    pipe = build_tiny_pipeline(merges=word_merges())
    caps = ["a red circle on a white background", "a blue striped square and a red circle on a gray background", ""]
    for a, b in zip(encode_captions(pipe, caps, chunk=2), encode_prompts(pipe, caps)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
