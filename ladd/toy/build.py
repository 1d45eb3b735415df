"""Build the toy teacher: a small ZImagePipeline that has really learned the toy world.

Stage 1, the square teacher (each part timed, with a progress bar):
  1. render a fixed training set of captioned square scenes (`ladd.toy.world`, train split only);
  2. train a small 16-channel `AutoencoderKL` on it (reconstruction + a light KL), then set its
     `shift_factor` / `scaling_factor` from the latents' mean and std, as Z-Image's VAE has them;
  3. a tiny frozen `Qwen3Model` text encoder with a byte-level tokenizer whose BPE merges make every
     world word one token (random features of whole words condition well; of bytes, poorly);
  4. train a `ZImageTransformer2DModel` by flow matching *through the adapter* (LADD convention:
     target v = ε − x0), with caption dropout to the empty prompt so CFG works.
Stage 2, with several buckets (`--buckets toy`: 64x64, 80x48, 48x80): render a set per bucket,
encode it with the square VAE (convolutional, so it reads any frame), and go on training the
transformer on all of them, each step's minibatch from one bucket, drawn uniformly.
The shapes are learnt once, on the square; the other frames need only a fraction of the steps.
Then save a `ZImagePipeline` folder (safetensors) plus `build.json` (config, losses, PSNR, seconds).

    ladd toy build --out ladd/toy/assets/toy-zimage --buckets toy   # the shipped teacher (docs/toy-world.md)
    ladd toy build --out SQ                             # stage 1 alone: the square-only teacher
    ladd toy build --out DIR --buckets toy --init SQ    # stage 2 only, on top of it (5 min)
    ladd toy build --out /tmp/toy --quick               # a 1-minute smoke build

Stage 1 is the square-only build itself (its random streams are those of the builder before
buckets), so `--init` with a square build's folder gives the same weights as building from scratch.
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
    # (width, height) pixel sizes trained on. Stage 1 trains the square teacher at image_size² alone
    # (the square-only build); with more sizes, stage 2 adapts it to all of them.
    buckets: tuple[tuple[int, int], ...] = ((64, 64),)
    # The teacher's world: one large object (the world module draws up to three; a 2.5M-parameter
    # teacher in 25 CPU minutes learns shapes only at this size: docs/notes/2026-11-26-toy-teacher-attempts.md).
    max_objects: int = 1
    pattern_prob: float = 0.3  # share of striped / dotted objects
    diameter_range: tuple[float, float] = (0.45, 0.65)  # object size, fraction of the side sqrt(W*H)
    n_images: int = 16384  # the square teacher's fixed training set (train-split captions only)
    # VAE: three levels -> downsampling factor 4 -> 16×16×16 latents -> 8×8 image tokens
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    vae_crop: int = 32  # the VAE is convolutional: train on 32² crops of the square, 4× cheaper
    # transformer
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    text_hidden: int = 64
    steps: int = 6000  # stage 1; 22.7 min of the measured 25.2-min build on 2 cores
    batch: int = 16  # more, smaller updates learn the world faster per sample (docs/notes/2026-11-26-toy-teacher-attempts.md)
    lr: float = 1e-3
    sigma_mean: float = 0.5  # σ ~ logit-normal(sigma_mean, 1): leans to high noise, where layout is decided
    warmup: int = 200
    caption_dropout: float = 0.1
    ema: float = 0.999
    # Stage 2 (several buckets only): the square teacher trained on every bucket, adapt_images each (the
    # square's: its stage-1 set), each step's bucket drawn uniformly. The shapes are learnt once, on the
    # square; the other frames take a fraction of the steps, but 1,000 steps on 4,096 images each are
    # too few (docs/notes/2026-12-01-toy-teacher-buckets.md).
    adapt_images: int = 16384
    adapt_steps: int = 1500
    adapt_lr: float = 3e-4
    adapt_warmup: int = 100

    def __post_init__(self):
        self.buckets = tuple((int(w), int(h)) for w, h in self.buckets)  # build.json gives lists
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

    def square(self) -> ToyBuildConfig:
        """Stage 1's config: the square-only build at image_size²."""
        return replace(self, buckets=((self.image_size, self.image_size),))

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


def train_vae(vae, images: np.ndarray, cfg: ToyBuildConfig, gen: torch.Generator) -> dict:
    """images: (n, H, W, 3) uint8, the square set."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="vae", unit="step")
    for step in bar:
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = _to_tensor(images[idx.numpy()])
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


@dataclass(frozen=True)
class Schedule:
    """One training stage of the transformer: `steps` steps, warm-up then cosine decay to 0."""

    desc: str
    steps: int
    lr: float
    warmup: int


def train_transformer(
    adapter: ZImageAdapter, latents: list[torch.Tensor], caps: list[list[torch.Tensor]], empty: torch.Tensor,
    cfg: ToyBuildConfig, sched: Schedule, which: np.ndarray, gen: torch.Generator,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Flow matching through the adapter: x_σ = (1 − σ)x0 + σε, loss ‖v_θ(x_σ, σ, c) − (ε − x0)‖².

    latents and caps hold one entry per bucket; step s trains on bucket which[s]. Returns the mean
    loss of the last 200 steps and the EMA weights (started from the weights the stage starts with).
    """
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=sched.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in adapter.transformer.state_dict().items()}
    adapter.train()
    losses = []
    bar = tqdm(range(sched.steps), desc=sched.desc, unit="step")
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
        lr = sched.lr * min(1.0, (step + 1) / sched.warmup) * 0.5 * (1 + math.cos(math.pi * step / sched.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for name, v_ in adapter.transformer.state_dict().items():
                ema[name].lerp_(v_, 1 - decay) if v_.is_floating_point() else ema[name].copy_(v_)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    adapter.eval()
    return float(np.mean(losses[-200:])), ema


def render(cfg: ToyBuildConfig, k: int, n: int) -> tuple[np.ndarray, list[str]]:
    """The first n scenes of bucket k's training set; the square (image_size²) uses the build's seed
    itself, so its set is the one the square-only build trains on, whatever the other buckets."""
    w, h = cfg.buckets[k]
    seed = cfg.seed if (w, h) == (cfg.image_size, cfg.image_size) else [cfg.seed, k]
    return world.make_batch(n, seed=seed, width=w, height=h, **scene_kwargs(cfg))


def assemble(cfg: ToyBuildConfig, vae):
    """The pipeline around a VAE: the seeded text encoder and tokenizer, a fresh transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tiny = cfg.tiny()
    tokenizer = build_tokenizer(tiny.merges)
    torch.manual_seed(cfg.seed)
    text_encoder = build_text_encoder(tiny, vocab_size=len(tokenizer))
    torch.manual_seed(cfg.seed + 2)
    transformer = build_transformer(tiny)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=tiny.shift)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def build_square(cfg: ToyBuildConfig):
    """Stage 1, the square-only build: render, VAE, text encoder, transformer. Returns (pipe, report)."""
    report: dict = {"config": asdict(cfg), "seconds": {}}
    tiny = cfg.tiny()
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    images, captions = render(cfg, 0, cfg.n_images)
    report["buckets"] = [{"name": cfg.bucket_list()[0].name, "width": cfg.image_size, "height": cfg.image_size,
                          "n_images": cfg.n_images}]
    report["seconds"]["render"] = time.perf_counter() - t0

    t = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    vae = build_vae(tiny)
    report.update(train_vae(vae, images, cfg, gen))
    # The posterior means have channels-last strides: reduced as they are, not flattened (flattening
    # copies them into another summation order: last-bit changes to the shift).
    raw = encode_images(vae, images)
    shift, scale = raw.mean().item(), 1.0 / raw.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = (raw - shift) * scale  # what the pipeline's transformer sees
    report["vae_psnr_db"] = psnr(vae, images[:256])
    report["vae_psnr_db_per_bucket"] = {cfg.bucket_list()[0].name: report["vae_psnr_db"]}
    report["vae_shift_factor"], report["vae_scaling_factor"] = shift, scale
    report["seconds"]["vae"] = time.perf_counter() - t
    print(f"vae: PSNR {report['vae_psnr_db']:.1f} dB on training images; shift {shift:.4f} scale {scale:.4f}")

    t = time.perf_counter()
    pipe = assemble(cfg, vae)
    unique = sorted(set(captions))
    feats = dict(zip(unique, encode_captions(pipe, unique)))
    empty = encode_prompts(pipe, [""])[0]
    report["unique_captions"] = len(unique)
    report["seconds"]["text"] = time.perf_counter() - t

    t = time.perf_counter()
    sched = Schedule("teacher", cfg.steps, cfg.lr, cfg.warmup)
    which = step_buckets([cfg.n_images], cfg.steps, cfg.seed)  # one bucket: all 0, nothing drawn
    loss, ema = train_transformer(ZImageAdapter(pipe.transformer), [latents], [[feats[c] for c in captions]], empty,
                                  cfg, sched, which, gen)
    pipe.transformer.load_state_dict(ema)
    report["teacher_final_loss"] = loss
    report["seconds"]["teacher"] = time.perf_counter() - t
    return pipe, report


def check_init(init: str | Path, cfg: ToyBuildConfig) -> tuple[Path, dict]:
    """The folder and build.json of a square-only build with cfg's stage-1 settings; ValueError if not."""
    folder = Path(init)
    path = folder / "build.json"
    if not path.is_file():
        raise ValueError(f"--init {init}: no build.json there; give a folder `ladd toy build` wrote")
    theirs = json.loads(path.read_text())
    ours = json.loads(json.dumps(asdict(cfg.square())))
    skip = {"threads", "buckets"} | {k for k in ours if k.startswith("adapt_")}
    diff = [k for k in ours if k not in skip and k in theirs["config"] and theirs["config"][k] != ours[k]]
    buckets = [tuple(b) for b in theirs["config"].get("buckets", [[cfg.image_size] * 2])]
    if diff or buckets != list(cfg.square().buckets):
        raise ValueError(f"--init {init} was built with other stage-1 settings ({', '.join(diff) or 'buckets'}); "
                         f"give the square build of this config or drop --init")
    return folder, theirs


def load_square(init: str | Path, cfg: ToyBuildConfig):
    """Stage 1 from a folder a square-only build wrote with cfg's stage-1 settings: (pipe, report).

    The modules are the builder's own, with the folder's weights, so what stage 2 saves is what a
    build from scratch saves (loaded pipelines would also write their load path into the configs).
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    folder, theirs = check_init(init, cfg)
    vae = build_vae(cfg.tiny())
    pipe = assemble(cfg, vae)
    for name in ("vae", "text_encoder", "transformer"):
        (weights,) = (folder / name).glob("*.safetensors")
        getattr(pipe, name).load_state_dict(load_file(weights))
    saved = AutoencoderKL.load_config(folder / "vae")
    vae.register_to_config(shift_factor=saved["shift_factor"], scaling_factor=saved["scaling_factor"])
    report = {k: v for k, v in theirs.items() if k not in ("config", "parameters")}
    report["init"] = {"path": str(init), "seconds": theirs["seconds"]}
    report["seconds"] = {}
    return pipe, report


def adapt(pipe, cfg: ToyBuildConfig, report: dict) -> None:
    """Stage 2: the square teacher trained on every bucket (the square's set included), each step's
    bucket drawn uniformly, on a random stream of its own (the same from --init)."""
    t = time.perf_counter()
    sets = [render(cfg, k, cfg.adapt_images) for k in range(len(cfg.buckets))]
    report["buckets"] = [{"name": b.name, "width": b.width, "height": b.height, "n_images": len(imgs)}
                         for b, (imgs, _) in zip(cfg.bucket_list(), sets)]
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents = [(encode_images(pipe.vae, imgs) - shift) * scale for imgs, _ in sets]
    report["vae_psnr_db_per_bucket"] = {b.name: psnr(pipe.vae, imgs[:256])
                                        for b, (imgs, _) in zip(cfg.bucket_list(), sets)}
    unique = sorted({c for _, caps_k in sets for c in caps_k})
    feats = dict(zip(unique, encode_captions(pipe, unique)))
    caps = [[feats[c] for c in caps_k] for _, caps_k in sets]
    empty = encode_prompts(pipe, [""])[0]
    report["seconds"]["adapt_data"] = time.perf_counter() - t

    t = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    sched = Schedule("adapt", cfg.adapt_steps, cfg.adapt_lr, cfg.adapt_warmup)
    which = step_buckets([len(x) for x in latents], cfg.adapt_steps, cfg.seed + 3)
    loss, ema = train_transformer(ZImageAdapter(pipe.transformer), latents, caps, empty, cfg, sched, which, gen)
    pipe.transformer.load_state_dict(ema)
    report["adapt_final_loss"] = loss
    report["seconds"]["adapt"] = time.perf_counter() - t


def build_toy(out: str | Path, cfg: ToyBuildConfig | None = None, init: str | Path | None = None) -> dict:
    """Train and save the toy teacher pipeline; returns the build report (also in build.json).

    init: the folder of a square-only build with cfg's stage-1 settings, loaded instead of trained;
    only stage 2 then runs.
    """
    cfg = cfg or ToyBuildConfig()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    t0 = time.perf_counter()
    pipe, report = build_square(cfg.square()) if init is None else load_square(init, cfg)
    report["config"] = asdict(cfg)
    if len(cfg.buckets) > 1:
        adapt(pipe, cfg, report)
    pipe.transformer.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    report["seconds"]["total"] = time.perf_counter() - t0
    report["parameters"] = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
                            for name in ("transformer", "vae", "text_encoder")}
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
