"""One LADD step: the heart of `ladd`, to be read next to the blog's pseudo-code.

    OFFLINE   x0 = teacher(prompt, 50 steps, CFG 5, output_type="latent")       (ladd precompute)

    ONLINE, every step, per sample:
      1. t ~ curriculum;  x_t = (1 − t)·x0 + t·ε                 student input, never pure noise at t < 1
         (method.student_inputs "simulate": x_t from the student's own Euler steps from ε, as at inference)
      2. v = student(x_t, t, c);  x̂0 = x_t − t·v                 velocity -> denoised latent
      3. t̂ ~ logit-normal(m, s), shared by the pair
         fake = (1 − t̂)·x̂0 + t̂·ε1;  real = (1 − t̂)·x0 + t̂·ε2    real = re-noised *teacher latent*, not noise
      4. F_real = teacher_taps(real, t̂) (no grad);  F_fake = teacher_taps(fake, t̂)
      5. D-step (every step):   d_loss(disc(F_real), disc(F_fake.detach())) -> disc update
         G-step (every `gen_update_interval` steps, before the D-step): F_fake keeps a live graph through
         the frozen teacher (weights requires_grad False, but not under no_grad); g_loss(disc(F_fake))
         -> student update. The same F_fake (detached) then feeds the D-step: one fake teacher pass.

    PAIRED DISTILLATION (method.distill_weight λ > 0, not in the blog): ε in step 1 is x0's own teacher
    noise (the precompute's seed rule) and the G-step loss is g_loss + λ·mean((x̂0 − x0)²) (each row's error
    × its timestep's method.distill_timestep_weights, when set). With
    method.adversarial_noise "fresh", only the paired term uses that noise: the fake comes from a second
    student pass on fresh ε, so the disc judges the student on noises no pair holds.

    TRAJECTORY WINDOWS (method.paired_target "trajectory", with the paired term): the student at t_k
    starts from the teacher's own state on its 50-step path at t_k (ε at the first timestep; stored by
    `ladd precompute --trajectory`), and the paired target is the x0 whose Euler step from there lands
    on the teacher's state at t_{k+1} (x0 itself at the last step): each of the 4 steps learns its own
    stretch of the teacher's path, where the endpoint target asks every step for the straight line to
    x0 that the teacher's path is not. The adversarial and score terms judge the same pass.
    method.adversarial_timesteps / score_timesteps "last": that term trains only the rows at the last
    timestep, and the teacher's passes it needs run on those rows only. method.last_step_rollout K: the
    last step starts from the student's own state (its earlier steps, no grad) instead of the teacher's,
    and aims at where the guided teacher's K Euler steps take that state (with method.rollout_steps n,
    the last n steps do, each towards the teacher's next timestep); with student_inputs
    "simulate", every step starts from the student's own state and aims back at the teacher's next one.

    ON-POLICY INPUTS (method.adversarial_inputs "simulate", with the paired term): the samples at t < 1
    are run once more from where the student's own earlier Euler steps from their noise reach, as
    4-step inference hands them; that x̂0 is the fake (and the score term's), so the later steps are
    judged on the student's own blends. The paired term keeps the interpolated pass.

    MISMATCHED CAPTIONS (method.mismatch_weight w > 0, as SANA-Sprint and AMD's Nitro): the D-step also
    scores each real latent's features under the next sample's caption as fake, weighted w, so the
    disc has to read the prompt and the student's gradient carries it.

    SCORE DISTILLATION (method.score_weight w > 0, ADD's distillation term): the G-step also pulls x̂0
    towards the guided teacher's own reading of it, + w·mean((x̂0 − sg(x̂0_T))²) with x̂0_T the teacher's
    CFG denoising of x̂0 re-noised to t_s (fresh noise): a prompt-following pull on any sample the
    student makes, where the paired term knows only its pairs.

    DETAIL ENERGY (method.detail_weight w > 0, with the paired term): + w·mean over the last step's rows
    of Σ_b (log E_b(x̂0) − log E_b(x0))², E_b the power of radial frequency band b (ladd/detail.py): the
    last step, which blurs what it cannot place, is asked for the teacher's amount of detail, phase-free.

`generator_step` and `discriminator_step` each own their optimizer, zero_grad, clipping and
requires_grad handling; `ladd_step` composes them. A list of micro-batches is one optimizer step
(gradient accumulation: each micro-batch's loss is scaled by 1/n and back-propagated at once, so only
one micro-batch's graph is alive at a time).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ladd import losses
from ladd.config import MethodConfig
from ladd.detail import detail_loss
from ladd.distributed import set_gradient_sync
from ladd.flow import interpolate, logit_normal, x0_from_velocity
from ladd.models.discriminator import Discriminator
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import guided_velocity


@dataclass
class Batch:
    """One micro-batch of precomputed teacher data."""

    x0: Tensor  # (B, C, H, W) teacher latents (50 steps, CFG), float32
    cap_feats: list[Tensor]  # B × (L_i, cap_feat_dim) caption features
    text_cond: Tensor  # (B, text_dim) disc conditioning: pooled caption features or CLIP
    pair_eps: Tensor | None = None  # (B, C, H, W) the teacher's initial noise of each x0 (distillation)
    neg_cap: Tensor | None = None  # (L, cap_feat_dim) the data's negative prompt (method.score_weight)
    states: Tensor | None = None  # (B, K, C, H, W) the teacher's path at student_timesteps[1:] (paired_target)

    def __len__(self) -> int:
        return self.x0.shape[0]


@dataclass
class LaddModels:
    student: ZImageAdapter  # trainable, initialised from the teacher
    teacher: ZImageAdapter  # frozen: requires_grad False everywhere, eval mode
    disc: Discriminator

    def __post_init__(self):
        # Freeze the teacher's own weights. A LoRA student shares them (the teacher is the same
        # module with adapters off), so leave the student's trainable adapters alone.
        shared = {id(p) for p in self.student.parameters() if p.requires_grad}
        for p in self.teacher.parameters():
            if id(p) not in shared:
                p.requires_grad_(False)
        self.teacher.eval()


@dataclass
class DiscInputs:
    """What the disc sees for one micro-batch: teacher taps of the re-noised real and fake latents."""

    real: dict[int, Tensor]
    fake: dict[int, Tensor]  # detached from the student
    t_hat: Tensor  # (B,)
    text_cond: Tensor


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily stop a module's parameters from collecting gradients.

    Gradients still flow *through* it to its inputs (autograd only skips the weight grads), which is
    what the G-step needs from the disc. Restores each parameter's previous flag.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def apply_update(params: Sequence[Tensor], opt: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip (if max_norm > 0) and step; return the pre-clip global grad norm.

    A non-finite norm skips the update: one bad batch must not write NaN into the weights. The norm
    is global (reduced over ranks under FSDP), so every rank skips alike.
    """
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
    if math.isfinite(norm):
        opt.step()
    # Free the gradients now: a full 6B student's fp32 grads are 24.6 GB, and D-only steps need none.
    opt.zero_grad(set_to_none=True)
    return norm


def draw_noise(batch: Batch, step: int, cfg: MethodConfig, rng: torch.Generator):
    """All randomness of one micro-batch, in a fixed order (exact resume relies on it).

    Returns (t, ε, t̂, ε1, ε2, ε_pair): ε is fresh noise, ε_pair each x0's own teacher noise when the
    paired term is on (else None). `adversarial_eps` picks which of the two the adversarial term uses.
    """
    x0 = batch.x0
    B, device = len(batch), x0.device
    t = cfg.curriculum().sample(step, B, generator=rng, device=device)
    eps = torch.randn(x0.shape, generator=rng, device=device)
    t_hat = logit_normal(B, cfg.renoise_m, cfg.renoise_s, generator=rng, device=device)
    eps1 = torch.randn(x0.shape, generator=rng, device=device)
    eps2 = torch.randn(x0.shape, generator=rng, device=device)
    pair = None
    if cfg.distill_weight > 0:
        if batch.pair_eps is None:
            raise ValueError("method.distill_weight > 0 needs each sample's teacher noise (Batch.pair_eps)")
        pair = batch.pair_eps  # ε is drawn all the same, so the random stream does not depend on it
    return t, eps, t_hat, eps1, eps2, pair


def adversarial_eps(eps: Tensor, pair: Tensor | None, cfg: MethodConfig) -> Tensor:
    """The student's noise for the fake the disc judges: the pair's unless `adversarial_noise` is "fresh"."""
    return pair if pair is not None and cfg.adversarial_noise == "paired" else eps


def on_policy(
    student: ZImageAdapter, batch: Batch, t: Tensor, eps: Tensor, x0_hat: Tensor, cfg: MethodConfig
) -> Tensor:
    """x̂0 with the rows at t < timesteps[0] recomputed from the student's own earlier Euler steps from ε
    (`method.adversarial_inputs = "simulate"`): what 4-step inference hands each later step, errors
    included, so the adversarial and score terms judge the later steps on it; the paired term keeps
    the interpolated pass, whose target x0 is reachable only from there.

    At the first timestep both inputs are ε, so those rows keep the first pass. One pass on the other
    rows; with none (all at the first timestep), on row 0, whose value it reproduces: every rank makes
    the same calls (FSDP's collectives need it).
    """
    if cfg.adversarial_inputs != "simulate" or cfg.student_inputs == "simulate":
        return x0_hat
    later = (t < cfg.student_timesteps[0]).nonzero().flatten()
    rows = later if len(later) else torch.zeros(1, dtype=torch.long, device=t.device)
    caps = [batch.cap_feats[i] for i in rows.tolist()]
    x_t = simulated_input(student, caps, t[rows], eps[rows], cfg.student_timesteps)
    out = x0_hat.clone()
    out[rows] = x0_from_velocity(x_t, student(x_t, t[rows], caps).velocity, t[rows]).to(out.dtype)
    return out


def student_x0(student: ZImageAdapter, batch: Batch, t: Tensor, eps: Tensor, cfg: MethodConfig) -> tuple[Tensor, Tensor]:
    """Steps 1-2: x_t = (1 − t)·x0 + t·ε (or the simulated x_t, or the teacher's state at t), v =
    student(x_t, t), x̂0 = x_t − t·v. Returns (x_t, x̂0)."""
    if cfg.student_inputs == "simulate":
        x_t = simulated_input(student, batch.cap_feats, t, eps, cfg.student_timesteps)
    elif cfg.paired_target == "trajectory":
        x_t = trajectory_window(batch, t, eps, cfg.student_timesteps)[0]
        if cfg.last_step_rollout:
            x_t = own_states(student, batch, t, eps, x_t, cfg)
    else:
        x_t = interpolate(batch.x0, eps, t)
    v = student(x_t, t, batch.cap_feats).velocity
    return x_t, x0_from_velocity(x_t, v, t)


def trajectory_window(batch: Batch, t: Tensor, eps: Tensor, timesteps: Sequence[float],
                      start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x_t, target) of the teacher's path for each row (method.paired_target "trajectory"): x_t is the
    teacher's state at the row's t_k (ε, the pair's noise, at the first timestep), and the target is
    the x0 whose Euler step from x_t lands on the teacher's state at t_{k+1}:
    x_t − t_k·(x_t − x_{k+1}) / (t_k − t_{k+1}); at the last timestep (t_{k+1} = 0) that is x0 itself.
    With `start` (the student's own state at t_k, method.student_inputs "simulate"), the target is the
    x0 whose Euler step from `start` lands on the teacher's next state: the way back to its path."""
    if batch.states is None or batch.states.shape[1] != len(timesteps) - 1:
        raise ValueError(f"method.paired_target 'trajectory' needs the teacher's states at {list(timesteps[1:])} "
                         "(Batch.states, one per timestep after the first)")
    at = [at_timestep(t, now) for now in timesteps]
    if not bool(torch.stack(at).any(0).all()):
        raise ValueError(f"student timesteps {t.tolist()} are not all among {list(timesteps)}")
    path = [eps, *batch.states.unbind(1), batch.x0]
    x_t, target = torch.empty_like(batch.x0), torch.empty_like(batch.x0)
    for k, (now, rows) in enumerate(zip(timesteps, at)):
        here, nxt = path[k][rows].to(x_t.dtype), path[k + 1][rows].to(x_t.dtype)
        x_t[rows] = here
        if start is not None:
            here = start[rows].to(x_t.dtype)
        last = k == len(timesteps) - 1
        target[rows] = nxt if last else here - now * (here - nxt) / (now - timesteps[k + 1])
    return x_t, target


def own_states(student: ZImageAdapter, batch: Batch, t: Tensor, eps: Tensor, x_t: Tensor,
               cfg: MethodConfig) -> Tensor:
    """x_t with the rows at the rollout's timesteps (the last `method.rollout_steps`) replaced by the
    student's own state there: its earlier Euler steps from ε (no grad; method.last_step_rollout), or
    with method.last_step_chain k its last k steps from the teacher's state k timesteps earlier. The
    chain runs on those rows only (row 0 if none, left as it was: every rank makes the same calls)."""
    rows, keep = rollout_rows(t, cfg)
    caps = [batch.cap_feats[i] for i in rows.tolist()]
    k = cfg.last_step_chain
    start = eps[rows] if k == 0 else batch.states[rows, -1 - k].to(eps.dtype)  # states[:, j]: the teacher's at timesteps[j + 1]
    timesteps = cfg.student_timesteps[-1 - k:] if k else cfg.student_timesteps
    return on_rows(x_t, rows, simulated_input(student, caps, t[rows], start, timesteps), keep)


@torch.no_grad()
def rollout_target(teacher: ZImageAdapter, batch: Batch, t: Tensor, x_t: Tensor, target: Tensor,
                   cfg: MethodConfig) -> Tensor:
    """`target` with the rows at the rollout's timesteps replaced: the guided teacher's `last_step_rollout`
    Euler steps take each row's input x_t from its t_k to t_{k+1} (σ uniform; 0 after the last step) to
    y, and the target is the x0 whose Euler step from x_t lands on y (y itself at the last step). On
    row 0 if no row is at those timesteps, left as it was."""
    if batch.neg_cap is None:
        raise ValueError("method.last_step_rollout > 0 needs the negative prompt's caption features (Batch.neg_cap)")
    rows, keep = rollout_rows(t, cfg)
    caps, negs = [batch.cap_feats[i] for i in rows.tolist()], [batch.neg_cap] * len(rows)
    ts, K = cfg.student_timesteps, cfg.last_step_rollout
    sigmas = t.new_zeros(len(rows), K + 1)  # each row's σ from its timestep to the next
    for k, now in enumerate(ts):
        sigmas[at_timestep(t[rows], now)] = torch.linspace(now, ts[k + 1] if k + 1 < len(ts) else 0.0, K + 1).to(t)
    start = x_t[rows].float()
    y = start
    for i in range(K):
        v = guided_velocity(teacher, y, sigmas[:, i], caps, negs, cfg.score_guidance)
        y = y + (sigmas[:, i + 1] - sigmas[:, i]).view(-1, 1, 1, 1) * v.float()
    now, nxt = sigmas[:, 0].view(-1, 1, 1, 1), sigmas[:, -1].view(-1, 1, 1, 1)
    x0 = torch.where(nxt > 0, start - now * (start - y) / (now - nxt), y)
    return on_rows(target, rows, x0, keep)


def rollout_rows(t: Tensor, cfg: MethodConfig) -> tuple[Tensor, Tensor]:
    """(rows, keep): the indices of the rows at the rollout's timesteps (row 0 if none: every rank makes
    the same calls, as FSDP's collectives need) and, for each of them, whether it really is one."""
    on = torch.stack([at_timestep(t, now) for now in cfg.rollout_timesteps]).any(0)
    rows = on.nonzero().flatten() if bool(on.any()) else torch.zeros(1, dtype=torch.long, device=t.device)
    return rows, on[rows]


def on_rows(x: Tensor, rows: Tensor, new: Tensor, keep: Tensor) -> Tensor:
    """x with x[rows] set to `new` where `keep` (a stand-in row keeps its value)."""
    out = x.clone()
    out[rows] = torch.where(keep.view(-1, *[1] * (x.ndim - 1)), new.to(x.dtype), x[rows])
    return out


def distill_weights(t: Tensor, cfg: MethodConfig) -> Tensor:
    """(B,) the paired term's weight of each row: method.distill_timestep_weights at its timestep (1 if unset)."""
    if not cfg.distill_timestep_weights:
        return torch.ones_like(t)
    out = torch.zeros_like(t)
    for now, w in zip(cfg.student_timesteps, cfg.distill_timestep_weights):
        out[at_timestep(t, now)] = w
    return out


def trained_rows(x0_hat: Tensor, t: Tensor, which: str, cfg: MethodConfig) -> Tensor:
    """x̂0 as a term sees it: with `which` "last" (method.adversarial_timesteps, score_timesteps) the rows
    at other timesteps are detached (their values stay; the term trains the last step only)."""
    if which == "all":
        return x0_hat
    return torch.where(at_last(t, cfg).view(-1, *[1] * (x0_hat.ndim - 1)), x0_hat, x0_hat.detach())


def at_last(t: Tensor, cfg: MethodConfig) -> Tensor:
    """(B,) bool: the rows at the student's last timestep."""
    return at_timestep(t, cfg.student_timesteps[-1])


def at_timestep(t: Tensor, now: float) -> Tensor:
    """(B,) bool: the rows at student timestep `now`."""
    return torch.isclose(t, torch.tensor(now, dtype=t.dtype, device=t.device))


def term_rows(t: Tensor, which: str, cfg: MethodConfig) -> tuple[Tensor, Tensor]:
    """(rows, others): the indices of the rows whose teacher pass a term back-propagates through (all of
    them with `which` "all", those at the last timestep with "last") and of the rest, which need no
    graph. With no row at the last timestep, row 0 all the same (`trained_rows` gives it no gradient):
    every rank makes the same calls, as FSDP's collectives need."""
    if which == "all":
        return torch.arange(len(t), device=t.device), t.new_zeros(0, dtype=torch.long)
    last = at_last(t, cfg)
    if not bool(last.any()):
        last = torch.arange(len(t), device=t.device) == 0
    return last.nonzero().flatten(), (~last).nonzero().flatten()


@torch.no_grad()
def simulated_input(student: ZImageAdapter, cap_feats, t: Tensor, eps: Tensor, timesteps: Sequence[float]) -> Tensor:
    """x_t as few-step inference reaches it: x = ε at timesteps[0], then Euler steps
    x ← x + (t_{j+1} − t_j)·student(x, t_j) (no grad); each sample keeps the state at its own t.

    Trains each later step on what the earlier ones really hand it (their errors included) instead of
    the ideal (1 − t)·x0 + t·ε. Every sample runs the whole chain, len(timesteps) − 1 forwards: the same
    number on every rank, as FSDP's collectives need.
    """
    out, x = eps.clone(), eps
    for now, nxt in zip(timesteps[:-1], timesteps[1:]):
        v = student(x, torch.full_like(t, now), cap_feats).velocity
        x = x + (nxt - now) * v.float()
        here = at_timestep(t, nxt)
        out[here] = x[here].to(out.dtype)
    return out


def score_target(teacher: ZImageAdapter, x0_hat: Tensor, batch: Batch, cfg: MethodConfig, rng,
                 rows: Tensor | None = None) -> Tensor:
    """ADD's distillation target: x̂0 (detached) re-noised to t_s ~ logit-normal(score_renoise_m, _s) with
    fresh ε_s, and denoised by the teacher with CFG: x̂0_T = x_s − t_s·v_guided(x_s, t_s). No graph.
    With `rows`, for those rows only (the draws are made for every row all the same)."""
    if batch.neg_cap is None:
        raise ValueError("method.score_weight > 0 needs the negative prompt's caption features (Batch.neg_cap)")
    B, device = len(batch), x0_hat.device
    t_s = logit_normal(B, cfg.score_renoise_m, cfg.score_renoise_s, generator=rng, device=device)
    eps_s = torch.randn(x0_hat.shape, generator=rng, device=device)
    caps = batch.cap_feats
    if rows is not None:
        x0_hat, t_s, eps_s, caps = x0_hat[rows], t_s[rows], eps_s[rows], [caps[i] for i in rows.tolist()]
    with torch.no_grad():
        x_s = interpolate(x0_hat.detach().float(), eps_s, t_s)
        v = guided_velocity(teacher, x_s, t_s, caps, [batch.neg_cap] * len(caps), cfg.score_guidance)
        return x0_from_velocity(x_s, v.float(), t_s)


def teacher_taps(teacher: ZImageAdapter, x: Tensor, t_hat: Tensor, cap_feats, taps) -> dict[int, Tensor]:
    """Teacher hidden states at the disc's layers; blocks after the deepest tap are skipped."""
    return teacher(x, t_hat, cap_feats, taps=taps, velocity=False).feats


def fake_teacher_taps(
    teacher: ZImageAdapter, batch: Batch, real: Tensor, fake: Tensor, t_hat: Tensor, rows: tuple[Tensor, Tensor], taps
) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """The G-step's teacher taps: (real, fake). The fake rows in `rows[0]` keep a live graph (the term's
    gradient goes through them); the real ones and the other fakes share one pass without a graph."""
    live, quiet = rows
    caps = batch.cap_feats
    B = len(batch)
    with torch.no_grad():
        calm = teacher_taps(teacher, torch.cat([real, fake[quiet]]), torch.cat([t_hat, t_hat[quiet]]),
                            caps + [caps[i] for i in quiet.tolist()], taps)
    hot = teacher_taps(teacher, fake[live], t_hat[live], [caps[i] for i in live.tolist()], taps)  # live graph
    real_feats = {k: f[:B] for k, f in calm.items()}
    if not len(quiet):
        return real_feats, hot
    order = torch.cat([live, quiet]).argsort()
    return real_feats, {k: torch.cat([hot[k], calm[k][B:]])[order] for k in hot}


def disc_inputs_no_grad(models: LaddModels, batch: Batch, step: int, cfg: MethodConfig, rng) -> DiscInputs:
    """Steps 1-4 for a D-only step: no graph anywhere; real and fake share one teacher batch."""
    t, eps, t_hat, eps1, eps2, pair = draw_noise(batch, step, cfg, rng)
    with torch.no_grad():
        adv_eps = adversarial_eps(eps, pair, cfg)
        x0_hat = on_policy(models.student, batch, t, adv_eps, student_x0(models.student, batch, t, adv_eps, cfg)[1], cfg)
        fake = interpolate(x0_hat, eps1, t_hat)
        real = interpolate(batch.x0, eps2, t_hat)
        both = teacher_taps(
            models.teacher,
            torch.cat([real, fake]),
            torch.cat([t_hat, t_hat]),
            batch.cap_feats + batch.cap_feats,
            models.disc.layers,
        )
    B = len(batch)
    return DiscInputs(
        real={k: f[:B] for k, f in both.items()},
        fake={k: f[B:] for k, f in both.items()},
        t_hat=t_hat,
        text_cond=batch.text_cond,
    )


def generator_step(
    models: LaddModels,
    opt_g: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    step: int,
    cfg: MethodConfig,
    rng: torch.Generator,
) -> tuple[dict[str, float], list[DiscInputs]]:
    """Update the student to fool the disc; return metrics and the (detached) inputs for the D-step.

    The gradient path is student -> x̂0 -> fake -> frozen teacher (live graph) -> disc (frozen for
    this step, so it collects no gradient) -> g_loss.
    """
    student, teacher, disc = models.student, models.teacher, models.disc
    opt_g.zero_grad(set_to_none=True)
    n = len(micro_batches)
    out: list[DiscInputs] = []
    t_total, distill_total, score_total, detail_total = 0.0, 0.0, 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        set_gradient_sync(student, i == n - 1)  # reduce gradients once, after the last micro-batch
        t, eps, t_hat, eps1, eps2, pair = draw_noise(batch, step, cfg, rng)
        adv_eps = adversarial_eps(eps, pair, cfg)
        x_t, x0_hat = student_x0(student, batch, t, adv_eps, cfg)
        # The paired term's x̂0: the same pass, or its own one when the adversarial noise is fresh.
        x0_pair = x0_hat if pair is None or adv_eps is pair else student_x0(student, batch, t, pair, cfg)[1]
        x0_hat = on_policy(student, batch, t, adv_eps, x0_hat, cfg)  # the adversarial and score terms' x̂0
        fake = interpolate(trained_rows(x0_hat, t, cfg.adversarial_timesteps, cfg), eps1, t_hat)
        real_feats, fake_feats = fake_teacher_taps(teacher, batch, interpolate(batch.x0, eps2, t_hat), fake, t_hat,
                                                   term_rows(t, cfg.adversarial_timesteps, cfg), disc.layers)
        with frozen(disc):
            fake_logits = disc(fake_feats, t_hat, batch.text_cond)
            loss = cfg.adversarial_weight * losses.g_loss(fake_logits, cfg.loss, cfg.aggregate)  # × 1.0 is exact
            if cfg.score_weight > 0:
                # The teacher's guided pass on the rows the term trains only; the loss keeps the
                # normalisation over the whole batch, so the gradient is the same as over every row.
                rows, _ = term_rows(t, cfg.score_timesteps, cfg)
                x0_score = trained_rows(x0_hat, t, cfg.score_timesteps, cfg)
                sq = (x0_score[rows] - score_target(teacher, x0_score, batch, cfg, rng, rows)).square()
                if cfg.score_timesteps == "last":  # the other rows count zero (row 0 runs on every rank)
                    sq = sq * at_last(t, cfg)[rows].view(-1, *[1] * (sq.ndim - 1))
                score = sq.sum() / x0_hat.numel()
                loss = loss + cfg.score_weight * score
                score_total += score.item() / n
            if cfg.distill_weight > 0:
                target = trajectory_window(batch, t, pair, cfg.student_timesteps, start=x_t)[1] \
                    if cfg.paired_target == "trajectory" else batch.x0
                if cfg.last_step_rollout:
                    target = rollout_target(teacher, batch, t, x_t, target, cfg)
                distill = (distill_weights(t, cfg).view(-1, *[1] * (target.ndim - 1))
                           * (x0_pair - target).square()).mean()
                loss = loss + cfg.distill_weight * distill
                distill_total += distill.item() / n
                if cfg.detail_weight > 0:  # the last step's rows; normalised over the whole batch
                    detail = (detail_loss(x0_pair, batch.x0) * at_last(t, cfg)).mean()
                    loss = loss + cfg.detail_weight * detail
                    detail_total += detail.item() / n
            (loss / n).backward()
        t_total += t.mean().item() / n
        out.append(DiscInputs(real_feats, {k: f.detach() for k, f in fake_feats.items()}, t_hat, batch.text_cond))
    grad_norm = apply_update(trainable(student), opt_g, cfg.grad_clip_g)
    # g_loss itself is reported by the D-step, from the same fake logits under the same disc.
    metrics = {"student_grad_norm": grad_norm, "t_mean": t_total}
    if cfg.distill_weight > 0:
        metrics["distill_loss"] = distill_total
    if cfg.score_weight > 0:
        metrics["score_loss"] = score_total
    if cfg.detail_weight > 0:
        metrics["detail_loss"] = detail_total
    return metrics, out


def mismatch_loss(disc: Discriminator, x: DiscInputs, cfg: MethodConfig) -> tuple[Tensor, float]:
    """The fake half of the disc loss on real latents judged under the next sample's caption
    (text_cond rolled by one), and the disc's accuracy on them (logit sum < 0).

    Rows whose rolled caption equals their own carry no weight. All rows run through the disc all the
    same, so every rank makes the same calls whatever its captions (FSDP's collectives need it).
    """
    other = x.text_cond.roll(1, dims=0)
    differs = ((other - x.text_cond).abs().flatten(1).amax(dim=1) > 0).float()
    logits = disc(x.real, x.t_hat, other)  # x.real: teacher taps made without a graph
    per_sample = losses.fake_side_per_sample(logits, cfg.loss, cfg.aggregate)
    count = differs.sum().clamp(min=1)
    accuracy = float(((logits.detach().sum(dim=1) < 0).float() * differs).sum() / count)
    return (per_sample * differs).sum() / count, accuracy


def discriminator_step(
    disc: Discriminator, opt_d: torch.optim.Optimizer, inputs: Sequence[DiscInputs], cfg: MethodConfig
) -> dict[str, float]:
    """Update the disc to tell re-noised teacher latents (real) from re-noised student ones (fake)."""
    opt_d.zero_grad(set_to_none=True)
    n = len(inputs)
    reals, fakes, d_total, r1_total, mis_total, mis_acc_total = [], [], 0.0, 0.0, 0.0, 0.0
    for i, x in enumerate(inputs):
        set_gradient_sync(disc, i == n - 1)
        real = x.real
        if cfg.r1_weight > 0:
            # R1 on exactly what the heads read: the re-noised real teacher features.
            real = {k: f.detach().requires_grad_(True) for k, f in real.items()}
        real_logits = disc(real, x.t_hat, x.text_cond)
        fake_logits = disc(x.fake, x.t_hat, x.text_cond)
        d_loss = losses.d_loss(real_logits, fake_logits, cfg.loss, cfg.aggregate)
        loss = d_loss
        if cfg.mismatch_weight > 0:
            mis_loss, mis_acc = mismatch_loss(disc, x, cfg)
            loss = loss + cfg.mismatch_weight * mis_loss
            mis_total += mis_loss.item() / n
            mis_acc_total += mis_acc / n
        if cfg.r1_weight > 0:
            r1 = losses.r1_penalty(real_logits.sum(), list(real.values()))
            loss = loss + cfg.r1_weight / 2 * r1
            r1_total += r1.item() / n
        (loss / n).backward()
        d_total += d_loss.item() / n
        reals.append(real_logits.detach())
        fakes.append(fake_logits.detach())
    grad_norm = apply_update(trainable(disc), opt_d, cfg.grad_clip_d)
    real_logits, fake_logits = torch.cat(reals), torch.cat(fakes)
    metrics = losses.disc_metrics(real_logits, fake_logits, disc.layers)
    metrics.update(
        d_loss=d_total,
        # The generator's loss on this step's fakes under the pre-update disc (every step, for curves).
        g_loss=losses.g_loss(fake_logits, cfg.loss, cfg.aggregate).item(),
        disc_grad_norm=grad_norm,
        t_hat_mean=torch.cat([x.t_hat for x in inputs]).mean().item(),
    )
    if cfg.r1_weight > 0:
        metrics["r1"] = r1_total
    if cfg.mismatch_weight > 0:
        metrics.update(mismatch_loss=mis_total, accuracy_mismatch=mis_acc_total)
    return metrics


def is_gen_step(step: int, cfg: MethodConfig) -> bool:
    """The student updates every `gen_update_interval` steps, from the end of the disc's warmup."""
    after = step - cfg.disc_warmup_steps
    return after >= 0 and after % cfg.gen_update_interval == 0


def ladd_step(
    models: LaddModels,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    step: int,
    cfg: MethodConfig,
    rng: torch.Generator,
) -> dict[str, float]:
    """One optimizer step of LADD: a G-step every `gen_update_interval` steps, a D-step always."""
    for batch in micro_batches:
        cfg.check_micro_batch(len(batch))
    metrics: dict[str, float] = {"gen_step": float(is_gen_step(step, cfg))}
    if is_gen_step(step, cfg):
        g_metrics, inputs = generator_step(models, opt_g, micro_batches, step, cfg, rng)
        metrics.update(g_metrics)
    else:
        inputs = [disc_inputs_no_grad(models, b, step, cfg, rng) for b in micro_batches]
    metrics.update(discriminator_step(models.disc, opt_d, inputs, cfg))
    return metrics
