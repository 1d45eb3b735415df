"""`ladd train`: the one visible loop around the LADD step.

    ladd train --config configs/toy.toml                       # one CPU process
    ladd train --config configs/toy.toml --set train.steps=50  # any key can be overridden
    torchrun --nproc_per_node 8 -m ladd train --config configs/zimage-512-8gpu.toml

Order of each iteration, top to bottom (as EDM2 / nanochat): validate -> checkpoint -> stop? -> step
-> log. Re-running the same command resumes from the run folder's latest complete checkpoint.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import re
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ladd import distributed
from ladd.config import Config, ConfigError, to_dict, to_toml
from ladd.data.buckets import BucketError, parse_buckets
from ladd.data.shards import DataError, ShardDataset, teacher_fingerprint
from ladd.distributed import print0
from ladd.models.discriminator import Discriminator
from ladd.models.loading import load_pipeline, resolve_pipeline
from ladd.models.lora import TeacherView, add_lora
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import seeded_noise
from ladd.train.checkpoint import CheckpointError, Checkpointer, TrainState, fault, injected
from ladd.train.health import Decision, Health
from ladd.train.logging import MetricsLog
from ladd.train.preemption import StopRequests
from ladd.train.preflight import reference_checks
from ladd.train.step import Batch, LaddModels, is_gen_step, ladd_step, trainable
from ladd.train.validation import Validator


class Trainer:
    """Builds everything a run needs; `run()` is the loop."""

    def __init__(self, cfg: Config):
        self.started = time.monotonic()  # train.max_minutes counts from here: loading is part of the job
        self.cfg = cfg
        self.dist = d = distributed.init(timeout_hours=cfg.train.collective_timeout_s / 3600)
        if cfg.optim.optimizer == "adamw8bit" and d.enabled:
            raise ConfigError(f"optim.optimizer = 'adamw8bit' cannot update FSDP2's sharded parameters ({d.world_size} "
                              "ranks): bitsandbytes has no DTensor support (bitsandbytes#1633); use optim.optimizer "
                              "= 'adamw', or one rank")
        if not cfg.data.path:
            raise ConfigError("data.path is empty: point it at a `ladd precompute` output folder")
        self.out = Path(cfg.train.out)
        self.pipeline_dir = resolve_pipeline(cfg.model.pipeline)
        self.bf16 = cfg.train.mixed_precision == "bf16" or (
            cfg.train.mixed_precision == "auto" and d.device.type == "cuda"
        )
        # Load in the teacher's dtype (bf16 on GPU: 12 GB for the 6B model, not 25). Only the transformer
        # and the VAE (validation decodes) go to the device; the text encoder (8 GB for Z-Image's Qwen3)
        # stays on the CPU: training reads precomputed caption features and encodes only "" for dropout.
        pipe = load_pipeline(self.pipeline_dir, "cpu", torch.bfloat16 if self.bf16 else torch.float32)
        pipe.transformer.to(d.device)
        pipe.vae.to(d.device)
        self.pipe = pipe
        self.student, self.teacher = build_roles(pipe.transformer, cfg.model.student, cfg.model.lora_rank,
                                                 cfg.model.lora_alpha, cfg.model.gradient_checkpointing,
                                                 cfg.model.compile)
        self.data = ShardDataset(cfg.data.path, d.rank, d.world_size, cfg.data.seed,
                                 expect_fingerprint=teacher_fingerprint(self.pipeline_dir),
                                 batch_size=cfg.data.batch_per_rank)
        check_buckets(cfg, self.data, pipe.vae_scale_factor * 2)
        check_trajectory(cfg, self.data)
        # Damaged teacher data is refused before the first step, by every rank together: each rank
        # hashes a 1/world share of the shards (every rank reads every shard, so a lazy check would
        # hash the whole data set on each), then they agree. Never trained on, never a hang.
        problem = self.data.verify_shards(range(d.rank, len(self.data.shards), d.world_size))
        if distributed.any_rank(problem is not None, d.device):
            raise DataError(problem or f"{cfg.data.path}: another rank found a damaged teacher shard "
                                       "(its line names the file); rerun `ladd precompute` with the same arguments")
        self.data.mark_verified()
        text_dim = self._text_dim()
        torch.manual_seed(cfg.train.seed)  # identical disc init on every rank
        self.disc = Discriminator(
            feature_dim=self.teacher.dim, layers=cfg.model.disc_layers, text_dim=text_dim,
            hidden=cfg.model.disc_hidden, cond_dim=cfg.model.disc_cond_dim,
            spectral_norm=cfg.model.disc_spectral_norm, projection=cfg.model.disc_projection,
            num_teacher_layers=self.teacher.num_layers,
        ).to(d.device)
        if d.enabled:
            distributed.shard_adapter(self.student, self.bf16)
            distributed.shard_module(self.disc)
            if cfg.train.teacher_sharded:
                distributed.shard_adapter(self.teacher, False)
        self.models = LaddModels(self.student, self.teacher, self.disc)
        self.opt_g = build_optimizer(trainable(self.student), cfg.optim.lr_g, cfg.optim.betas_g,
                                cfg.optim.weight_decay_g, cfg.optim.optimizer)
        self.opt_d = build_optimizer(trainable(self.disc), cfg.optim.lr_d, cfg.optim.betas_d,
                                cfg.optim.weight_decay_d, "adamw")
        self.ema = ({n: p.detach().clone() for n, p in self.student.named_parameters() if p.requires_grad}
                    if cfg.train.ema_decay > 0 else None)
        seed = cfg.train.seed * 1000 + d.rank
        self.state = TrainState(
            rng=torch.Generator(d.device).manual_seed(seed),
            dropout_rng=torch.Generator().manual_seed(seed + 500),
        )
        self._fixed_captions: dict[tuple[str, int], torch.Tensor] = {}  # fixed_caption(): "" and the negative prompt
        self.ckpt = Checkpointer(self.out / "checkpoints", d, cfg.train.keep_last)
        self.health = Health(cfg.health)

    def _text_dim(self) -> int:
        if self.cfg.model.text_cond == "clip":
            sample = self.data[0]
            if sample["clip"] is None:
                raise ConfigError(f"model.text_cond = 'clip' but {self.cfg.data.path} has no clip embeddings "
                                  "(precompute with --clip DIR, or use text_cond = 'pooled')")
            return sample["clip"].shape[-1]
        return self.pipe.transformer.config.cap_feat_dim

    # ----------------------------------------------------------------------------- state
    def dcp_state(self) -> dict:
        state = {
            "student": distributed.model_state(self.student, self.opt_g),
            "disc": distributed.model_state(self.disc, self.opt_d),
        }
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def save(self) -> None:
        path = self.ckpt.save(self.state.step, self.dcp_state(), self.state, self.data.state_dict(),
                              to_dict(self.cfg))
        print0(f"saved {path}")

    def resume(self) -> bool:
        latest = self.ckpt.latest()
        if latest is None:
            return False
        state = self.dcp_state()
        step, data_state = self.ckpt.load(latest, state, self.state)
        distributed.load_model_state(self.student, self.opt_g, state["student"])
        distributed.load_model_state(self.disc, self.opt_d, state["disc"])
        self.data.load_state_dict(data_state)
        print0(f"resumed from {latest} at step {step}")
        return True

    # ----------------------------------------------------------------------------- one step's data
    def next_micro_batches(self) -> list[Batch]:
        return self.micro_batches([self.data.next_batch() for _ in range(self.cfg.data.grad_accum)])

    def micro_batches(self, batches: list) -> list[Batch]:
        """Data batches (ShardBatch) as the step's micro-batches: on the device, captions dropped, paired noise."""
        cfg, out = self.cfg, []
        empty = None
        neg = self.negative_caption() if cfg.method.guided_teacher else None
        for b in batches:
            caps = [c.to(self.dist.device) for c in b.cap_feats]
            cond = (b.clip if cfg.model.text_cond == "clip" else b.pooled).to(self.dist.device)
            if cfg.data.text_dropout > 0:
                # Dropped captions become the empty prompt for the student, the teacher *and* the disc
                # conditioning, so the three never disagree about what the sample was asked to show.
                drop = torch.rand(len(caps), generator=self.state.dropout_rng) < cfg.data.text_dropout
                if bool(drop.any()):
                    empty = empty if empty is not None else self.empty_caption()
                    for i in torch.nonzero(drop).flatten().tolist():
                        caps[i] = empty[0]
                        cond[i] = empty[1]
            pair_eps = None
            if cfg.method.distill_weight > 0:  # each x0's own initial noise, by the precompute's seed rule
                pair_eps = seeded_noise(b.seeds.tolist(), b.latents.shape[1:]).to(self.dist.device)
            states = b.states.to(self.dist.device) if cfg.method.paired_target == "trajectory" else None
            latents = b.latents.to(self.dist.device)
            if injected("nan_batch", self.state.step):  # fault tests: a damaged sample on this rank
                latents = torch.full_like(latents, math.nan)
            out.append(Batch(latents, caps, cond, pair_eps, neg, states))
        return out

    def negative_caption(self) -> torch.Tensor:
        """The caption features of the data's negative prompt (the teacher's CFG; method.guided_teacher)."""
        sampling = self.data.manifest["sampling"]
        return self.fixed_caption(sampling.get("negative_prompt", ""), sampling.get("max_sequence_length", 512))

    def empty_caption(self) -> tuple[torch.Tensor, torch.Tensor]:
        from ladd.models.text import pooled

        if self.cfg.model.text_cond == "clip":
            raise ConfigError("data.text_dropout with model.text_cond = 'clip' needs an empty-prompt CLIP "
                              "embedding, which the data does not carry; use text_cond = 'pooled'")
        feats = self.fixed_caption("")
        return feats, pooled([feats])[0]

    def fixed_caption(self, prompt: str, max_sequence_length: int = 512) -> torch.Tensor:
        """One prompt's caption features on the device, encoded once per run (the text encoder runs on
        the CPU: on Z-Image a 4B model, too slow to call every step)."""
        key = (prompt, max_sequence_length)
        if key not in self._fixed_captions:
            from ladd.models.text import encode_prompts

            feats = encode_prompts(self.pipe, [prompt], max_sequence_length, device="cpu")
            self._fixed_captions[key] = feats[0].to(self.dist.device)
        return self._fixed_captions[key]

    def set_lr(self) -> tuple[float, float]:
        o = self.cfg.optim
        f = o.lr_factor(self.state.step, self.cfg.train.steps)
        lr_g, lr_d = o.lr_g * f, o.lr_d * f * self.state.lr_d_scale
        for group in self.opt_g.param_groups:
            group["lr"] = lr_g
        for group in self.opt_d.param_groups:
            group["lr"] = lr_d
        return lr_g, lr_d

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = self.cfg.train.ema_decay
        for n, p in self.student.named_parameters():
            if n in self.ema:
                self.ema[n].lerp_(p.detach(), 1 - decay)

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> dict:
        cfg, d, state = self.cfg, self.dist, self.state
        resumed = self.resume()
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(to_toml(cfg))
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        print0(self.plan())
        for name, ok, detail in reference_checks(cfg, self.pipe, self.data):  # the doctor's cheap checks
            print0(f"[{'ok' if ok else 'WARNING'}] {name}: {detail}")
        validator = Validator(self.pipe, self.data, cfg, d, self.out, self.bf16, log_schedule=not resumed)
        log = MetricsLog(self.out, cfg.log, enabled=d.is_main)
        bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not d.is_main, desc="train", unit="step")
        # The steps whose validation and checkpoint are done: a resumed (or rolled-back) step has both.
        last_saved = last_validated = state.step if resumed else -1
        requests = StopRequests(cfg.train.max_minutes, self.started)
        try:
            stopped, summary = self._loop(validator, log, bar, requests, last_saved, last_validated)
        except CheckpointError:
            raise  # every rank raises it together: no rank is lost
        except RuntimeError as e:  # gloo raises RuntimeError, NCCL its subclass DistBackendError
            # Still inside the signal handlers: torchrun SIGTERMs the survivors of a dead worker, and
            # this rank must live the few seconds it takes to say which rank is gone.
            raise self.lost_rank_error(e) or e
        finally:
            requests.close()
            bar.close()
            log.close()
        result = {"step": state.step, "stopped": f"stop_{stopped.cause}" if stopped else None,
                  "finished": state.step >= cfg.train.steps, "skipped_updates": state.skipped,
                  "last": {k: summary.get(k) for k in ("d_loss", "g_loss", "logit_gap")}}
        if d.is_main:
            (self.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print0(json.dumps(result))
        return result

    def _loop(self, validator: Validator, log: MetricsLog, bar: tqdm, requests: StopRequests,
              last_saved: int, last_validated: int) -> tuple[Decision | None, dict]:
        """validate -> checkpoint -> stop? -> step -> log, until the last step or a stop."""
        cfg, d, state = self.cfg, self.dist, self.state
        stopped: Decision | None = None
        summary: dict = {}
        while True:
            step = state.step
            last_step = step >= cfg.train.steps
            every = cfg.validation.every
            # health.pending: the disc is at chance and only a validation tells a good student from a collapse.
            if step != last_validated and (last_step or step == 0 or (every > 0 and step % every == 0)
                                           or self.health.pending):
                v = validator.run(step, self.student, self.teacher)
                log.write(step, v)
                last_validated = step
                decision = self.health.after_validation(step, v["val_drift"], v.get("val_diversity_ratio"), last_step)
                stopped = self.act(decision, bar)
                if stopped:
                    break
                if decision.action == "rollback":
                    last_saved = last_validated = state.step  # the restored step has both
                    continue  # the iteration starts again at the restored step
            if step != last_saved and (last_step or (step > 0 and step % cfg.train.checkpoint_every == 0)):
                self.save()
                last_saved = step
            if last_step:
                break
            # A preemption signal or the wall-clock budget on any rank stops every rank here, at the
            # same step, after a checkpoint: the one all-reduce per step that makes that an agreement.
            signalled, out_of_time = distributed.any_ranks(requests.flags(), d.device)
            if signalled or out_of_time:
                if step != last_saved:
                    self.save()
                why = (f"preempted ({requests.signal or 'a signal on another rank'})" if signalled
                       else f"train.max_minutes = {cfg.train.max_minutes:g} reached")
                print0(f"{why} at step {step}; rerun the same command to resume")
                stopped = Decision("stop", "preempted" if signalled else "time_limit", why)
                break

            t0 = time.perf_counter()
            lr_g, lr_d = self.set_lr()
            micro = self.next_micro_batches()
            # bf16 autocast on GPU; parameters (and the optimizers' state) stay fp32 master copies.
            # No autocast weight cache: it would keep a bf16 copy of the whole full student for the
            # step (12.3 GB at 6B, the margin by which one 80 GB GPU ran out); re-casting costs ~10 ms.
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False):
                metrics = ladd_step(self.models, self.opt_g, self.opt_d, micro, step, cfg.method, state.rng)
            if self.ema is not None and is_gen_step(step, cfg.method):
                self.update_ema()
            metrics = distributed.mean_over_ranks(metrics, d.device)
            state.skipped += int(self.health.nonfinite(metrics))
            decision = self.health.after_step(metrics, step)
            state.step += 1
            dt = time.perf_counter() - t0
            samples = cfg.data.batch_per_rank * cfg.data.grad_accum * d.world_size
            metrics.update(lr_g=lr_g, lr_d=lr_d, step_time=dt, samples_per_s=samples / dt,
                           skipped_updates=state.skipped, peak_mem_gb=_peak_mem_gb(d.device))
            if state.step % cfg.log.every == 0:
                log.write(state.step, metrics)
            fault("step", state.step)
            if injected("sigterm", state.step):  # fault tests: a preemption notice on this rank
                os.kill(os.getpid(), signal.SIGTERM)
            bar.update(1)
            bar.set_postfix(d=f"{metrics['d_loss']:.3f}", g=f"{metrics['g_loss']:+.3f}",
                            gap=f"{metrics['logit_gap']:+.2f}")
            summary = metrics
            stopped = self.act(decision, bar)
            if stopped:
                break
            if decision.action == "rollback":
                last_saved = last_validated = state.step
        return stopped, summary

    def lost_rank_error(self, error: RuntimeError) -> distributed.RankLost | None:
        """If `error` came from a collective whose peers are gone, the one-line error that names them."""
        if not self.dist.enabled:
            return None
        found = distributed.lost_ranks()
        if found is not None and not found[0]:
            return None  # every rank answered: not a lost rank, a real error
        lost = "an unknown rank (the rendezvous store is gone too)" if found is None else \
            f"rank{'s' if len(found[0]) > 1 else ''} {', '.join(map(str, found[0]))}"
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip())  # gloo's "[.../pair.cc:537] " prefix
        first = text.splitlines()[0][:160] if text else type(error).__name__
        # The folder listing, not latest(): verifying is a collective, and a peer is gone.
        done = self.ckpt.finished()
        last = f"the last complete checkpoint is {done[-1]}" if done else "no checkpoint was written yet"
        return distributed.RankLost(
            f"rank {self.dist.rank} lost contact with {lost} at step {self.state.step} (dead or hung; "
            f"{first}); {last}: rerun the same command to resume")

    def act(self, decision: Decision, bar: tqdm) -> Decision | None:
        """Carry out a health decision (the same on every rank: it comes from rank-averaged metrics or
        gathered validation latents). Returns the decision if the run stops, else None.

        A rollback restores the latest checkpoint, scales lr_d by health.rollback_lr_d_factor and resets
        the guards; the caller then goes on from the restored step. With no checkpoint yet there is
        nothing to roll back to: the run stops (a collapsed student is not trained on), saying so."""
        if decision.message:
            print0(f"health: {decision.message}")
        if decision.action == "stop":
            if decision.cause == "nonfinite":
                print0(f"stopping; the last good checkpoint is {self.ckpt.latest()}")
            return decision
        if decision.action == "rollback":
            if self.ckpt.latest() is None:
                print0(f"health: no checkpoint to roll back to yet (the first is due at step "
                       f"{self.cfg.train.checkpoint_every}); stopping instead")
                return Decision("stop", decision.cause, decision.message)
            self.resume()
            self.state.lr_d_scale *= self.cfg.health.rollback_lr_d_factor
            self.health.reset()
            print0(f"rolled back to step {self.state.step}; lr_d scaled by {self.state.lr_d_scale:g}")
            bar.reset(total=self.cfg.train.steps)
            bar.update(self.state.step)
        return None

    def plan(self) -> str:
        cfg, d = self.cfg, self.dist
        eff = cfg.data.batch_per_rank * cfg.data.grad_accum * d.world_size
        seen = cfg.train.steps * eff / max(len(self.data), 1)
        return (f"plan: {d.world_size} rank(s) on {d.device.type}, batch {cfg.data.batch_per_rank}/rank × "
                f"{cfg.data.grad_accum} accum = {eff} per step, {cfg.train.steps} steps, {len(self.data)} "
                f"prompts -> each seen ~{seen:.1f}×; {self.disc.describe()}; "
                f"{'bf16' if self.bf16 else 'fp32'}; G every {cfg.method.gen_update_interval} steps")


def check_buckets(cfg: Config, data: ShardDataset, factor: int) -> None:
    """The data holds the buckets the config asks for, and every bucket fills at least one step."""
    have = [b.name for b in data.buckets]
    if cfg.data.buckets:
        try:
            want = [b.name for b in parse_buckets(cfg.data.buckets, factor)]
        except BucketError as err:
            raise ConfigError(f"data.buckets: {err}") from None
        if sorted(want) != sorted(have):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise DataError(f"{cfg.data.path} holds buckets {','.join(have)}, but data.buckets = {cfg.data.buckets!r} "
                            f"asks for {','.join(want)}" + (f" (missing {','.join(missing)})" if missing else "")
                            + (f" (not asked for {','.join(extra)})" if extra else "")
                            + "; precompute with the same --buckets, or set data.buckets to match")
    if data.never_visited:
        b, n = data.never_visited[0]
        step = data.world_size * data.batch_size
        raise DataError(f"{cfg.data.path}: bucket {b.name} has {n} samples, fewer than one step's {step} "
                        f"({data.batch_size} per rank × {data.world_size} rank(s)), so it would never be trained; "
                        "precompute more prompts for it, or lower data.batch_per_rank")


def check_trajectory(cfg: Config, data: ShardDataset) -> None:
    """method.paired_target "trajectory" reads the teacher's states at the student's timesteps after the first."""
    if cfg.method.paired_target != "trajectory":
        return
    want = list(cfg.method.student_timesteps[1:])
    have = list(data.trajectory)
    if len(have) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(have, want)):
        held = f"states at σ {','.join(f'{r:g}' for r in have)}" if have else "no teacher states"
        raise DataError(f"{cfg.data.path} holds {held}, but method.paired_target = 'trajectory' with student_timesteps "
                        f"{list(cfg.method.student_timesteps)} needs them at {','.join(f'{r:g}' for r in want)}: rerun "
                        f"`ladd precompute` with --trajectory {','.join(f'{r:g}' for r in want)} (and another --out)")


def build_roles(transformer, student: str, lora_rank: int, lora_alpha: float,
                checkpointing: bool, compile: bool = False) -> tuple[ZImageAdapter, ZImageAdapter]:
    """(student, teacher) adapters over the loaded teacher transformer.

    The teacher only runs forwards: it stays in the load dtype (bf16 on GPU); a full student is an
    fp32 copy (master weights). A LoRA student is the same module with adapters on, the teacher the
    one with them off: one copy of the weights, base in bf16, adapters fp32 (trainable). Checkpointing
    applies to both roles: the teacher's fake pass keeps a graph (for the input gradient) through every
    block up to the deepest tap, as large as the student's. `compile` (model.compile) compiles each
    role's blocks after the copy and the adapters exist, before FSDP wraps them.
    """
    if student == "lora":
        add_lora(transformer, lora_rank, lora_alpha)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        s, t = ZImageAdapter(transformer, compile=compile).train(), TeacherView(transformer)
    else:
        s = ZImageAdapter(copy.deepcopy(transformer).float().requires_grad_(True), compile=compile).train()
        t = ZImageAdapter(transformer, compile=compile)
    s.gradient_checkpointing = t.gradient_checkpointing = checkpointing
    return s, t


def build_optimizer(params, lr, betas, weight_decay, kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (fused: one kernel for all parameters instead of a dozen per tensor) or bitsandbytes' 8-bit AdamW."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.optimizer = 'adamw8bit' needs bitsandbytes (CUDA): pip install bitsandbytes")

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:  # pragma: no cover
        return math.nan


def train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    except distributed.RankLost:
        raise  # no orderly shutdown: it would wait for the rank that is gone
    except BaseException:
        distributed.shutdown()
        raise
    # The models (and the tensors their last collectives hold) go before the process group does,
    # while the interpreter is whole: freed during its teardown, gloo's threads can abort the process.
    del trainer
    gc.collect()
    distributed.shutdown()
    return result
