"""`ladd train` on the tiny pipeline: a short run, FSDP2 on 2 ranks, exact resume after SIGKILL,
gradient accumulation, the NaN guard and the collapse detector."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ladd.config import Config, ConfigError, HealthConfig, load_config, to_toml
from ladd.models.tiny import build_tiny_pipeline
from ladd.train.checkpoint import Checkpointer, load_weights
from tests.worlds import PROMPTS, make_train_world, train_overrides

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_train_world(tmp_path_factory.mktemp("train"))


overrides = train_overrides


def run_cli(args, env_extra=None, nproc=1, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = [sys.executable, "-m", "ladd"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "ladd"]
    cmd = launcher + ["train"] + [a for o in args for a in ("--set", o)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_single_process_run(world):
    from ladd.train.loop import train

    out = world / "single"
    result = train(load_config(None, overrides(world, out, steps=6)))
    assert result == {"step": 6, "stopped": None, "finished": True, "skipped_updates": 0, "last": result["last"]}
    rows = metrics_rows(out)
    steps = [r for r in rows if "d_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["d_loss"]) and "lr_g" in r and "samples_per_s" in r for r in steps)
    assert [r["step"] for r in rows if "val_latent_mse" in r] == [0, 3, 6]  # validation from step 0
    for name in ("teacher.png", "step-00000000.png", "x_t_at_curriculum_timesteps.png"):
        assert (out / "validation" / name).is_file()
    ckpts = Checkpointer(out / "checkpoints", None).finished()
    assert [p.name for p in ckpts] == ["step-00000004", "step-00000006"]  # keep_last = 2
    assert json.loads((ckpts[-1] / "meta.json").read_text())["config"]["train"]["steps"] == 6
    assert load_config(out / "config.toml").train.steps == 6  # the resolved config round-trips


@pytest.mark.slow
def test_exact_resume_after_sigkill(world):
    """Killed mid-run (and once mid-save), re-run: bit-identical student and disc to an unbroken run."""
    ref = world / "unbroken"
    run_cli(overrides(world, ref, steps=7))
    for fault, name in (("step:5", "killed"), ("save:4", "killed_in_save")):
        out = world / name
        proc = run_cli(overrides(world, out, steps=7), {"LADD_FAULT": fault}, check=False)
        assert proc.returncode == -9  # SIGKILL
        if fault.startswith("save"):
            assert (out / "checkpoints" / "step-00000004.tmp").is_dir()  # half-written, never loaded
            assert Checkpointer(out / "checkpoints", None).latest().name == "step-00000002"
        proc = run_cli(overrides(world, out, steps=7))
        assert "resumed from" in proc.stdout
        for part in ("student", "disc"):
            a = load_weights(ref / "checkpoints" / "step-00000007", part)
            b = load_weights(out / "checkpoints" / "step-00000007", part)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, part)
        # and training really moved the weights (the comparison is not between two untouched copies)
        tiny = build_tiny_pipeline(seed=2).transformer.state_dict()
        w = load_weights(ref / "checkpoints" / "step-00000007", "student")
        assert any(not torch.equal(w[k], tiny[k]) for k in tiny)


@pytest.mark.slow
def test_two_rank_fsdp_run_and_single_process_load(world):
    out = world / "fsdp"
    run_cli(overrides(world, out, steps=4), nproc=2)
    final = out / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in final.glob("rank-*.safetensors")) == ["rank-00000.safetensors",
                                                                        "rank-00001.safetensors"]
    weights = load_weights(final, "student")
    transformer = build_tiny_pipeline(seed=2).transformer
    transformer.load_state_dict(weights, strict=True)  # a whole, unsharded model in one process
    rows = [r for r in metrics_rows(out) if "d_loss" in r]
    assert len(rows) == 4 and all(r["samples_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_nan_guard_stops_and_keeps_last_good_checkpoint(world, monkeypatch):
    import ladd.train.loop as loop

    real_step = loop.ladd_step
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        metrics = real_step(*args, **kwargs)
        if calls["n"] > 3:
            metrics.update(d_loss=float("nan"), disc_grad_norm=float("nan"))
        return metrics

    monkeypatch.setattr(loop, "ladd_step", flaky)
    out = world / "nan"
    result = loop.train(load_config(None, overrides(world, out, steps=20, **{"health.nan_patience": "3"})))
    assert result["stopped"] == "stop_nonfinite" and result["skipped_updates"] == 3 and result["step"] == 6
    # Skipped updates leave the weights as they were, so step 4 is still good; step 6 is not saved.
    assert Checkpointer(out / "checkpoints", None).latest().name == "step-00000004"


def test_apply_update_skips_nonfinite():
    from ladd.train.step import apply_update

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert math.isnan(apply_update([w], opt, 1.0))
    assert torch.equal(w.detach(), torch.ones(3))


def test_collapse_detector_on_synthetic_runs():
    from ladd.config import HealthConfig
    from ladd.train.health import CONTINUE, Health, diversity_ratio, drift_ratio

    health = Health(HealthConfig(collapse_window=20))
    fired = [health.observe({"d_loss": 2.0, "g_loss": 0.0, "logit_gap": 0.01 * (-1) ** i}, i)["collapse_logits"]
             for i in range(25)]
    # At chance from step 19 on, with no validation yet: nothing fires, a validation is asked for, and it decides.
    assert not any(fired) and health.pending
    assert health.validated(25, 1.5) and not health.pending
    healthy = Health(HealthConfig(collapse_window=20))
    assert not any(healthy.observe({"d_loss": 1.2, "g_loss": 0.5, "logit_gap": 3.0}, i)["collapse_logits"]
                   for i in range(25))
    teacher = torch.randn(6, 16, 8, 8)
    same = teacher[:1].repeat(6, 1, 1, 1) + 0.01 * torch.randn(6, 16, 8, 8)
    varied = teacher + 0.1 * torch.randn_like(teacher)
    assert diversity_ratio(same, teacher) < 0.05 and diversity_ratio(varied, teacher) > 0.9
    stop = Health(HealthConfig(on_collapse="stop"))
    assert stop.after_validation(5, 1.0, diversity_ratio(same, teacher), last_step=False).action == "stop"
    assert stop.after_validation(5, 1.0, diversity_ratio(varied, teacher), last_step=False) == CONTINUE
    # Drift: the toy world's collapsed run had 5.1× its untrained MSE, healthy ones ≤ 1.1×.
    assert drift_ratio(1.908, 0.371) == 1.908 / 0.371
    drifted = stop.after_validation(5, drift_ratio(1.908, 0.371), 0.9, last_step=False)
    assert (drifted.action, drifted.cause) == ("stop", "collapse") and "5.1×" in drifted.message
    assert stop.after_validation(5, drift_ratio(0.41, 0.371), 0.9, last_step=False) == CONTINUE
    assert stop.after_validation(5, 9.9, 0.01, last_step=True) == CONTINUE  # the final one only reports
    warn = Health(HealthConfig()).after_validation(5, 9.9, 0.9, last_step=False)
    assert (warn.action, warn.cause) == ("continue", "collapse")


def test_the_gap_rule_decides_by_a_fresh_validation_and_asks_for_one_when_there_is_none():
    """A disc at chance is excused by a validation drift <= collapse_drift no older than the window and
    caught by a larger one; with a stale validation, or none at all, it fires nothing and asks for a
    validation (`pending`), whose drift decides."""
    from ladd.config import HealthConfig
    from ladd.train.health import Health

    chance = {"d_loss": 2.0, "g_loss": 0.0, "logit_gap": 0.0}

    def run(drift_at: int | None, drift: float, steps: int = 40, **cfg) -> tuple[list[bool], list[bool], Health]:
        health = Health(HealthConfig(collapse_window=20, **cfg))
        fired, pending = [], []
        for i in range(steps):
            if i == drift_at:
                health.validated(i, drift)
            fired.append(health.observe(chance, i)["collapse_logits"])
            pending.append(health.pending)
        return fired, pending, health

    fired, pending, health = run(5, 1.07)
    assert not any(fired) and not any(pending[:26]) and all(pending[26:])  # excused through step 25, then stale
    assert health.excused == 26 - 19 and not health.validated(40, 1.2) and health.excused == 8
    assert not health.pending
    fired, pending, _ = run(5, 1.5)
    assert all(fired[19:26]) and not any(pending[:26])  # the student has moved away: a collapse
    fired, pending, health = run(None, 1.0)
    assert not any(fired) and all(pending[19:]) and health.validated(40, 1.31)
    assert all(run(5, 1.07, collapse_drift=0)[0][19:]) and not any(run(5, 1.07, collapse_drift=0)[1])
    fired, pending, health = run(0, 1.0)  # step 0's validation is the teacher itself: no evidence either way
    assert not any(fired) and all(pending[19:]) and not health.validated(0, 9.0) and health.pending
    health = Health(HealthConfig(collapse_window=20))
    health.validated(1, 1.1)
    events = [health.observe(chance, i) for i in range(20)]
    assert events[-1]["excused"] and health.excused == 1 and not any(e["excused"] for e in events[:-1])
    health.reset()  # a rollback forgets the validation: the restored weights were not measured
    after = [health.observe(chance, 20 + i)["collapse_logits"] for i in range(20)]
    assert not any(after) and health.pending  # a full window again, and a validation must decide


def test_the_gap_rule_on_real_toy_runs():
    """Recorded runs (tests/data/health_runs.json): two good distilled demo seeds whose slow disc sat at
    chance over steps 200-300 (the rule without the drift check warned 26 and 34 times) are excused; a
    pure-LADD run that collapsed (KID 0.187 against the untrained 0.0168) is still caught."""
    from pathlib import Path

    from ladd.config import HealthConfig
    from ladd.train.health import replay

    runs = json.loads((Path(__file__).parent / "data" / "health_runs.json").read_text())["runs"]
    for name, run in runs.items():
        rows = [{"step": s, "logit_gap": g, "d_loss": d} for s, g, d in run["train"]]
        rows += [{"step": s, "val_drift": v} for s, v in run["val"]]
        # metrics.jsonl's order: update s - 1's row (step s) is written before the validation at step s.
        rows.sort(key=lambda r: (r["step"], "val_drift" in r))
        new, old = replay(HealthConfig(), rows), replay(HealthConfig(collapse_drift=0), rows)
        assert old["collapse_logits"], name  # the disc was at chance in every one of them
        assert new["collapse_logits"] == (run["verdict"] == "collapsed"), name
        if run["verdict"] == "good":
            assert new["excused_steps"] > 0 and not new["drift"], name


@pytest.mark.slow
def test_gradient_accumulation_equivalence(monkeypatch):
    """2 micro-batches of 2 give the gradients of one batch of 4, with one optimizer step."""
    import copy

    from ladd.config import MethodConfig
    from ladd.models.discriminator import Discriminator
    from ladd.models.text import encode_prompts, pooled
    from ladd.models.zimage import ZImageAdapter
    import ladd.train.step as step

    pipe = build_tiny_pipeline(seed=3)
    caps = encode_prompts(pipe, PROMPTS[:4])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 16, 16, generator=g)
    noise = [torch.tensor([1.0, 0.5, 0.75, 0.25]), torch.randn(4, 16, 16, 16, generator=g),
             torch.rand(4, generator=g) * 0.8 + 0.1, torch.randn(4, 16, 16, 16, generator=g),
             torch.randn(4, 16, 16, 16, generator=g)]

    def fixed_noise(batch, *_):
        rows = [int(torch.nonzero((x0 == r).flatten(1).all(1))[0]) for r in batch.x0]
        return (*(n[rows] for n in noise), None)

    monkeypatch.setattr(step, "draw_noise", fixed_noise)
    grads = []
    for split in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        torch.manual_seed(0)
        student = ZImageAdapter(copy.deepcopy(pipe.transformer).requires_grad_(True)).train()
        disc = Discriminator(feature_dim=64, layers=[1, 5], text_dim=32, hidden=64, cond_dim=64)
        models = step.LaddModels(student, ZImageAdapter(pipe.transformer), disc)
        syncs = []
        student.set_requires_gradient_sync = syncs.append  # what FSDP2 exposes; recorded here
        opt = torch.optim.SGD(step.trainable(student), lr=0.0)
        opt.step = lambda *a: grads.append(torch.cat([p.grad.flatten() for p in step.trainable(student)]))
        micro = [step.Batch(x0[s], caps[s], pooled(caps[s])) for s in split]
        step.generator_step(models, opt, micro, 0, MethodConfig(), torch.Generator())
        assert syncs == [False] * (len(split) - 1) + [True]  # reduce only after the last micro-batch
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_lr_warmup_and_decay_reach_both_optimizers(world):
    from ladd.train.loop import train

    out = world / "decay"
    train(load_config(None, overrides(world, out, steps=6, **{
        "optim.warmup_steps": "2", "optim.decay": '"linear"', "optim.lr_min_ratio": "0.2",
        "validation.every": "0"})))
    rows = [r for r in metrics_rows(out) if "lr_g" in r]
    # warmup 1/2, 2/2; then linear from 1 towards 0.2 over the 4 remaining steps: 1, 0.8, 0.6, 0.4
    factors = [0.5, 1.0, 1.0, 0.8, 0.6, 0.4]
    assert [r["lr_g"] for r in rows] == pytest.approx([1e-3 * f for f in factors])
    assert [r["lr_d"] for r in rows] == pytest.approx([1e-3 * f for f in factors])
    cosine = load_config(None, ["optim.decay=cosine"]).optim
    assert [cosine.lr_factor(s, 4) for s in range(4)] == pytest.approx([1, (1 + 0.5 ** 0.5) / 2, 0.5,
                                                                         (1 - 0.5 ** 0.5) / 2])
    with pytest.raises(ConfigError, match="optim.decay 'cos' is unknown"):
        load_config(None, ["optim.decay=cos"])


def test_config_errors_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'gen_update_interval'"):
        load_config(None, ["method.gen_update_intervl=3"])
    with pytest.raises(ConfigError, match=r"unknown config section \[optimizer\].*'optim'"):
        load_config(None, ["optimizer.lr_g=1e-5"])
    with pytest.raises(ConfigError, match="optim.lr_g must be float"):
        load_config(None, ["optim.lr_g='fast'"])
    with pytest.raises(ConfigError, match="micro-batch of 1"):
        load_config(None, ["data.batch_per_rank=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr_g=1e-5"])
    cfg = load_config(None, ["method.renoise_m=0.5", "model.disc_layers=[1, 2]", "model.text_cond=clip"])
    assert (cfg.method.renoise_m, cfg.model.disc_layers, cfg.model.text_cond) == (0.5, [1, 2], "clip")
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg
    assert Config().optim.lr_g == 5e-6 and Config().method.gen_update_interval == 3  # the blog's best


def test_config_diff_cli(tmp_path, capsys):
    from ladd.cli import main

    (tmp_path / "a.toml").write_text("[data]\nbatch_per_rank = 2\n[method]\nrenoise_m = 0.5\n")
    (tmp_path / "b.toml").write_text("[data]\nbatch_per_rank = 4\n")
    assert main(["config", "diff", str(tmp_path / "a.toml"), str(tmp_path / "b.toml")]) == 1
    out = capsys.readouterr().out
    assert "data.batch_per_rank  2  |  4" in out and "method.renoise_m     0.5  |  1.0" in out
    assert main(["config", "diff", str(tmp_path / "b.toml"), str(tmp_path / "b.toml")]) == 0


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    from ladd.data.buckets import parse_buckets

    names = sorted(p.name for p in root.glob("*.toml"))
    assert names == ["toy-ladd.toml", "toy.toml", "zimage-1024-1gpu-lora.toml", "zimage-1024-8gpu.toml",
                     "zimage-512-1gpu.toml", "zimage-512-8gpu.toml"]
    for name in names:
        cfg = load_config(root / name)
        assert cfg.data.batch_per_rank >= 2  # the corrected recipe: never hinge on one sample
        if cfg.data.buckets:
            parse_buckets(cfg.data.buckets, 16)  # Z-Image's VAE factor 8 × patch 2
    for name in ("zimage-512-8gpu.toml", "zimage-1024-8gpu.toml"):
        eight = load_config(root / name)
        assert eight.data.batch_per_rank * eight.data.grad_accum * 8 == 64
        assert (eight.optim.lr_g, eight.optim.lr_d, eight.method.gen_update_interval) == (5e-6, 1e-5, 3)
    assert load_config(root / "zimage-1024-8gpu.toml").data.buckets == "zimage-1024"
    assert load_config(root / "zimage-1024-1gpu-lora.toml").model.student == "lora"


@pytest.mark.slow
def test_gradient_checkpointing_flag_reaches_both_roles(world):
    from ladd.train.loop import Trainer

    cfg = load_config(None, overrides(world, world / "gc", **{"model.gradient_checkpointing": "true"}))
    trainer = Trainer(cfg)
    assert trainer.student.gradient_checkpointing and trainer.teacher.gradient_checkpointing
    # tests/test_adapter.py::test_taps_under_gradient_checkpointing proves the flag recomputes blocks.


@pytest.mark.slow
def test_doctor_reports_checks(world, capsys):
    from ladd.cli import main

    args = [a for o in overrides(world, world / "doc") for a in ("--set", o)]
    assert main(["doctor", *args]) == 0
    out = capsys.readouterr().out
    assert "[ok] one step gives finite, non-zero student gradients" in out
    assert "[ok] teacher references are clean" in out and "plan: 1 rank(s)" in out


@pytest.mark.slow
def test_lora_student_run_checkpoints_adapters_only(world):
    pytest.importorskip("peft")
    from ladd.train.loop import train

    out = world / "lora"
    extra = {"model.student": '"lora"', "model.lora_rank": "4", "model.lora_alpha": "4.0"}
    assert train(load_config(None, overrides(world, out, steps=4, **extra)))["step"] == 4
    weights = load_weights(out / "checkpoints" / "step-00000004", "student")
    assert weights and all("lora_" in k for k in weights)  # the frozen base comes from the pipeline
    result = train(load_config(None, overrides(world, out, steps=7, **extra)))  # resumes; G-step at 6
    assert result["step"] == 7
    after = load_weights(out / "checkpoints" / "step-00000007", "student")
    assert any(not torch.equal(after[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_ema_and_text_dropout(world):
    from ladd.train.loop import Trainer, train

    out = world / "ema"
    train(load_config(None, overrides(world, out, steps=4, **{"train.ema_decay": "0.5"})))
    final = out / "checkpoints" / "step-00000004"
    ema, raw = load_weights(final, "ema"), load_weights(final, "student")
    init = build_tiny_pipeline(seed=2).transformer.state_dict()
    k = "layers.0.attention.to_q.weight"
    assert not torch.equal(ema[k], raw[k]) and not torch.equal(ema[k], init[k])
    # Text dropout replaces the caption features *and* the disc conditioning with the empty prompt's.
    trainer = Trainer(load_config(None, overrides(world, world / "drop", **{"data.text_dropout": "0.999"})))
    (batch,) = trainer.next_micro_batches()
    empty_feats, empty_cond = trainer.empty_caption()
    assert all(torch.equal(c, empty_feats) for c in batch.cap_feats)
    assert all(torch.equal(c, empty_cond) for c in batch.text_cond)


@pytest.mark.slow
def test_distillation_pairs_each_latent_with_the_teacher_noise_that_made_it(world):
    """With method.distill_weight > 0 each batch carries x0's initial noise; ZImagePipeline started from
    that noise (the precompute's sampling: 4 steps, CFG 5) returns that x0."""
    from ladd.train.loop import Trainer

    trainer = Trainer(load_config(None, overrides(world, world / "pairs", **{"method.distill_weight": "1.0"})))
    first = trainer.data.epoch_indices(0)[:2].tolist()
    (batch,) = trainer.next_micro_batches()
    pipe = build_tiny_pipeline(seed=2)
    for j, i in enumerate(first):
        x0 = pipe(PROMPTS[i], height=32, width=32, num_inference_steps=4, guidance_scale=5.0,
                  latents=batch.pair_eps[j : j + 1], output_type="latent").images
        torch.testing.assert_close(x0[0], batch.x0[j], atol=1e-4, rtol=0)
    assert Trainer(load_config(None, overrides(world, world / "pairs"))).next_micro_batches()[0].pair_eps is None
    # method.score_weight: each batch carries the negative prompt's features, as ZImagePipeline's CFG uses them.
    trainer = Trainer(load_config(None, overrides(world, world / "score", **{"method.score_weight": "1.0"})))
    (batch,) = trainer.next_micro_batches()
    _, neg = pipe.encode_prompt(PROMPTS[0], device="cpu", do_classifier_free_guidance=True, negative_prompt="")
    torch.testing.assert_close(batch.neg_cap, neg[0].float(), atol=0, rtol=0)


def test_trajectory_data_carry_the_teachers_own_path_at_the_student_timesteps(world, capsys):
    """method.paired_target = "trajectory": each batch carries the teacher's states at the student's
    later timesteps, stored by `ladd precompute --trajectory`: on the straight line of ZImagePipeline's
    own Euler step from that latent's noise (its latents after each step). Data without them, or at
    other σ, are refused in one line that gives the precompute flag; a short run trains."""
    from ladd.data.precompute import PrecomputeConfig, run_precompute
    from ladd.data.shards import DataError
    from ladd.flow import image_seq_len, teacher_sigmas
    from ladd.train.loop import Trainer, train

    ts = {"method.distill_weight": "1.0", "method.paired_target": '"trajectory"',
          "method.student_timesteps": "[1.0, 0.75, 0.5, 0.25]"}
    with pytest.raises(DataError, match=r"holds no teacher states, but .* rerun `ladd precompute` with "
                                        r"--trajectory 0.75,0.5,0.25 \(and another --out\)$"):
        Trainer(load_config(None, overrides(world, world / "no-states", **ts)))
    run_precompute(PrecomputeConfig(pipeline=str(world / "tiny"), prompts=str(world / "prompts.txt"),
                                    out=str(world / "data-path"), steps=4, shard_size=3, trajectory=(0.75, 0.5, 0.25)))
    data = {"data.path": f'"{world / "data-path"}"'}
    with pytest.raises(DataError, match="holds states at σ 0.75,0.5,0.25, but .* needs them at 0.9,0.5,0.25"):
        Trainer(load_config(None, overrides(world, world / "other", **data,
                                            **ts | {"method.student_timesteps": "[1.0, 0.9, 0.5, 0.25]"})))
    trainer = Trainer(load_config(None, overrides(world, world / "path", **ts, **data)))
    first = trainer.data.epoch_indices(0)[:2].tolist()
    (batch,) = trainer.next_micro_batches()
    assert batch.states.shape == (2, 3, *batch.x0.shape[1:])
    pipe = build_tiny_pipeline(seed=2)
    sigmas = teacher_sigmas(pipe.scheduler, 4, image_seq_len(16, 16)).tolist()
    for j, i in enumerate(first):
        seen = [batch.pair_eps[j : j + 1]]
        pipe(PROMPTS[i], height=32, width=32, num_inference_steps=4, guidance_scale=5.0, latents=batch.pair_eps[j : j + 1],
             output_type="latent", callback_on_step_end=lambda _p, _i, _t, kw: seen.append(kw["latents"].clone()) or kw)
        torch.testing.assert_close(seen[-1][0], batch.x0[j], atol=1e-4, rtol=0)
        for k, sigma in enumerate((0.75, 0.5, 0.25)):
            n = next(n for n in range(4) if sigmas[n] >= sigma >= sigmas[n + 1])  # the step that crosses σ
            frac = (sigma - sigmas[n]) / (sigmas[n + 1] - sigmas[n])
            torch.testing.assert_close(batch.states[j, k], (seen[n] + frac * (seen[n + 1] - seen[n]))[0], atol=1e-4, rtol=0)
    assert train(load_config(None, overrides(world, world / "path-run", steps=2, **ts, **data)))["finished"]
    # The last-step rollout runs the guided teacher: the negative prompt comes without the score term too.
    rollout = {"method.last_step_rollout": "1", "method.score_weight": "0.0"}
    assert train(load_config(None, overrides(world, world / "rollout-run", steps=2, **ts, **data, **rollout)))["finished"]


@pytest.mark.slow
def test_eval_warns_when_a_distilled_student_meets_its_training_noise(world):
    from ladd.eval.commands import seen_noise_warning

    config = {"method": {"distill_weight": 1.0}, "data": {"path": str(world / "data")}}  # seeds 0..7
    assert "3 eval noises were training noises" in seen_noise_warning(config, [5, 6, 7, 8, 9], [0])
    assert seen_noise_warning(config, [5, 6, 7], [1]) is None  # eval seed 1: noise seeds 1e6 + 5..7
    assert seen_noise_warning(config, [100, 101], [0]) is None
    assert seen_noise_warning({**config, "method": {"distill_weight": 0.0}}, [5], [0]) is None


@pytest.mark.slow
def test_drift_guard_stops_a_student_that_leaves_the_teacher(world):
    """A student blown away from the teacher (huge lr, G every step) is stopped by the drift guard;
    at step 0 the student is the teacher, so its drift is exactly 1."""
    from ladd.train.loop import train

    out = world / "drift"
    result = train(load_config(None, overrides(world, out, steps=12, **{
        "optim.lr_g": "0.3", "method.gen_update_interval": "1", "validation.every": "2",
        "health.on_collapse": '"stop"'})))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_drift" in r]
    assert val[0]["step"] == 0 and val[0]["val_drift"] == pytest.approx(1.0)
    assert result["stopped"] == "stop_collapse" and result["step"] < 12
    assert val[-1]["val_drift"] > HealthConfig().drift_factor


@pytest.mark.slow
@pytest.mark.parametrize("collapse_drift", [100.0, 1e-9])
def test_a_disc_at_chance_before_any_validation_gets_one_at_once_and_it_decides(world, capsys, collapse_drift):
    """The gap rule meeting a disc at chance with no fresh validation validates at the next step instead
    of firing (the demo's faster students used to be flagged at step 100, just before their first
    validation cleared them): a student near the teacher is excused, one further away stops the run."""
    from ladd.train.loop import train
    from ladd.train.health import read_metrics, replay

    out = world / f"on-demand-{collapse_drift:g}"
    # gap < 100 with d_loss > 0 over 3 steps: "at chance" from step 2 on, whatever the disc does.
    cfg = load_config(None, overrides(world, out, steps=10, **{
        "validation.every": "0", "health.collapse_window": "3", "health.collapse_gap": "100",
        "health.collapse_d_loss": "0", "health.collapse_drift": str(collapse_drift), "health.on_collapse": '"stop"'}))
    result = train(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    val_steps = [r["step"] for r in rows if "val_drift" in r]
    said = capsys.readouterr().out
    if collapse_drift > 1:
        # Validated at 3 (asked for after update 2), excused through update 6, asked again after update 7
        # (the validation is a window old), excused again, then the end.
        assert result["stopped"] is None and val_steps == [0, 3, 8, 10]
        assert "read as a student that fools the disc" in said and "collapse suspected" not in said
        assert replay(cfg.health, rows) == {"collapse_logits": False, "diversity": False, "drift": False,
                                            "excused_steps": 8}
    else:
        assert result["stopped"] == "stop_collapse" and result["step"] == 3 and val_steps == [0, 3]
        assert "logit gap has stayed near zero" in said and "validation drift is" in said
        assert replay(cfg.health, rows)["collapse_logits"]


def _collapse_once_at(monkeypatch, at_step: int) -> list[int]:
    """Make validation report a drifted student exactly once, at `at_step`; return the list that
    records every `ladd_step` call's step (and is_gen_step's) as the loop makes it."""
    import ladd.train.loop as loop
    from ladd.train.validation import Validator

    real_run, real_step, fired, steps = Validator.run, loop.ladd_step, [], []

    def run(self, step, student, teacher):
        metrics = real_run(self, step, student, teacher)
        if step == at_step and not fired:
            fired.append(step)
            metrics["val_drift"] = 99.0
        return metrics

    def record(models, opt_g, opt_d, micro, step, method, rng):
        steps.append(step)
        return real_step(models, opt_g, opt_d, micro, step, method, rng)

    monkeypatch.setattr(Validator, "run", run)
    monkeypatch.setattr(loop, "ladd_step", record)
    return steps


@pytest.mark.slow
def test_rollback_at_validation_goes_on_from_the_restored_step(world, monkeypatch, capsys):
    """A drift collapse seen by the validation at step 3 rolls back to the step-2 checkpoint: the next
    LADD step is step 2 again (its G/D schedule, curriculum and LR all from the restored step), and the
    run ends at its planned step count with the disc's LR halved."""
    from ladd.train.loop import train

    steps = _collapse_once_at(monkeypatch, at_step=3)
    result = train(load_config(None, overrides(world, world / "rollback", steps=6, **{
        "health.on_collapse": '"rollback"', "optim.warmup_steps": "6"})))
    assert steps == [0, 1, 2, 2, 3, 4, 5]
    assert result["step"] == 6 and result["stopped"] is None
    assert "rolled back to step 2; lr_d scaled by 0.5" in capsys.readouterr().out
    rows = [r for r in metrics_rows(world / "rollback") if "lr_g" in r]
    # The LR follows the step actually trained: step 2's warmup factor 3/6, once before and once after.
    assert [r["lr_g"] for r in rows if r["step"] == 3] == [pytest.approx(1e-3 * 3 / 6)] * 2
    assert [r["lr_d"] for r in rows if r["step"] == 3] == [pytest.approx(1e-3 * 3 / 6), pytest.approx(0.5e-3 * 3 / 6)]


@pytest.mark.slow
def test_rollback_without_a_checkpoint_stops_and_says_so(world, monkeypatch, capsys):
    """health.on_collapse = "rollback" before the first checkpoint has nothing to restore: one line
    says so and the run stops (a collapsed student is not trained on), reported as a collapse stop."""
    from ladd.train.loop import train

    steps = _collapse_once_at(monkeypatch, at_step=3)
    result = train(load_config(None, overrides(world, world / "rollback-none", steps=6, **{
        "health.on_collapse": '"rollback"', "train.checkpoint_every": "4"})))
    assert result["stopped"] == "stop_collapse" and result["step"] == 3 and steps == [0, 1, 2]
    assert "no checkpoint to roll back to yet (the first is due at step 4); stopping instead" in capsys.readouterr().out


@pytest.mark.slow
def test_8bit_adamw_on_fsdp2_is_refused_in_one_line(world):
    """bitsandbytes' AdamW8bit cannot step FSDP2's DTensor parameters (bitsandbytes#1633; measured
    on CPU gloo: "got mixed torch.Tensor and DTensor"): with more than one rank it is refused before
    anything loads, one line, exit 2."""
    proc = run_cli(overrides(world, world / "bnb", **{"optim.optimizer": '"adamw8bit"'}), nproc=2, check=False)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("ladd train: error:")]
    assert proc.returncode != 0 and lines and "cannot update FSDP2's sharded parameters (2 ranks)" in lines[0]
    assert not (world / "bnb" / "checkpoints").exists()
