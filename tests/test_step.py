"""The LADD step on the tiny pipeline: each of the public run's failures pinned by a named test."""

import copy

import pytest
import torch

from ladd.config import ConfigError, MethodConfig
from ladd.flow import interpolate, logit_normal
from ladd.losses import hinge_d_loss
from ladd.train.step import (
    Batch, DiscInputs, discriminator_step, disc_inputs_no_grad, draw_noise, generator_step, ladd_step, trainable,
)
from tests.steptools import Spy, assert_grads_equal, ladd_setup, recorded_grads


@pytest.fixture()
def setup():
    return ladd_setup()


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.slow
def test_student_input_is_interpolated_teacher_latent(setup):
    """Regression (student fed pure noise): at t = 0.25 the input is 75 % teacher latent."""
    models, batch, opt_g, opt_d = setup
    cfg = MethodConfig(student_timesteps=(1.0, 0.75, 0.5, 0.25), student_timestep_probs=(0, 0, 0, 1.0))
    spy = Spy(models.student)
    rng = torch.Generator().manual_seed(7)
    t, eps, *_ = draw_noise(batch, 0, cfg, torch.Generator().manual_seed(7))
    generator_step(models, opt_g, [batch], 0, cfg, rng)
    (call,) = spy.calls
    assert torch.equal(t, torch.full((2,), 0.25))
    torch.testing.assert_close(call["x"], 0.75 * batch.x0 + 0.25 * eps)
    torch.testing.assert_close(call["sigma"], t)


@pytest.mark.slow
def test_simulated_student_input_is_the_students_own_few_step_inference(setup):
    """method.student_inputs = "simulate": the input at each t is where the student's own Euler steps
    from ε reach (ladd.sampling.euler_sample over the timesteps down to t), built without a graph in
    len(timesteps) − 1 forwards whatever the batch's t; then the graded forward sees it."""
    from ladd.flow import student_sigmas
    from ladd.sampling import euler_sample

    models, batch, opt_g, opt_d = setup
    ts = (1.0, 0.75, 0.5, 0.25)
    for t_index in range(4):
        probs = tuple(float(i == t_index) for i in range(4))
        cfg = MethodConfig(student_timesteps=ts, student_timestep_probs=probs, student_inputs="simulate")
        t, eps, *_ = draw_noise(batch, 0, cfg, torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = euler_sample(models.student, eps, student_sigmas(ts)[:t_index + 1], batch.cap_feats)
        spy = Spy(models.student)
        frozen_student = torch.optim.SGD(trainable(models.student), lr=0.0)  # the next t meets the same weights
        generator_step(models, frozen_student, [batch], 0, cfg, torch.Generator().manual_seed(7))
        spy.handle.remove()
        assert len(spy.calls) == 4 and [c["grad"] for c in spy.calls] == [False] * 3 + [True]
        assert [float(c["sigma"][0]) for c in spy.calls[:3]] == list(ts[:3])
        torch.testing.assert_close(spy.calls[-1]["x"], expected)
        torch.testing.assert_close(spy.calls[-1]["sigma"], t)
        if t_index == 0:
            assert torch.equal(spy.calls[-1]["x"], eps)  # at t = 1 simulation and interpolation agree


@pytest.mark.slow
def test_on_policy_adversarial_inputs_judge_the_later_steps_on_the_students_own_states(setup):
    """method.adversarial_inputs = "simulate": the paired term keeps the interpolated pass; the rows at
    t < 1 are run again from the student's own Euler steps from the pair's noise, and that x̂0 is the
    fake the teacher re-noises for the disc (and the score term's). Rows at t = 1 keep the first pass;
    with every row at t = 1, one more pass on row 0 reproduces it."""
    from ladd.flow import student_sigmas, x0_from_velocity
    from ladd.sampling import euler_sample

    models, batch, opt_g, opt_d = setup
    batch.pair_eps = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(4))
    ts = (1.0, 0.75, 0.5, 0.25)
    for probs in ((0.5, 0.0, 0.5, 0.0), (1.0, 0.0, 0.0, 0.0)):
        cfg = MethodConfig(student_timesteps=ts, student_timestep_probs=probs, distill_weight=2.0,
                           adversarial_inputs="simulate")
        seed = next(s for s in range(100) if probs[0] == 1 or
                    len(set(draw_noise(batch, 0, cfg, torch.Generator().manual_seed(s))[0].tolist())) == 2)
        t, _, t_hat, eps1, _, pair = draw_noise(batch, 0, cfg, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            v = models.student(interpolate(batch.x0, pair, t), t, batch.cap_feats).velocity
            x0_interp = x0_from_velocity(interpolate(batch.x0, pair, t), v, t)
            want = x0_interp.clone()
            for i in range(len(t)):
                k = ts.index(float(t[i]))
                if k > 0:
                    x_t = euler_sample(models.student, pair[i:i + 1], student_sigmas(ts)[:k + 1],
                                       batch.cap_feats[i:i + 1])
                    v_i = models.student(x_t, t[i:i + 1], batch.cap_feats[i:i + 1]).velocity
                    want[i] = x0_from_velocity(x_t, v_i, t[i:i + 1])[0]
        student_spy, teacher_spy = Spy(models.student), Spy(models.teacher)
        frozen_student = torch.optim.SGD(trainable(models.student), lr=0.0)
        metrics, _ = generator_step(models, frozen_student, [batch], 0, cfg, torch.Generator().manual_seed(seed))
        student_spy.handle.remove(), teacher_spy.handle.remove()
        rows = (t < 1).sum().item() or 1
        # the interpolated pass, len(ts) − 1 simulation steps and the graded pass on the later rows
        assert [len(c["x"]) for c in student_spy.calls] == [2] + [rows] * 4
        assert [c["grad"] for c in student_spy.calls] == [True, False, False, False, True]
        fake = next(c for c in teacher_spy.calls if c["grad"])["x"]
        torch.testing.assert_close(fake, interpolate(want, eps1, t_hat), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(metrics["distill_loss"], (x0_interp - batch.x0).square().mean().item(),
                                   rtol=1e-4, atol=0)
        if probs[0] == 1:
            torch.testing.assert_close(want, x0_interp)


@pytest.mark.slow
def test_real_samples_are_renoised_teacher_latents(setup):
    """Regression ("real" = noise mixed with noise): real = (1 − t̂)·x0 + t̂·ε2, sharing t̂ with fake."""
    models, batch, opt_g, opt_d = setup
    cfg = MethodConfig()
    spy = Spy(models.teacher)
    _, _, t_hat, _, eps2, _ = draw_noise(batch, 1, cfg, torch.Generator().manual_seed(3))
    disc_inputs_no_grad(models, batch, 1, cfg, torch.Generator().manual_seed(3))
    (call,) = spy.calls  # D-only step: real and fake in one teacher batch
    real = call["x"][:2]
    torch.testing.assert_close(real, interpolate(batch.x0, eps2, t_hat))
    torch.testing.assert_close(call["sigma"], torch.cat([t_hat, t_hat]))
    # The teacher latent is really in there: remove it and only the noise part is left.
    torch.testing.assert_close(real - (1 - t_hat).view(-1, 1, 1, 1) * batch.x0, t_hat.view(-1, 1, 1, 1) * eps2)


@pytest.mark.slow
def test_g_step_moves_only_the_student(setup):
    """Gradients flow student -> frozen teacher -> disc; only the student is updated."""
    models, batch, opt_g, opt_d = setup
    before = {n: _snapshot(m) for n, m in (("student", models.student), ("teacher", models.teacher),
                                           ("disc", models.disc))}
    spy = Spy(models.teacher)
    grads, opt_step = [], opt_g.step
    opt_g.step = lambda *a: (grads.extend(p.grad for p in trainable(models.student)), opt_step(*a))
    metrics, inputs = generator_step(models, opt_g, [batch], 0, MethodConfig(), torch.Generator().manual_seed(0))
    assert len(grads) == len(trainable(models.student)) and all(g is not None for g in grads)
    assert all(p.grad is None for p in trainable(models.student))  # freed right after the update
    total = torch.sqrt(sum(g.square().sum() for g in grads))
    assert torch.isfinite(total) and total > 0 and metrics["student_grad_norm"] > 0
    assert _changed(before["student"], models.student)
    assert not _changed(before["teacher"], models.teacher)
    assert not _changed(before["disc"], models.disc)
    assert all(p.grad is None for p in models.disc.parameters())  # disc frozen for the G-step
    assert all(p.grad is None and not p.requires_grad for p in models.teacher.parameters())
    assert all(p.requires_grad for p in models.disc.parameters())  # restored afterwards
    # One real pass without graph, one fake pass with a live graph; the fake features are reused.
    assert [c["grad"] for c in spy.calls] == [False, True]
    assert not any(f.requires_grad for f in inputs[0].fake.values())


def test_d_only_step_builds_no_student_graph(setup):
    models, batch, opt_g, opt_d = setup
    before = _snapshot(models.student)
    s_spy, t_spy = Spy(models.student), Spy(models.teacher)
    metrics = ladd_step(models, opt_g, opt_d, [batch], 1, MethodConfig(), torch.Generator().manual_seed(0))
    assert metrics["gen_step"] == 0.0
    assert [c["grad"] for c in s_spy.calls] == [False]
    assert len(t_spy.calls) == 1  # real and fake as one teacher batch
    assert not _changed(before, models.student)
    assert all(p.grad is None for p in trainable(models.student))


def test_ladd_step_schedule_and_metrics(setup):
    models, batch, opt_g, opt_d = setup
    cfg = MethodConfig(gen_update_interval=3)
    t_spy = Spy(models.teacher)
    rng = torch.Generator().manual_seed(0)
    gen = []
    for step in range(6):
        d_before = _snapshot(models.disc)
        m = ladd_step(models, opt_g, opt_d, [batch], step, cfg, rng)
        gen.append(m["gen_step"])
        assert _changed(d_before, models.disc)  # the disc updates every step
        for key in ("d_loss", "g_loss", "accuracy_real", "accuracy_fake", "logit_gap", "t_hat_mean",
                    "disc_grad_norm", "layer_1_real", "layer_5_fake"):
            assert key in m and torch.isfinite(torch.tensor(m[key]))
    assert gen == [1.0, 0, 0, 1.0, 0, 0]
    assert len(t_spy.calls) == 2 * 2 + 4 * 1  # G-steps: real + fake; D-only: one joint pass
    assert all(c["taps"] == [1, 3, 5] or tuple(c["taps"]) == (1, 3, 5) for c in t_spy.calls)


def test_disc_warmup_holds_the_student_then_keeps_the_interval(setup):
    models, batch, opt_g, opt_d = setup
    cfg = MethodConfig(gen_update_interval=3, disc_warmup_steps=2)
    rng = torch.Generator().manual_seed(0)
    gen, s_before = [], _snapshot(models.student)
    for step in range(6):
        gen.append(ladd_step(models, opt_g, opt_d, [batch], step, cfg, rng)["gen_step"])
        if step == 1:
            assert not _changed(s_before, models.student)  # steps 0 and 1: the disc alone
    assert gen == [0, 0, 1.0, 0, 0, 1.0] and _changed(s_before, models.student)
    with pytest.raises(ConfigError, match="disc_warmup_steps must be >= 0"):
        MethodConfig(disc_warmup_steps=-1)


@pytest.mark.parametrize("adversarial", [1.0, 0.0])
def test_distillation_uses_the_teacher_noise_and_adds_the_regression(setup, adversarial):
    """method.distill_weight λ: the student input is (1 − t)·x0 + t·ε_T with x0's own initial noise ε_T,
    and the student's gradient is that of a·g_loss + λ·mean((x̂0 − x0)²), computed here by hand
    (a = method.adversarial_weight; 0 is the ablation "distillation alone")."""
    models, batch, opt_g, opt_d = setup
    pair_eps = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(9))
    paired = Batch(batch.x0, batch.cap_feats, batch.text_cond, pair_eps)
    cfg = MethodConfig(distill_weight=2.0, adversarial_weight=adversarial, student_timestep_probs=(0, 0, 0, 1.0))
    # By hand, on a copy of the student, from the same random draws.
    t, _, t_hat, eps1, _, _ = draw_noise(paired, 0, cfg, torch.Generator().manual_seed(4))
    ref = copy.deepcopy(models.student)
    x_t = 0.75 * batch.x0 + 0.25 * pair_eps
    x0_hat = x_t - t.view(-1, 1, 1, 1) * ref(x_t, t, batch.cap_feats).velocity
    feats = models.teacher(interpolate(x0_hat, eps1, t_hat), t_hat, batch.cap_feats, taps=models.disc.layers,
                           velocity=False).feats
    mse = (x0_hat - batch.x0).square().mean()
    (-adversarial * models.disc(feats, t_hat, batch.text_cond).mean() + 2.0 * mse).backward()
    want = [p.grad for p in trainable(ref)]
    spy = Spy(models.student)
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [paired], 0, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(spy.calls[0]["x"], x_t)
    assert metrics["distill_loss"] == pytest.approx(mse.item(), rel=1e-5)
    assert_grads_equal(got, want)
    # D-only steps draw the student's input from the same paired noise.
    spy.calls.clear()
    disc_inputs_no_grad(models, paired, 1, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(spy.calls[0]["x"], x_t)
    with pytest.raises(ConfigError, match="distill_weight must be >= 0"):
        MethodConfig(distill_weight=-1)
    with pytest.raises(ConfigError, match="the student has no loss"):
        MethodConfig(adversarial_weight=0)


def test_fresh_adversarial_noise_judges_a_second_pass_on_new_noise(setup):
    """method.adversarial_noise = "fresh": the disc's fake comes from x_t = (1 − t)·x0 + t·ε with the
    step's fresh ε, the paired term from a second pass on x0's own noise ε_T; the student's gradient is
    that of −disc(fake from the fresh pass) + λ·mean((x̂0_pair − x0)²), by hand; D-only steps use ε."""
    models, batch, opt_g, opt_d = setup
    pair_eps = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(9))
    paired = Batch(batch.x0, batch.cap_feats, batch.text_cond, pair_eps)
    cfg = MethodConfig(distill_weight=2.0, adversarial_noise="fresh", student_timestep_probs=(0, 0, 0, 1.0))
    t, eps, t_hat, eps1, _, pair = draw_noise(paired, 0, cfg, torch.Generator().manual_seed(4))
    assert pair is pair_eps and not torch.equal(eps, pair_eps)
    ref = copy.deepcopy(models.student)

    def x0_of(x_t):
        return x_t - t.view(-1, 1, 1, 1) * ref(x_t, t, batch.cap_feats).velocity

    x_fresh, x_pair = 0.75 * batch.x0 + 0.25 * eps, 0.75 * batch.x0 + 0.25 * pair_eps
    feats = models.teacher(interpolate(x0_of(x_fresh), eps1, t_hat), t_hat, batch.cap_feats,
                           taps=models.disc.layers, velocity=False).feats
    mse = (x0_of(x_pair) - batch.x0).square().mean()
    (-models.disc(feats, t_hat, batch.text_cond).mean() + 2.0 * mse).backward()
    want = [p.grad for p in trainable(ref)]
    spy = Spy(models.student)
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [paired], 0, cfg, torch.Generator().manual_seed(4))
    assert len(spy.calls) == 2
    torch.testing.assert_close(spy.calls[0]["x"], x_fresh)
    torch.testing.assert_close(spy.calls[1]["x"], x_pair)
    assert metrics["distill_loss"] == pytest.approx(mse.item(), rel=1e-5)
    assert_grads_equal(got, want)
    spy.calls.clear()
    disc_inputs_no_grad(models, paired, 1, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(spy.calls[0]["x"], x_fresh)
    with pytest.raises(ConfigError, match="adversarial_noise"):
        MethodConfig(adversarial_noise="both")


def test_score_distillation_pulls_x0_hat_towards_the_guided_teachers_denoising(setup):
    """method.score_weight w (ADD's distillation term): after the step's draws, t_s ~ logit-normal(m, s)
    and ε_s; x_s = (1 − t_s)·sg(x̂0) + t_s·ε_s; the teacher's guided velocity v = v_c + g·(v_c − v_u)
    (the negative caption for v_u, each half its own call here) gives x̂0_T = x_s − t_s·v; the student's
    gradient is that of −disc(fake) + w·mean((x̂0 − x̂0_T)²), by hand."""
    models, batch, opt_g, opt_d = setup
    neg = torch.randn(3, batch.cap_feats[0].shape[1], generator=torch.Generator().manual_seed(2))
    scored = Batch(batch.x0, batch.cap_feats, batch.text_cond, neg_cap=neg)
    cfg = MethodConfig(score_weight=3.0, score_renoise_m=0.5, score_renoise_s=0.7, score_guidance=4.0,
                       student_timestep_probs=(1.0, 0, 0, 0), grad_clip_g=0)
    rng = torch.Generator().manual_seed(4)
    t, eps, t_hat, eps1, _, _ = draw_noise(scored, 0, cfg, rng)
    t_s = logit_normal(2, 0.5, 0.7, generator=rng)
    eps_s = torch.randn(batch.x0.shape, generator=rng)
    ref, te = copy.deepcopy(models.student), models.teacher
    x_t = eps  # t = 1: pure noise
    x0_hat = x_t - ref(x_t, t, batch.cap_feats).velocity
    x_s = (1 - t_s.view(-1, 1, 1, 1)) * x0_hat.detach() + t_s.view(-1, 1, 1, 1) * eps_s
    with torch.no_grad():
        v_c = te(x_s, t_s, batch.cap_feats).velocity
        v_u = te(x_s, t_s, [neg, neg]).velocity
    target = x_s - t_s.view(-1, 1, 1, 1) * (v_c + 4.0 * (v_c - v_u))
    feats = te(interpolate(x0_hat, eps1, t_hat), t_hat, batch.cap_feats, taps=models.disc.layers, velocity=False).feats
    score = (x0_hat - target).square().mean()
    (-models.disc(feats, t_hat, batch.text_cond).mean() + 3.0 * score).backward()
    want = [p.grad for p in trainable(ref)]
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [scored], 0, cfg, torch.Generator().manual_seed(4))
    assert metrics["score_loss"] == pytest.approx(score.item(), rel=1e-5)
    assert_grads_equal(got, want)
    with pytest.raises(ValueError, match="negative prompt's caption features"):
        generator_step(models, opt_g, [batch], 0, cfg, torch.Generator().manual_seed(4))
    with pytest.raises(ConfigError, match="score_weight must be >= 0"):
        MethodConfig(score_weight=-1)
    with pytest.raises(ConfigError, match="score_renoise_s must be > 0"):
        MethodConfig(score_renoise_s=0)
    MethodConfig(score_weight=1.0, adversarial_weight=0)  # the term alone is a loss


def test_mismatched_captions_are_fakes_for_the_disc(setup):
    """method.mismatch_weight w: the D-step adds w × the fake half of the disc loss on the real
    features judged under the next sample's caption (text_cond rolled by one); a row whose rolled
    caption is its own weighs nothing. The disc's gradient equals that loss's, by hand."""
    models, batch, opt_g, opt_d = setup
    cfg = MethodConfig(mismatch_weight=0.5, grad_clip_d=0)  # unclipped: the gradient itself
    x = disc_inputs_no_grad(models, batch, 1, cfg, torch.Generator().manual_seed(0))
    rows = [0, 1, 0]  # a repeated caption: rolled by one, row 0 meets its own (row 2's) caption
    repeated = DiscInputs({k: f[rows] for k, f in x.real.items()}, {k: f[rows] for k, f in x.fake.items()},
                          x.t_hat[rows], x.text_cond[rows])
    for xi, weight in ((x, torch.tensor([1.0, 1.0])), (repeated, torch.tensor([0.0, 1.0, 1.0]))):
        cond = xi.text_cond
        ref = copy.deepcopy(models.disc)
        real, fake = ref(xi.real, xi.t_hat, cond), ref(xi.fake, xi.t_hat, cond)
        mis = ref(xi.real, xi.t_hat, cond.roll(1, dims=0))
        per = torch.relu(1 + mis).mean(dim=1)
        want_mis = (per * weight).sum() / weight.sum()
        (hinge_d_loss(real, fake) + 0.5 * want_mis).backward()
        want = [p.grad.clone() for p in trainable(ref)]
        before = copy.deepcopy(models.disc.state_dict())
        with recorded_grads(opt_d, models.disc) as got:
            m = discriminator_step(models.disc, opt_d, [xi], cfg)
        models.disc.load_state_dict(before)  # the next case starts from the same disc
        assert m["mismatch_loss"] == pytest.approx(want_mis.item(), rel=1e-5)
        assert 0 <= m["accuracy_mismatch"] <= 1
        assert_grads_equal(got, want)
    with pytest.raises(ConfigError, match="mismatch_weight must be >= 0"):
        MethodConfig(mismatch_weight=-1)


def test_d_step_moves_only_the_disc_and_r1(setup):
    models, batch, opt_g, opt_d = setup
    cfg = MethodConfig(r1_weight=1.0)
    inputs = [disc_inputs_no_grad(models, batch, 1, cfg, torch.Generator().manual_seed(0))]
    s_before, d_before = _snapshot(models.student), _snapshot(models.disc)
    m = discriminator_step(models.disc, opt_d, inputs, cfg)
    assert _changed(d_before, models.disc) and not _changed(s_before, models.student)
    assert m["r1"] > 0 and m["disc_grad_norm"] > 0


def test_micro_batch_of_one_refused_with_hinge(setup):
    models, batch, opt_g, opt_d = setup
    one = Batch(batch.x0[:1], batch.cap_feats[:1], batch.text_cond[:1])
    with pytest.raises(ValueError, match="hinge loss with a per-rank micro-batch of 1 saturates"):
        ladd_step(models, opt_g, opt_d, [one], 0, MethodConfig(), torch.Generator())
    for cfg in (MethodConfig(allow_hinge_batch_of_one=True), MethodConfig(loss="nonsaturating")):
        ladd_step(models, opt_g, opt_d, [one], 0, cfg, torch.Generator())


def test_gradient_accumulation_runs_each_micro_batch(setup):
    models, batch, opt_g, opt_d = setup
    spy = Spy(models.student)
    ladd_step(models, opt_g, opt_d, [batch, batch], 0, MethodConfig(), torch.Generator().manual_seed(0))
    assert len(spy.calls) == 2 and opt_g.state  # one optimizer step after two micro-batches
    assert all(len(s) and int(s["step"]) == 1 for s in opt_g.state.values())
