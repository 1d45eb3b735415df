"""Typed configuration: dataclasses per section, loaded from TOML, with `--set section.key=value`.

Every knob of the blog is a field, defaulting to its current best. Loading is strict: an unknown key
is rejected with the nearest valid name, a wrong type or a contradiction with one line saying what
to change. The fully resolved config is written to the run folder and into every checkpoint.

    cfg = load_config("configs/toy.toml", overrides=["method.gen_update_interval=4"])
    print(to_toml(cfg))
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ladd.flow import Curriculum
from ladd.losses import AGGREGATES, KINDS

DECAYS = ("none", "linear", "cosine")


class ConfigError(ValueError):
    """A config problem, stated in one line the user can act on."""


@dataclass(kw_only=True)
class ModelConfig:
    pipeline: str = "toy"  # a ZImagePipeline folder; "toy" = the embedded toy teacher (ladd/toy/assets/toy-zimage)
    disc_layers: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 25, 29])
    disc_hidden: int = 256
    disc_cond_dim: int = 256
    disc_spectral_norm: bool = False
    disc_projection: bool = False  # + a projection term <features, W·text> in each head's logit
    text_cond: str = "pooled"  # "pooled" caption features | "clip" (needs clip in the data)
    gradient_checkpointing: bool = False
    student: str = "full"  # "full" copy of the teacher | "lora": teacher weights + adapters (one copy)
    lora_rank: int = 64
    lora_alpha: float = 64.0

    def __post_init__(self):
        if self.student not in ("full", "lora"):
            raise ConfigError(f"model.student {self.student!r} is unknown; choose 'full' or 'lora'")
        if self.text_cond not in ("pooled", "clip"):
            raise ConfigError(f"model.text_cond {self.text_cond!r} is unknown; choose 'pooled' or 'clip'")


@dataclass(kw_only=True)
class MethodConfig:
    """The LADD method: update schedule, re-noising, curriculum, losses."""

    gen_update_interval: int = 3  # disc steps per student update; blog sweeps: 3 wins after the fixes
    disc_warmup_steps: int = 0  # the first optimizer steps train the disc alone (no student update)
    renoise_m: float = 1.0  # logit-normal mean of t̂ (sigmoid(1) ≈ 0.73)
    renoise_s: float = 1.0  # logit-normal std of t̂
    student_timesteps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    student_timestep_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    curriculum_warmup_steps: int = 0  # optimizer steps drawing only the two easiest timesteps
    loss: str = "hinge"  # "hinge" | "nonsaturating"
    aggregate: str = "mean_heads"  # per-head losses averaged (LADD paper) | "sum_logits" (the blog)
    r1_weight: float = 0.0  # γ; adds γ/2·E‖∇D(real features)‖² to the disc loss when > 0
    distill_weight: float = 0.0  # λ > 0: student inputs use the teacher's own initial noise, + λ·‖x̂0 − x0‖²
    grad_clip_g: float = 1.0  # max grad norm of the student (0 = no clipping, norm still measured)
    grad_clip_d: float = 1.0
    allow_hinge_batch_of_one: bool = False  # see check_micro_batch: hinge on 1 sample saturates

    def __post_init__(self):
        self.student_timesteps = tuple(float(t) for t in self.student_timesteps)
        self.student_timestep_probs = tuple(float(p) for p in self.student_timestep_probs)
        if self.gen_update_interval < 1:
            raise ConfigError(f"method.gen_update_interval must be >= 1, got {self.gen_update_interval}")
        if self.disc_warmup_steps < 0:
            raise ConfigError(f"method.disc_warmup_steps must be >= 0, got {self.disc_warmup_steps}")
        if self.loss not in KINDS:
            raise ConfigError(f"method.loss {self.loss!r} is unknown; choose one of {', '.join(KINDS)}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"method.aggregate {self.aggregate!r} is unknown; choose one of {', '.join(AGGREGATES)}")
        if self.renoise_s <= 0:
            raise ConfigError(f"method.renoise_s must be > 0, got {self.renoise_s}")
        if self.r1_weight < 0:
            raise ConfigError(f"method.r1_weight must be >= 0, got {self.r1_weight}")
        if self.distill_weight < 0:
            raise ConfigError(f"method.distill_weight must be >= 0, got {self.distill_weight}")
        try:
            self.curriculum()
        except ValueError as e:
            raise ConfigError(f"method: {e}") from None

    def curriculum(self) -> Curriculum:
        return Curriculum(
            timesteps=self.student_timesteps,
            probs=self.student_timestep_probs,
            warmup_steps=self.curriculum_warmup_steps,
        )

    def check_micro_batch(self, batch_per_rank: int) -> None:
        """Refuse a per-rank micro-batch of 1 with the hinge loss unless explicitly allowed.

        With one sample the disc separates real from fake past the ±1 margins almost at once, both
        ReLUs go to zero and so does every gradient; accumulating zeros over micro-batches is still
        zero. This is how the public Z-Image LADD run collapsed into noise.
        """
        if batch_per_rank < 1:
            raise ConfigError(f"batch per rank must be >= 1, got {batch_per_rank}")
        if batch_per_rank == 1 and self.loss == "hinge" and not self.allow_hinge_batch_of_one:
            raise ConfigError(
                "hinge loss with a per-rank micro-batch of 1 saturates to zero gradient (it collapsed the "
                "public run): use data.batch_per_rank >= 2, or method.loss = 'nonsaturating', or set "
                "method.allow_hinge_batch_of_one = true to override"
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr_g: float = 5e-6
    lr_d: float = 1e-5
    betas_g: tuple[float, float] = (0.9, 0.999)
    betas_d: tuple[float, float] = (0.9, 0.999)
    weight_decay_g: float = 0.0
    weight_decay_d: float = 0.0
    warmup_steps: int = 0  # linear LR warmup, both optimizers
    decay: str = "none"  # after warmup, both optimizers: "none" | "linear" | "cosine", to lr_min_ratio·lr at the end
    lr_min_ratio: float = 0.0
    optimizer: str = "adamw"  # "adamw" | "adamw8bit" (bitsandbytes, CUDA only)

    def __post_init__(self):
        self.betas_g, self.betas_d = tuple(self.betas_g), tuple(self.betas_d)
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optim.optimizer {self.optimizer!r} is unknown; choose 'adamw' or 'adamw8bit'")
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ConfigError(f"optim.lr_g and optim.lr_d must be > 0, got {self.lr_g} and {self.lr_d}")
        if self.decay not in DECAYS:
            raise ConfigError(f"optim.decay {self.decay!r} is unknown; choose one of {', '.join(DECAYS)}")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"optim.lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")

    def lr_factor(self, step: int, total: int) -> float:
        """The multiplier of both learning rates at optimizer step `step` (0-based) of `total`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "none" or total <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        shape = 1 - progress if self.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr_min_ratio + (1 - self.lr_min_ratio) * shape


@dataclass(kw_only=True)
class DataConfig:
    path: str = ""  # a `ladd precompute` output folder
    batch_per_rank: int = 2  # micro-batch per rank per forward (hinge needs >= 2)
    grad_accum: int = 1  # micro-batches per optimizer step
    text_dropout: float = 0.0  # drop captions (features and disc conditioning together) to ""
    seed: int = 0  # shuffle seed

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ConfigError(f"data.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.text_dropout < 1:
            raise ConfigError(f"data.text_dropout must be in [0, 1), got {self.text_dropout}")


@dataclass(kw_only=True)
class TrainConfig:
    out: str = "runs/ladd"  # run folder: config, metrics.jsonl, checkpoints/, validation/
    steps: int = 1000  # optimizer steps
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "no"
    ema_decay: float = 0.0  # 0 = no EMA of the student
    checkpoint_every: int = 500
    keep_last: int = 2
    teacher_sharded: bool = False  # FSDP-shard the frozen teacher too (smaller GPUs)

    def __post_init__(self):
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ConfigError(f"train.mixed_precision {self.mixed_precision!r}: choose 'auto', 'bf16' or 'no'")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class ValidationConfig:
    every: int = 250  # steps between validations; step 0 always; 0 = only step 0 and the end
    num_prompts: int = 8  # fixed prompts taken from the data's first samples
    seed: int = 1234


@dataclass(kw_only=True)
class HealthConfig:
    nan_patience: int = 5  # consecutive non-finite losses before the run stops
    collapse_window: int = 100  # steps over which the logit gap is averaged
    collapse_gap: float = 0.05  # |mean logit gap| below this over the window ...
    collapse_d_loss: float = 1.8  # ... while the mean d_loss stays above this -> collapse, unless ...
    collapse_drift: float = 1.3  # ... a validation within the window has drift at most this (0: never excuse)
    diversity_fraction: float = 0.2  # validation images closer than this × the teacher's spread -> collapse
    drift_factor: float = 2.2  # validation latent MSE to the teacher above this × the untrained student's -> collapse
    on_collapse: str = "warn"  # "warn" | "stop" | "rollback"
    rollback_lr_d_factor: float = 0.5

    def __post_init__(self):
        if self.drift_factor <= 1:
            raise ConfigError(f"health.drift_factor must be > 1 (a multiple of the untrained student's MSE), got {self.drift_factor}")
        if self.collapse_drift < 0:
            raise ConfigError(f"health.collapse_drift must be >= 0 (0: the logit-gap rule never waits for validation), got {self.collapse_drift}")
        if self.on_collapse not in ("warn", "stop", "rollback"):
            raise ConfigError(f"health.on_collapse {self.on_collapse!r}: choose 'warn', 'stop' or 'rollback'")


@dataclass(kw_only=True)
class LogConfig:
    trackers: list[str] = field(default_factory=list)  # "tensorboard", "wandb"
    every: int = 1
    wandb_project: str = "ladd"


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        # Contradictions across sections.
        self.method.check_micro_batch(self.data.batch_per_rank)
        bad = [t for t in self.log.trackers if t not in ("tensorboard", "wandb")]
        if bad:
            raise ConfigError(f"log.trackers: unknown tracker {bad[0]!r}; choose from 'tensorboard', 'wandb'")


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _nearest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value, hint, where: str):
    """Check a TOML value against a field's annotation; lists become tuples where asked."""
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(hint)
        inner = args[0] if args else object
        items = [_coerce(v, inner, where) if inner in (int, float, str, bool) else v for v in value]
        return tuple(items) if origin is tuple else items
    return value  # unions and nested types: checked by the section's __post_init__


def _parse_value(text: str):
    """`--set` values are TOML literals; bare words are strings (`--set model.text_cond=clip`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(data: dict) -> Config:
    types_ = _section_types()
    sections = {}
    for name, values in data.items():
        if name not in types_:
            raise ConfigError(f"unknown config section [{name}]{_nearest(name, types_)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of keys")
        cls = types_[name]
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown key {name}.{key}{_nearest(key, hints)}")
            values[key] = _coerce(value, hints[key], f"{name}.{key}")
        try:
            sections[name] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"[{name}]: {e}") from None
    return Config(**sections)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a TOML file (or defaults) plus `section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr_g=1e-5")
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        data.setdefault(section, {})[key] = _parse_value(text.strip())
    return build_config(data)


def to_dict(cfg: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, a plain TOML-able tree


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: Config) -> str:
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) for every key whose resolved values differ."""
    out = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key, "<unset>") != sb.get(key, "<unset>"):
                out.append((f"{section}.{key}", sa.get(key, "<unset>"), sb.get(key, "<unset>")))
    return out
