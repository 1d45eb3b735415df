"""Typed configuration: dataclasses per section, loaded from TOML, with `--set section.key=value`.

Every knob of the blog is a field, defaulting to its current best. Loading is strict: an unknown key
is rejected with the nearest valid name, a wrong type or a contradiction with one line saying what
to change. The fully resolved config is written to the run folder and into every checkpoint. Each
field's doc is the string right below it; `ladd config show --doc` prints them all, with the types.

    cfg = load_config("configs/toy.toml", overrides=["method.gen_update_interval=4"])
    print(to_toml(cfg))
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ladd.flow import Curriculum

# The choices of each choice field. Loss and Aggregate are the kinds ladd/losses.py implements (KINDS,
# AGGREGATES; tests/test_config.py holds them equal): a Literal has to be spelled out to be a type.
Student = Literal["full", "lora"]
TextCond = Literal["pooled", "clip"]
Loss = Literal["hinge", "nonsaturating"]
Aggregate = Literal["mean_heads", "sum_logits"]
Optimizer = Literal["adamw", "adamw8bit"]
Decay = Literal["none", "linear", "cosine"]
StudentInputs = Literal["interpolate", "simulate"]
AdversarialNoise = Literal["paired", "fresh"]
PairedTarget = Literal["endpoint", "trajectory"]
TrainedTimesteps = Literal["all", "last"]
MixedPrecision = Literal["auto", "bf16", "no"]
OnCollapse = Literal["warn", "stop", "rollback"]
Tracker = Literal["tensorboard", "wandb"]


class ConfigError(ValueError):
    """A config problem, stated in one line the user can act on."""


class Section:
    """Base of the config sections. Construction (from TOML, `--set` or Python alike) checks every
    Literal field against its choices, then runs the section's own `check()`: ranges, one line each.

    Each field's doc is the string literal right below it (litgpt's convention), read back by
    `field_docs` for `ladd config show --doc`.
    """

    def __post_init__(self):
        for key, hint in _hints(type(self)).items():
            choices = literal_choices(hint)
            if choices:
                value = getattr(self, key)
                for v in value if typing.get_origin(hint) is list else [value]:
                    if v not in choices:
                        raise ConfigError(f"{self.where(key)} {v!r} is unknown; choose {_either(choices)}"
                                          f"{_nearest(v, choices) if isinstance(v, str) else ''}")
        self.check()

    def check(self) -> None:
        """Ranges and contradictions inside the section."""

    def where(self, name: str) -> str:
        return f"{_section_name(type(self))}.{name}"

    def at_least(self, low, *names: str) -> None:
        for name in names:
            if getattr(self, name) < low:
                raise ConfigError(f"{self.where(name)} must be >= {low}, got {getattr(self, name)!r}")


@dataclass(kw_only=True)
class ModelConfig(Section):
    """The teacher, the student and the discriminator."""

    pipeline: str = "toy"
    """a ZImagePipeline folder, or "toy": the toy teacher shipped in ladd/toy/assets/toy-zimage"""
    disc_layers: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 25, 29])
    """teacher layers (from 0) whose image-token hidden states feed one disc head each"""
    disc_hidden: int = 256
    """channels of each disc head's conv stack"""
    disc_cond_dim: int = 256
    """width of the disc's timestep and text conditioning"""
    disc_spectral_norm: bool = False
    """spectral norm on the disc heads' convolutions"""
    disc_projection: bool = False
    """add a projection term <features, W·text> to each head's logit (projection discriminator)"""
    text_cond: TextCond = "pooled"
    """the disc's text conditioning: "pooled" caption features, or "clip" (needs clip in the data)"""
    gradient_checkpointing: bool = False
    """recompute the transformer's activations in the backward pass: less memory, more compute"""
    compile: bool = False
    """torch.compile each transformer block (regional; the adapter stays eager): see docs/performance.md"""
    student: Student = "full"
    """"full": a trainable copy of the teacher; "lora": teacher weights + adapters (one copy in memory)"""
    lora_rank: int = 64
    """rank of the LoRA adapters (student = "lora")"""
    lora_alpha: float = 64.0
    """LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_rank"""

    def check(self):
        self.at_least(1, "lora_rank", "disc_cond_dim")
        self.at_least(2, "disc_hidden")  # the second conv has disc_hidden / 2 channels
        if self.lora_alpha <= 0:
            raise ConfigError(f"model.lora_alpha must be > 0, got {self.lora_alpha}")


@dataclass(kw_only=True)
class MethodConfig(Section):
    """The LADD method: update schedule, re-noising, curriculum, losses."""

    gen_update_interval: int = 3
    """disc steps per student update; blog sweeps: 3 wins after the fixes"""
    disc_warmup_steps: int = 0
    """the first optimizer steps train the disc alone (no student update)"""
    renoise_m: float = 1.0
    """logit-normal mean of the re-noising level t̂ (sigmoid(1) ≈ 0.73)"""
    renoise_s: float = 1.0
    """logit-normal std of t̂"""
    student_timesteps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    """the student's training timesteps, decreasing in (0, 1]; 1 = pure noise, where sampling starts"""
    student_timestep_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    """how often each student timestep is drawn after the curriculum warmup; sums to 1"""
    curriculum_warmup_steps: int = 0
    """optimizer steps drawing only the two easiest timesteps"""
    student_inputs: StudentInputs = "interpolate"
    """input at t: "interpolate" (1 − t)·x0 + t·ε (the teacher's state with paired_target "trajectory"); "simulate": the student's own earlier steps from ε (no grad)"""
    adversarial_inputs: StudentInputs = "interpolate"
    """input of the adversarial and score terms at t < 1; "simulate": the student's own earlier steps (paired term: interpolated)"""
    loss: Loss = "hinge"
    """the adversarial loss ("nonsaturating" = the logistic GAN loss)"""
    aggregate: Aggregate = "mean_heads"
    """"mean_heads": per-head losses averaged (LADD paper); "sum_logits": the loss of the summed logit (the blog)"""
    r1_weight: float = 0.0
    """γ; adds γ/2·E‖∇D(real features)‖² to the disc loss when > 0"""
    distill_weight: float = 0.0
    """λ > 0: student inputs use the teacher's own initial noise, + λ·‖x̂0 − x0‖²"""
    adversarial_noise: AdversarialNoise = "paired"
    """with λ > 0, the fake's noise: "paired" (the pair's, one pass) or "fresh" (new ε, a second pass)"""
    distill_timestep_weights: tuple[float, ...] = ()
    """with λ > 0, the paired term's weight at each student timestep (as many as student_timesteps; () = all 1)"""
    paired_target: PairedTarget = "endpoint"
    """with λ > 0: "endpoint" x0 from (1 − t)·x0 + t·ε; "trajectory": each step of the teacher's own path (data from precompute --trajectory)"""
    last_step_rollout: int = 0
    """K > 0, with paired_target "trajectory": the last step starts from the student's own state (its earlier steps from the pair's noise, no grad) and aims at the guided teacher's K Euler steps from there (σ uniform to 0, score_guidance); 0: the teacher's state, aiming at x0"""
    rollout_steps: int = 1
    """with last_step_rollout K: how many of the last student steps start from the student's own state (1 = the last only); each earlier one aims where the guided teacher's K Euler steps take that state to the next timestep"""
    last_step_chain: int = 0
    """with last_step_rollout: how many of the student's own steps make the last step's input; 0 = all (from the pair's noise), k = the last k, from the teacher's state k timesteps before the last (fewer student passes)"""
    adversarial_timesteps: TrainedTimesteps = "all"
    """the rows the adversarial term trains: "all", or "last" (those at the last student timestep; the others detached)"""
    mismatch_weight: float = 0.0
    """w > 0: the disc also learns real latents under another sample's caption as fake, weighted w"""
    score_weight: float = 0.0
    """w > 0: ADD's distillation term, + w·mean((x̂0 − sg(x̂0_T))²), x̂0_T the CFG teacher's denoising of x̂0 re-noised to t_s"""
    score_renoise_m: float = 0.0
    """logit-normal mean of t_s, the score term's re-noising level (sigmoid(0) = 0.5)"""
    score_renoise_s: float = 1.0
    """logit-normal std of t_s"""
    score_guidance: float = 5.0
    """the teacher's CFG scale for x̂0_T, with the data's negative prompt (Z-Image and the toy teacher: 5)"""
    score_timesteps: TrainedTimesteps = "all"
    """the rows the score term trains: "all", or "last" (those at the last student timestep; the others detached)"""
    detail_weight: float = 0.0
    """w > 0, with the paired term: + w·mean over the last step's rows of Σ_b (log E_b(x̂0) − log E_b(x0))², E_b the power in radial frequency bands (ladd/detail.py): the last step's detail energy pulled to the teacher's sample of the same noise, phase-free"""
    adversarial_weight: float = 1.0
    """scale of the student's adversarial loss; 0 with distill_weight > 0 is distillation alone (an ablation)"""
    grad_clip_g: float = 1.0
    """max grad norm of the student (0 = no clipping, norm still measured)"""
    grad_clip_d: float = 1.0
    """max grad norm of the disc (0 = no clipping, norm still measured)"""
    allow_hinge_batch_of_one: bool = False
    """allow hinge with data.batch_per_rank = 1, which saturates to zero gradient (see check_micro_batch)"""

    @property
    def guided_teacher(self) -> bool:
        """Whether a term runs the teacher with CFG (the score term, the last-step rollout): the data's
        negative prompt is then needed."""
        return self.score_weight > 0 or self.last_step_rollout > 0

    @property
    def rollout_timesteps(self) -> tuple[float, ...]:
        """The student timesteps whose rows start from the student's own state (method.last_step_rollout)."""
        return self.student_timesteps[-self.rollout_steps:] if self.last_step_rollout else ()

    def check(self):
        self.student_timesteps = tuple(float(t) for t in self.student_timesteps)
        self.student_timestep_probs = tuple(float(p) for p in self.student_timestep_probs)
        self.distill_timestep_weights = tuple(float(w) for w in self.distill_timestep_weights)
        if self.distill_timestep_weights and (len(self.distill_timestep_weights) != len(self.student_timesteps)
                                              or min(self.distill_timestep_weights) < 0):
            raise ConfigError(f"method.distill_timestep_weights {list(self.distill_timestep_weights)} needs one weight "
                              f">= 0 per student timestep ({len(self.student_timesteps)}), or [] for all 1")
        self.at_least(1, "gen_update_interval")
        self.at_least(0, "disc_warmup_steps", "curriculum_warmup_steps", "r1_weight", "distill_weight",
                      "mismatch_weight", "score_weight", "score_guidance", "detail_weight", "adversarial_weight",
                      "grad_clip_g", "grad_clip_d")
        if self.adversarial_weight == 0 and self.distill_weight == 0 and self.score_weight == 0:
            raise ConfigError("method.adversarial_weight, distill_weight and score_weight are all 0: the student has "
                              "no loss; set one of them above 0")
        if self.detail_weight > 0 and self.distill_weight == 0:
            raise ConfigError("method.detail_weight > 0 compares the student's x̂0 with its pair's teacher latent, "
                              "which needs the paired term: set distill_weight > 0, or detail_weight = 0")
        for name in ("renoise_s", "score_renoise_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"method.{name} must be > 0, got {getattr(self, name)}")
        try:
            self.curriculum()
        except ValueError as e:
            raise ConfigError(f"method: {e}") from None
        self.at_least(0, "last_step_rollout", "last_step_chain")
        self.at_least(1, "rollout_steps")
        if self.last_step_rollout and self.rollout_steps >= len(self.student_timesteps):
            raise ConfigError(f"method.rollout_steps {self.rollout_steps} must be below {len(self.student_timesteps)} "
                              "(the student's steps after the first, whose input is the pair's noise either way)")
        if self.rollout_steps > 1 and self.last_step_chain:
            raise ConfigError("method.last_step_chain > 0 shortens the last step's chain only; with rollout_steps "
                              f"{self.rollout_steps} set last_step_chain = 0, or rollout_steps = 1")
        if self.last_step_chain and not self.last_step_rollout:
            raise ConfigError("method.last_step_chain > 0 shortens the chain of method.last_step_rollout, which is 0; "
                              "set last_step_rollout > 0, or last_step_chain = 0")
        if self.last_step_chain >= len(self.student_timesteps) - 1:
            raise ConfigError(f"method.last_step_chain {self.last_step_chain} must be below "
                              f"{len(self.student_timesteps) - 1} (the steps before the last); 0 runs them all")
        if self.last_step_rollout and (self.paired_target != "trajectory" or self.student_inputs != "interpolate"):
            raise ConfigError("method.last_step_rollout > 0 needs paired_target = 'trajectory' with student_inputs = "
                              "'interpolate' (the earlier steps start from the teacher's states); set those, or "
                              "last_step_rollout = 0")
        if self.paired_target == "trajectory":
            wrong = ["distill_weight = 0"] if self.distill_weight == 0 else []
            wrong += [f"{k} = {getattr(self, k)!r}" for k in ("adversarial_inputs", "adversarial_noise")
                      if getattr(self, k) != MethodConfig.__dataclass_fields__[k].default]
            if wrong:
                raise ConfigError(f"method.paired_target = 'trajectory' cannot run with {', '.join(wrong)}: it is a "
                                  "paired term (distill_weight > 0) whose one student pass starts from the teacher's "
                                  "states or, with student_inputs 'simulate', the student's own (the default "
                                  "adversarial inputs and noise); change those, or set paired_target = 'endpoint'")

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
class OptimConfig(Section):
    """The two optimizers: the student's (_g) and the disc's (_d)."""

    lr_g: float = 5e-6
    """student learning rate"""
    lr_d: float = 1e-5
    """disc learning rate"""
    betas_g: tuple[float, float] = (0.9, 0.999)
    """Adam betas of the student"""
    betas_d: tuple[float, float] = (0.9, 0.999)
    """Adam betas of the disc"""
    weight_decay_g: float = 0.0
    """decoupled (AdamW) weight decay of the student"""
    weight_decay_d: float = 0.0
    """decoupled (AdamW) weight decay of the disc"""
    warmup_steps: int = 0
    """linear LR warmup, both optimizers"""
    decay: Decay = "none"
    """LR decay after warmup, both optimizers, down to lr_min_ratio·lr at the last step"""
    lr_min_ratio: float = 0.0
    """the learning rates at the last step, as a fraction of lr_g / lr_d (with decay)"""
    optimizer: Optimizer = "adamw"
    """both optimizers; "adamw8bit" needs bitsandbytes (CUDA only)"""

    def check(self):
        self.betas_g, self.betas_d = tuple(self.betas_g), tuple(self.betas_d)
        if self.lr_g <= 0 or self.lr_d <= 0:
            raise ConfigError(f"optim.lr_g and optim.lr_d must be > 0, got {self.lr_g} and {self.lr_d}")
        for name in ("betas_g", "betas_d"):
            betas = getattr(self, name)
            if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
                raise ConfigError(f"optim.{name} must be two numbers in [0, 1), got {list(betas)}")
        self.at_least(0, "weight_decay_g", "weight_decay_d", "warmup_steps")
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
class DataConfig(Section):
    """The precomputed training data and how it is batched."""

    path: str = ""
    """a `ladd precompute` output folder"""
    buckets: str = ""
    """the sizes the data must hold: a named set (zimage-1024, zimage-512, toy) or WxH,...; "" = the data's own"""
    batch_per_rank: int = 2
    """micro-batch per rank per forward (hinge needs >= 2)"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    text_dropout: float = 0.0
    """fraction of captions dropped to "" (features and disc conditioning together)"""
    seed: int = 0
    """shuffle seed"""

    def check(self):
        self.at_least(1, "batch_per_rank", "grad_accum")
        if not 0 <= self.text_dropout < 1:
            raise ConfigError(f"data.text_dropout must be in [0, 1), got {self.text_dropout}")


@dataclass(kw_only=True)
class TrainConfig(Section):
    """The run: its folder, length, precision, EMA and checkpoints."""

    out: str = "runs/ladd"
    """run folder: config, metrics.jsonl, checkpoints/, validation/"""
    steps: int = 1000
    """optimizer steps"""
    seed: int = 0
    """seed of the disc's init and of the training draws (noise, timesteps, re-noising)"""
    mixed_precision: MixedPrecision = "auto"
    """"auto": bf16 on GPU, fp32 on CPU; "no": fp32"""
    ema_decay: float = 0.0
    """decay of an EMA of the student's weights (0 = no EMA)"""
    checkpoint_every: int = 500
    """optimizer steps between checkpoints (the last step is always saved)"""
    keep_last: int = 2
    """complete checkpoints kept; older ones are deleted"""
    teacher_sharded: bool = False
    """FSDP-shard the frozen teacher too (smaller GPUs)"""
    max_minutes: float = 0.0
    """wall-clock budget: past it the run checkpoints and exits 0 (0 = none); leave a step and a save of margin"""
    collective_timeout_s: float = 600.0
    """seconds a collective waits for the other ranks before failing (a hung rank; NCCL's default is 30 min)"""

    def check(self):
        self.at_least(0, "steps", "max_minutes")
        self.at_least(1, "checkpoint_every", "keep_last", "collective_timeout_s")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(kw_only=True)
class ValidationConfig(Section):
    """Validation images on fixed prompts and noise, from step 0."""

    every: int = 250
    """steps between validations; step 0 and the last step always; 0 = only step 0 and the end"""
    num_prompts: int = 8
    """fixed prompts taken from the data's first samples"""
    seed: int = 1234
    """validation noise seed (prompt i uses seed + i)"""

    def check(self):
        if self.every < 0:
            raise ConfigError(f"validation.every must be >= 0 (0: only step 0 and the end), got {self.every}")
        self.at_least(1, "num_prompts")


@dataclass(kw_only=True)
class HealthConfig(Section):
    """The health guards: non-finite losses and collapse (docs/training.md)."""

    nan_patience: int = 5
    """consecutive non-finite losses before the run stops"""
    collapse_window: int = 100
    """steps over which the logit gap is averaged"""
    collapse_gap: float = 0.05
    """|mean logit gap| below this over the window ..."""
    collapse_d_loss: float = 1.8
    """... while the mean d_loss stays above this, and ..."""
    collapse_drift: float = 1.3
    """... a validation at most a window old (run at once if none) has drift above this -> collapse (0: no wait)"""
    diversity_fraction: float = 0.2
    """validation images closer than this × the teacher's spread -> collapse"""
    drift_factor: float = 2.2
    """validation latent MSE to the teacher above this × the untrained student's -> collapse"""
    on_collapse: OnCollapse = "warn"
    """what a detected collapse does: warn, stop the run, or roll back to the latest checkpoint"""
    rollback_lr_d_factor: float = 0.5
    """a rollback multiplies lr_d by this"""

    def check(self):
        self.at_least(1, "nan_patience", "collapse_window")
        self.at_least(0, "collapse_gap", "diversity_fraction")
        if self.drift_factor <= 1:
            raise ConfigError(f"health.drift_factor must be > 1 (a multiple of the untrained student's MSE), got {self.drift_factor}")
        if self.collapse_drift < 0:
            raise ConfigError(f"health.collapse_drift must be >= 0 (0: the logit-gap rule never waits for validation), got {self.collapse_drift}")
        if not 0 < self.rollback_lr_d_factor <= 1:
            raise ConfigError(f"health.rollback_lr_d_factor must be in (0, 1], got {self.rollback_lr_d_factor}")


@dataclass(kw_only=True)
class LogConfig(Section):
    """Metrics: metrics.jsonl in the run folder, and trackers."""

    trackers: list[Tracker] = field(default_factory=list)
    """also log to these (each needs its package)"""
    every: int = 1
    """optimizer steps between metrics rows"""
    wandb_project: str = "ladd"
    """the wandb project of the run"""

    def check(self):
        self.at_least(1, "every")


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


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


@functools.cache
def _section_name(cls: type) -> str:
    return next(name for name, t in _section_types().items() if t is cls)


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def literal_choices(hint) -> tuple | None:
    """The choices of a Literal field, or of a list of Literals; None for any other type."""
    if typing.get_origin(hint) is list:
        hint = (typing.get_args(hint) or (None,))[0]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's doc: the string literal right after its line in the class body (as litgpt and
    jsonargparse read them); read from this module's source, so the docs cannot drift from the fields."""
    tree = ast.parse(Path(__file__).read_text())
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value.strip()
    return docs


def _either(choices) -> str:
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


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
    return value  # Literals (Section.__post_init__), unions and nested types: checked at construction


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


def type_name(hint) -> str:
    """A field's type as `ladd config show --doc` prints it: `int`, `list[int]`, `"full" | "lora"`."""
    choices = literal_choices(hint)
    if choices:
        either = " | ".join(json.dumps(c) for c in choices)
        return f"list of {either}" if typing.get_origin(hint) is list else either
    return hint.__name__ if isinstance(hint, type) else str(hint)


def to_toml(cfg: Config, doc: bool = False) -> str:
    """The resolved config as TOML; `doc` puts each section's and key's doc [and type] in a comment
    above it, so the output is still a config to save and edit."""
    lines = ["# every key with its doc [type] and resolved value (`ladd config show --doc`)", ""] if doc else []
    types_ = _section_types()
    for section, values in to_dict(cfg).items():
        cls = types_[section]
        if doc:
            lines.append(f"# {cls.__doc__.strip().splitlines()[0]}")
        lines.append(f"[{section}]")
        for k, v in values.items():
            if doc:
                lines.append(f"# {field_docs(cls)[k]}  [{type_name(_hints(cls)[k])}]")
            lines.append(f"{k} = {_toml_value(v)}")
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
