"""The tiny pipeline builder: real diffusers classes, offline round trip, deterministic per seed."""

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Model

from ladd.cli import main
from ladd.models.tiny import build_tiny_pipeline


def _latents(pipe, prompt="a red circle on a white background", seed=0):
    return pipe(
        prompt, height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
    ).images


def test_real_classes_and_sizes(tiny_pipe):
    assert isinstance(tiny_pipe, ZImagePipeline)
    assert isinstance(tiny_pipe.tokenizer, Qwen2Tokenizer)
    assert isinstance(tiny_pipe.text_encoder, Qwen3Model)
    assert isinstance(tiny_pipe.vae, AutoencoderKL) and tiny_pipe.vae.config.latent_channels == 16
    assert isinstance(tiny_pipe.transformer, ZImageTransformer2DModel)
    assert len(tiny_pipe.transformer.layers) >= 6
    assert isinstance(tiny_pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert tiny_pipe.scheduler.config.shift == 3.0
    # The chat template wraps the prompt the way Qwen's does.
    text = tiny_pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_deterministic_per_seed():
    a, b, c = build_tiny_pipeline(seed=3), build_tiny_pipeline(seed=3), build_tiny_pipeline(seed=4)
    for name in ("transformer", "text_encoder", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_and_load_offline_round_trip(tiny_pipe, tmp_path):
    assert main(["toy", "tiny", "--out", str(tmp_path / "tiny")]) == 0
    loaded = ZImagePipeline.from_pretrained(tmp_path / "tiny")  # HF_HUB_OFFLINE=1 (conftest)
    loaded.set_progress_bar_config(disable=True)
    assert sorted(p.name for p in (tmp_path / "tiny" / "transformer").iterdir())[-1].endswith(".safetensors")
    assert torch.equal(_latents(loaded), _latents(tiny_pipe))
