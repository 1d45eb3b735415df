"""Tiny Z-Image pipelines built offline: the real diffusers classes at toy sizes.

`build_tiny_pipeline()` returns a genuine `diffusers.ZImagePipeline` — a byte-level `Qwen2Tokenizer`
with a chat template, a `Qwen3Model` text encoder, a 16-channel `AutoencoderKL`, a
`ZImageTransformer2DModel` and `FlowMatchEulerDiscreteScheduler(shift=3.0)` — with random weights and
no download. Tests use it as the stand-in for the 6B model; the toy world trains one of these.

CPU example:
    ladd toy tiny --out runs/tiny          # writes a ZImagePipeline folder
    python -c "from diffusers import ZImagePipeline; ZImagePipeline.from_pretrained('runs/tiny')"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

# Qwen's chat markup. ZImagePipeline calls apply_chat_template(..., enable_thinking=True), which in
# Qwen3's template adds nothing after the generation prompt; `enable_thinking=False` adds an empty
# think block. Only the tokens the template uses are special.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@dataclass(kw_only=True)
class TinyConfig:
    """Sizes of a tiny Z-Image pipeline. Defaults: ~0.5M-parameter transformer, 32 px images."""

    seed: int = 0
    image_size: int = 32  # pixels; the VAE's sample_size
    vae_channels: tuple[int, ...] = (8, 16)  # len-1 downsamplings: (8, 16) -> factor 2
    vae_layers_per_block: int = 1
    latent_channels: int = 16  # Z-Image's VAE has 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    dim: int = 64
    n_layers: int = 6
    n_refiner_layers: int = 1
    n_heads: int = 2
    axes_dims: tuple[int, int, int] = (8, 12, 12)  # sums to dim // n_heads (rotary dims per axis)
    text_hidden: int = 32  # = the transformer's cap_feat_dim
    text_layers: int = 2  # ZImagePipeline reads hidden_states[-2]
    text_heads: int = 2
    text_intermediate: int = 64
    merges: list[str] = field(default_factory=list)  # optional BPE merges on top of the 256 bytes
    shift: float = 3.0  # FlowMatchEulerDiscreteScheduler(shift=3.0), as Z-Image ships


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map, which byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def build_tokenizer(merges: list[str] | None = None) -> Qwen2Tokenizer:
    """A byte-level `Qwen2Tokenizer`: 256 byte tokens (+ merges) + Qwen's chat special tokens."""
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    pairs = [tuple(m.split(" ")) for m in merges or []]
    for a, b in pairs:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=pairs)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    return tokenizer


def build_text_encoder(cfg: TinyConfig, vocab_size: int) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=1,
        head_dim=cfg.text_hidden // cfg.text_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return Qwen3Model(config).eval()


def build_vae(cfg: TinyConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(cfg.vae_channels[0], 8),
        sample_size=cfg.image_size,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=False,  # as Z-Image's (Flux) VAE
        use_post_quant_conv=False,
    ).eval()


def build_transformer(cfg: TinyConfig) -> ZImageTransformer2DModel:
    if sum(cfg.axes_dims) != cfg.dim // cfg.n_heads:
        raise ValueError(f"axes_dims {cfg.axes_dims} must sum to dim // n_heads = {cfg.dim // cfg.n_heads}")
    return ZImageTransformer2DModel(
        in_channels=cfg.latent_channels,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_refiner_layers=cfg.n_refiner_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        cap_feat_dim=cfg.text_hidden,
        axes_dims=list(cfg.axes_dims),
        axes_lens=[1024, 512, 512],
    ).eval()


def build_tiny_pipeline(cfg: TinyConfig | None = None, **overrides) -> ZImagePipeline:
    """A random-weight `ZImagePipeline`, identical for identical configs (seeded, CPU)."""
    cfg = cfg or TinyConfig(**overrides)
    tokenizer = build_tokenizer(cfg.merges)
    with torch.random.fork_rng(devices=[]):
        # One seed per component so that resizing one does not reshuffle the others.
        torch.manual_seed(cfg.seed)
        text_encoder = build_text_encoder(cfg, vocab_size=len(tokenizer))
        torch.manual_seed(cfg.seed + 1)
        vae = build_vae(cfg)
        torch.manual_seed(cfg.seed + 2)
        transformer = build_transformer(cfg)
        _randomize_zero_inits(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _randomize_zero_inits(transformer: ZImageTransformer2DModel) -> None:
    """Give the zero-initialised pieces small random values.

    diffusers initialises pad tokens to zero; the real 6B model's are trained. Random values make the
    tiny model exercise the same code paths (a zero final layer would make every output zero and every
    test that compares outputs vacuous).
    """
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in (transformer.x_pad_token, transformer.cap_pad_token):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for layer in transformer.all_final_layer.values():
            if layer.linear.weight.abs().sum() == 0:
                layer.linear.weight.copy_(torch.randn(layer.linear.weight.shape, generator=g) * 0.02)
