"""Build the toy teacher: a small ZImagePipeline that has really learned the toy world.

Stages (each timed, with a progress bar):
  1. render a fixed training set of captioned scenes (`ladd.toy.world`, train split only), split
     evenly over the build's aspect-ratio buckets (default: 64x64 only; `--buckets toy` adds 80x48
     and 48x80);
  2. train a small 16-channel `AutoencoderKL` on it (reconstruction + a light KL), then set its
     `shift_factor` / `scaling_factor` from the latents' mean and std over all buckets, as Z-Image's
     VAE has them;
  3. a tiny frozen `Qwen3Model` text encoder with a byte-level tokenizer whose BPE merges make every
     world word one token (random features of whole words condition well; of bytes, poorly);
  4. train a `ZImageTransformer2DModel` by flow matching *through the adapter* (LADD convention:
     target v = ε − x0), with caption dropout to the empty prompt so CFG works; a minibatch has one
     shape, so each step (of the VAE too) draws its batch from one bucket, chosen by a seeded stream
     in proportion to the bucket's share of the images;
  5. save a `ZImagePipeline` folder (safetensors) plus `build.json` (config, losses, PSNR, seconds).

    ladd toy build --out ladd/toy/assets/toy-zimage            # ~25 min on 2 CPU cores (see docs/toy-world.md)
    ladd toy build --out /tmp/toy --quick             # a 1-minute smoke build
    ladd toy build --out /tmp/toy --quick --buckets toy   # ... trained at 64x64, 80x48 and 48x80

With one bucket (the default) no bucket is ever drawn, so the random streams, and the weights, are
those of the square-only build that made the shipped teacher.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ladd.data.buckets import Bucket, assign, check_buckets
from ladd.flow import interpolate, velocity_target
from ladd.models.loading import write_world
from ladd.models.text import encode_prompts, token_lengths
from ladd.models.tiny import TinyConfig, build_text_encoder, build_tokenizer, build_transformer, build_vae
from ladd.models.zimage import ZImageAdapter
from ladd.toy import world


@dataclass(kw_only=True)
class ToyBuildConfig:
    seed: int = 0
    threads: int = 2
    image_size: int = 64  # the pipeline's default size (VAE sample_size); must be one of the buckets
    # (width, height) pixel sizes trained on; n_images is split evenly over them
    buckets: tuple[tuple[int, int], ...] = ((64, 64),)
    # The teacher's world: one large object (the world module draws up to three; a 2.5M-parameter
    # teacher in 25 CPU minutes learns shapes only at this size: docs/notes/2026-11-26-toy-teacher-attempts.md).
    max_objects: int = 1
    pattern_prob: float = 0.3  # share of striped / dotted objects
    diameter_range: tuple[float, float] = (0.45, 0.65)  # object size, fraction of the side sqrt(W*H)
    n_images: int = 16384  # fixed training set (train-split captions only)
    # VAE: three levels -> downsampling factor 4 -> 16×16×16 latents -> 8×8 image tokens
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_crop: int = 32  # the VAE is convolutional: train on crops (no side past the bucket's), 4× cheaper
    # transformer
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    text_hidden: int = 64
    steps: int = 6000  # 22.7 min of the measured 25.2-min build on 2 cores
    # With several buckets: the first share of the steps trains on the first bucket (the square) alone,
    # the rest on every bucket in proportion (the shapes are learnt once, then the other frames).
    first_bucket_share: float = 0.5
    batch: int = 16  # more, smaller updates learn the world faster per sample (docs/notes/2026-11-26-toy-teacher-attempts.md)
    lr: float = 1e-3
    sigma_mean: float = 0.5  # σ ~ logit-normal(sigma_mean, 1): leans to high noise, where layout is decided
    warmup: int = 200
    caption_dropout: float = 0.1
    ema: float = 0.999

    def __post_init__(self):
        self.buckets = tuple((int(w), int(h)) for w, h in self.buckets)  # build.json gives lists
        if not 0 <= self.first_bucket_share <= 1:
            raise ValueError(f"first_bucket_share must be in [0, 1], got {self.first_bucket_share}")
        check_buckets(self.bucket_list(), self.latent_factor())
        for w, h in self.buckets:  # refuse here what scene sampling would refuse minutes later
            if self.diameter_range[1] > world.max_diameter(w / h):
                raise ValueError(f"bucket {w}x{h} holds objects up to diameter {world.max_diameter(w / h):.3f}, "
                                 f"below diameter_range {self.diameter_range}")
        if (self.image_size, self.image_size) not in self.buckets:
            raise ValueError(f"image_size {self.image_size} (the pipeline's default size) must be one of the buckets "
                             f"{self.buckets}")

    def latent_factor(self) -> int:
        """Pixels per image token: the VAE's downsampling × the transformer's 2×2 patches."""
        return 2 ** (len(self.vae_channels) - 1) * 2

    def bucket_list(self) -> list[Bucket]:
        return [Bucket(w, h) for w, h in self.buckets]

    def bucket_counts(self) -> list[int]:
        """Training images per bucket: n_images split evenly, the remainder to the first buckets."""
        k = len(self.buckets)
        return [self.n_images // k + (i < self.n_images % k) for i in range(k)]

    def tiny(self) -> TinyConfig:
        return TinyConfig(
            seed=self.seed, image_size=self.image_size, vae_channels=self.vae_channels,
            dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, axes_dims=self.axes_dims,
            text_hidden=self.text_hidden, text_intermediate=2 * self.text_hidden, merges=word_merges(),
        )


CAPTION_SCORER = "ladd.toy.fidelity:score_captions"  # declared in the folder's ladd_world.json
QUICK = dict(n_images=512, vae_steps=30, steps=30, warmup=5)


def word_merges() -> list[str]:
    """BPE merges that make each toy-world word one token.

    Inside a caption every word follows a space, so each gets the chain Ġw1, Ġw1w2, ... (Ġ is the
    byte-level symbol for a space); every such merge extends a Ġ-token, so no two words' merges can
    interleave. The caption-initial "an" is merged last, after every chain that contains "a n".
    """
    words = {"a", "an", "on", "and", "background"} | set(world.BACKGROUNDS) | set(world.SHAPES)
    words |= {p for p in world.PATTERNS if p != "solid"}
    merges: list[str] = []
    for word in sorted(words):
        w = "Ġ" + word
        for i in range(2, len(w) + 1):
            pair = f"{w[: i - 1]} {w[i - 1]}"
            if pair not in merges:
                merges.append(pair)
    return merges + ["a n"]


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [-1, 1]


def step_buckets(counts: list[int], steps: int, seed: int) -> np.ndarray:
    """The bucket each training step draws its minibatch from, in proportion to the bucket's images.

    A stream of its own (ladd.data.buckets.assign), so the batches' draws from the torch generator
    are the same whatever the buckets; with one bucket nothing is drawn at all.
    """
    return assign([Bucket(1, 1, float(c)) for c in counts], steps, seed)  # assign reads only the weights


def train_vae(vae, images: list[np.ndarray], cfg: ToyBuildConfig, gen: torch.Generator) -> dict:
    """images: one (n, H, W, 3) uint8 array per bucket."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    which = step_buckets([len(b) for b in images], cfg.vae_steps, cfg.seed + 1)
    bar = tqdm(range(cfg.vae_steps), desc="vae", unit="step")
    for step in bar:
        bucket = images[which[step]]
        idx = torch.randint(len(bucket), (cfg.vae_batch,), generator=gen)
        x = _to_tensor(bucket[idx.numpy()])
        h, w = x.shape[-2:]
        ch, cw = min(cfg.vae_crop, h), min(cfg.vae_crop, w)
        if ch < h or cw < w:  # offsets on the 4-pixel latent grid; drawn one after the other, as (2,) did
            i = int(torch.randint(0, (h - ch) // 4 + 1, (1,), generator=gen)) * 4
            j = int(torch.randint(0, (w - cw) // 4 + 1, (1,), generator=gen)) * 4
            x = x[:, :, i : i + ch, j : j + cw]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # cosine decay: the last steps sharpen fine stripes
            group["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        opt.step()
        bar.set_postfix(mse=f"{rec.item():.4f}")
    vae.eval()
    return {"vae_final_mse": rec.item()}


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means (un-normalised latents) of all images."""
    out = [vae.encode(_to_tensor(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def psnr(vae, images: np.ndarray) -> float:
    x = _to_tensor(images)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return 10 * math.log10(1.0 / mse)


def encode_captions(pipe, captions: list[str], chunk: int = 256) -> list[torch.Tensor]:
    """encode_prompt in chunks, padded to the chunk's longest prompt rather than 512 tokens.

    Qwen3 is causal and the padding is on the right, so the real tokens' features do not depend on
    the padding length (tests/test_toy_build.py pins it; precompute does the same); 512-token padding
    made this the slowest stage.
    """
    out = []
    for i in range(0, len(captions), chunk):
        part = captions[i : i + chunk]
        out += encode_prompts(pipe, part, max_sequence_length=max(token_lengths(pipe.tokenizer, part)))
    return out


def train_transformer(
    adapter: ZImageAdapter, latents: list[torch.Tensor], caps: list[list[torch.Tensor]], empty: torch.Tensor,
    cfg: ToyBuildConfig, gen: torch.Generator,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Flow matching through the adapter: x_σ = (1 − σ)x0 + σε, loss ‖v_θ(x_σ, σ, c) − (ε − x0)‖².

    latents and caps hold one entry per bucket; each step trains on one bucket's latents.
    """
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}
    adapter.train()
    losses = []
    which = step_buckets([len(x) for x in latents], cfg.steps, cfg.seed)
    which[: int(cfg.first_bucket_share * cfg.steps)] = 0  # one bucket: already all 0
    bar = tqdm(range(cfg.steps), desc="teacher", unit="step")
    for step in bar:
        k = which[step]
        idx = torch.randint(len(latents[k]), (cfg.batch,), generator=gen)
        x0 = latents[k][idx]
        eps = torch.randn(x0.shape, generator=gen)
        # σ ~ logit-normal(sigma_mean, 1) as in SD3 / Z-Image training, plus 10 % uniform for the ends.
        sigma = torch.sigmoid(cfg.sigma_mean + torch.randn(cfg.batch, generator=gen))
        uniform = torch.rand(cfg.batch, generator=gen)
        sigma = torch.where(torch.rand(cfg.batch, generator=gen) < 0.1, uniform, sigma)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        batch_caps = [empty if d else caps[k][i] for i, d in zip(idx.tolist(), drop.tolist())]
        v = adapter(interpolate(x0, eps, sigma), sigma, batch_caps).velocity
        loss = F.mse_loss(v, velocity_target(x0, eps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for k, v_ in adapter.transformer.state_dict().items():
                ema[k].lerp_(v_, 1 - decay) if v_.is_floating_point() else ema[k].copy_(v_)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    return {"teacher_final_loss": float(np.mean(losses[-200:]))}, ema


def build_toy(out: str | Path, cfg: ToyBuildConfig | None = None) -> dict:
    """Train and save the toy teacher pipeline; returns the build report (also in build.json)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    cfg = cfg or ToyBuildConfig()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    report: dict = {"config": asdict(cfg), "seconds": {}}
    tiny = cfg.tiny()
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()

    # One rendered set per bucket; the first uses the build's seed itself, so a square-only build
    # renders exactly the training set it always did.
    images, captions = [], []
    for k, ((w, h), n) in enumerate(zip(cfg.buckets, cfg.bucket_counts())):
        imgs, caps_k = world.make_batch(n, seed=cfg.seed if k == 0 else [cfg.seed, k], width=w, height=h,
                                        **scene_kwargs(cfg))
        images.append(imgs)
        captions.append(caps_k)
    report["buckets"] = [{"name": b.name, "width": b.width, "height": b.height, "n_images": n}
                         for b, n in zip(cfg.bucket_list(), cfg.bucket_counts())]
    report["seconds"]["render"] = time.perf_counter() - t0

    t = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    vae = build_vae(tiny)
    report.update(train_vae(vae, images, cfg, gen))
    raws = [encode_images(vae, imgs) for imgs in images]
    # One shift and scale for every bucket (the VAE config has one): over all latent values. One
    # bucket reduces its tensor as it is: the posterior means have channels-last strides, and
    # flattening copies them into another summation order (last-bit changes to the shift).
    flat = raws[0] if len(raws) == 1 else torch.cat([r.flatten() for r in raws])
    shift, scale = flat.mean().item(), 1.0 / flat.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = [(raw - shift) * scale for raw in raws]  # what the pipeline's transformer sees
    per_bucket = {b.name: psnr(vae, imgs[:256]) for b, imgs in zip(cfg.bucket_list(), images)}
    report["vae_psnr_db"] = float(np.mean(list(per_bucket.values())))
    report["vae_psnr_db_per_bucket"] = per_bucket
    report["vae_shift_factor"], report["vae_scaling_factor"] = shift, scale
    report["seconds"]["vae"] = time.perf_counter() - t
    print(f"vae: PSNR {report['vae_psnr_db']:.1f} dB on training images; shift {shift:.4f} scale {scale:.4f}")

    t = time.perf_counter()
    tokenizer = build_tokenizer(tiny.merges)
    torch.manual_seed(cfg.seed)
    text_encoder = build_text_encoder(tiny, vocab_size=len(tokenizer))
    torch.manual_seed(cfg.seed + 2)
    transformer = build_transformer(tiny)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=tiny.shift)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    unique = sorted({c for caps_k in captions for c in caps_k})
    feats = dict(zip(unique, encode_captions(pipe, unique)))
    caps = [[feats[c] for c in caps_k] for caps_k in captions]
    empty = encode_prompts(pipe, [""])[0]
    report["unique_captions"] = len(unique)
    report["seconds"]["text"] = time.perf_counter() - t

    t = time.perf_counter()
    stats, ema = train_transformer(ZImageAdapter(transformer), latents, caps, empty, cfg, gen)
    transformer.load_state_dict(ema)
    transformer.eval()
    report.update(stats)
    report["seconds"]["teacher"] = time.perf_counter() - t

    pipe.save_pretrained(out, safe_serialization=True)
    report["seconds"]["total"] = time.perf_counter() - t0
    report["parameters"] = {
        "transformer": sum(p.numel() for p in transformer.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
    }
    (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    write_world(out, "toy", CAPTION_SCORER)
    print(f"wrote {out} in {report['seconds']['total'] / 60:.1f} min")
    return report


def scene_kwargs(cfg: ToyBuildConfig | dict) -> dict:
    """The world knobs of a build (its config or build.json's), for drawing matching prompts."""
    c = cfg if isinstance(cfg, dict) else asdict(cfg)
    return {"max_objects": c.get("max_objects", 3), "pattern_prob": c.get("pattern_prob", 0.4),
            "diameter_range": tuple(c.get("diameter_range", (0.2, 0.4)))}


def _build_config(pipeline: str | Path) -> dict:
    """build.json's config of a toy pipeline folder ("toy": the shipped one); this build's defaults without one."""
    from ladd.models.loading import TOY_PIPELINE

    path = (TOY_PIPELINE if str(pipeline) == "toy" else Path(pipeline)) / "build.json"
    return json.loads(path.read_text())["config"] if path.is_file() else asdict(ToyBuildConfig())


def pipeline_world(pipeline: str | Path = "toy") -> dict:
    """The world knobs a toy pipeline was built on (its build.json; else this build's defaults).

    Prompts for training and evaluation must come from the teacher's own world: a one-object teacher
    asked for three objects is being tested on something it never saw.
    """
    return scene_kwargs(_build_config(pipeline))


def pipeline_buckets(pipeline: str | Path = "toy") -> list[tuple[int, int]]:
    """The (width, height) sizes a toy pipeline was trained at; [(64, 64)] for a build that predates buckets."""
    c = _build_config(pipeline)
    size = c.get("image_size", 64)
    return [(int(w), int(h)) for w, h in c.get("buckets", [(size, size)])]


def quick_config(**overrides) -> ToyBuildConfig:
    return replace(ToyBuildConfig(**QUICK), **overrides)
