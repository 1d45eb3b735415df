"""Trajectory windows in the LADD step (method.paired_target "trajectory"): the student's inputs and
targets along the teacher's own path, from the student's own states, the last step's rollout, and the
terms trained on the last step only. Gradients by hand on the tiny pipeline."""

import copy

import pytest
import torch

from ladd.config import ConfigError, MethodConfig
from ladd.flow import interpolate, logit_normal
from ladd.train.step import Batch, LaddModels, disc_inputs_no_grad, draw_noise, generator_step, trainable
from tests.steptools import Spy, assert_grads_equal, ladd_setup, recorded_grads

TS = (1.0, 0.9, 0.75, 0.5)  # the student's timesteps; the data hold the teacher's states at the last three


@pytest.fixture()
def setup():
    return ladd_setup()


def trajectory_data(batch: Batch):
    """(data, pair_eps, states, neg): `batch` with random stand-ins for each sample's teacher noise, the
    teacher's states at TS[1:] and the negative caption."""
    g = torch.Generator().manual_seed(9)
    pair_eps = torch.randn(batch.x0.shape, generator=g)
    states = torch.randn(2, 3, *batch.x0.shape[1:], generator=g)
    neg = torch.randn(3, batch.cap_feats[0].shape[1], generator=g)
    return Batch(batch.x0, batch.cap_feats, batch.text_cond, pair_eps, neg, states), pair_eps, states, neg


def seed_drawing(data: Batch, cfg: MethodConfig, timesteps: list[float]) -> int:
    """A seed whose step-0 draws put the two rows at these student timesteps (in either order)."""
    return next(s for s in range(100) if sorted(round(v, 4) for v in draw_noise(
        data, 0, cfg, torch.Generator().manual_seed(s))[0].tolist()) == sorted(timesteps))


def assert_paired_gradient(models, opt_g, data, cfg, seed, ref, x_t, t, target, rel=1e-5):
    """The G-step's student gradient is that of distill_weight·mean((x̂0 − target)²), x̂0 from `ref` (the
    student before the step) at x_t; its distill_loss metric is that mean."""
    x0_hat = x_t - t.view(-1, 1, 1, 1) * ref(x_t, t, data.cap_feats).velocity
    mse = (x0_hat - target).square().mean()
    (cfg.distill_weight * mse).backward()
    want = [p.grad for p in trainable(ref)]
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [data], 0, cfg, torch.Generator().manual_seed(seed))
    assert metrics["distill_loss"] == pytest.approx(mse.item(), rel=rel)
    assert_grads_equal(got, want)


@pytest.mark.parametrize("adversarial_rows, score_rows", [("last", "all"), ("all", "last")])
def test_trajectory_windows_start_on_the_teachers_path_and_aim_at_its_next_state(setup, adversarial_rows, score_rows):
    """method.paired_target = "trajectory": the student at t_k starts from the teacher's state there
    (ε_T at t = 1), and the paired target is the x0 whose Euler step from it lands on the teacher's
    state at t_{k+1} (x0 at the last step). method.adversarial_timesteps / score_timesteps "last": that
    term's gradient reaches only the rows at the last timestep. The student's gradient, by hand (the
    score target as in the test below); D-only steps start from the same states."""
    models, batch, opt_g, opt_d = setup
    data, pair_eps, states, neg = trajectory_data(batch)
    cfg = MethodConfig(distill_weight=2.0, score_weight=3.0, paired_target="trajectory",
                       adversarial_timesteps=adversarial_rows, score_timesteps=score_rows, student_timesteps=TS,
                       student_timestep_probs=(0, 0.5, 0, 0.5), grad_clip_g=0)
    seed = seed_drawing(data, cfg, [0.5, 0.9])  # a row at 0.9, one at the last
    rng = torch.Generator().manual_seed(seed)
    t, _, t_hat, eps1, _, _ = draw_noise(data, 0, cfg, rng)
    t_s, eps_s = logit_normal(2, 0.0, 1.0, generator=rng), torch.randn(batch.x0.shape, generator=rng)
    path = [pair_eps, states[:, 0], states[:, 1], states[:, 2], batch.x0]  # the teacher's path at TS, then x0
    x_t, target = torch.empty_like(batch.x0), torch.empty_like(batch.x0)
    for i in range(2):
        k = [round(v, 4) for v in TS].index(round(t[i].item(), 4))
        x_t[i] = path[k][i]
        # Euler: x_{k+1} = x_t + (t_{k+1} − t_k)·v with v = (x_t − x̂0)/t_k; solved for x̂0.
        target[i] = batch.x0[i] if k == 3 else x_t[i] - TS[k] * (x_t[i] - path[k + 1][i]) / (TS[k] - TS[k + 1])
        if k < 3:
            step = x_t[i] + (TS[k + 1] - TS[k]) * (x_t[i] - target[i]) / TS[k]
            torch.testing.assert_close(step, path[k + 1][i])
    ref, te = copy.deepcopy(models.student), models.teacher
    x0_hat = x_t - t.view(-1, 1, 1, 1) * ref(x_t, t, batch.cap_feats).velocity
    last = (t == 0.5).view(-1, 1, 1, 1)

    def rows(which):
        return torch.where(last, x0_hat, x0_hat.detach()) if which == "last" else x0_hat

    fake = interpolate(rows(adversarial_rows), eps1, t_hat)
    feats = te(fake, t_hat, batch.cap_feats, taps=models.disc.layers, velocity=False).feats
    x_s = interpolate(x0_hat.detach(), eps_s, t_s)
    with torch.no_grad():
        v_c, v_u = te(x_s, t_s, batch.cap_feats).velocity, te(x_s, t_s, [neg, neg]).velocity
    score_target = x_s - t_s.view(-1, 1, 1, 1) * (v_c + 5.0 * (v_c - v_u))
    mse = (x0_hat - target).square().mean()
    counted = last if score_rows == "last" else torch.ones_like(last)  # the rows the score term trains
    score = ((rows(score_rows) - score_target).square() * counted).mean()
    (-models.disc(feats, t_hat, batch.text_cond).mean() + 3.0 * score + 2.0 * mse).backward()
    want = [p.grad for p in trainable(ref)]
    spy, teacher_spy = Spy(models.student), Spy(te)
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [data], 0, cfg, torch.Generator().manual_seed(seed))
    (call,) = spy.calls
    torch.testing.assert_close(call["x"], x_t)
    assert metrics["distill_loss"] == pytest.approx(mse.item(), rel=1e-5)
    assert metrics["score_loss"] == pytest.approx(score.item(), rel=1e-5)
    assert_grads_equal(got, want)
    # A term on the last step only runs the teacher's graph (adversarial) or guided pass (score) on that
    # step's rows: the graph call holds 1 row, the guided call 2 (cond and uncond), the real and the
    # other fakes share one call without a graph.
    graph, guided = [c for c in teacher_spy.calls if c["grad"]], [c for c in teacher_spy.calls if not c["taps"]]
    assert [len(c["x"]) for c in graph] == [1 if adversarial_rows == "last" else 2]
    assert [len(c["x"]) for c in guided] == [2 if score_rows == "last" else 4]
    teacher_spy.handle.remove()
    spy.calls.clear()
    disc_inputs_no_grad(models, data, 1, cfg, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(spy.calls[0]["x"], x_t)
    with pytest.raises(ValueError, match=r"needs the teacher's states at \[0.9, 0.75, 0.5\]"):
        generator_step(models, opt_g, [Batch(batch.x0, batch.cap_feats, batch.text_cond, pair_eps, neg)], 0, cfg,
                       torch.Generator().manual_seed(seed))
    with pytest.raises(ConfigError, match="cannot run with distill_weight = 0: it is a paired term"):
        MethodConfig(paired_target="trajectory")
    with pytest.raises(ConfigError, match="cannot run with adversarial_noise = 'fresh'"):
        MethodConfig(paired_target="trajectory", distill_weight=1.0, adversarial_noise="fresh")


def test_trajectory_windows_from_the_students_own_states_aim_back_at_the_teachers_path(setup):
    """method.student_inputs "simulate" with paired_target "trajectory": the student at t_k starts where
    its own Euler steps from the pair's noise reach (no grad), and the paired target is the x0 whose
    Euler step from there lands on the teacher's state at t_{k+1} (x0 at the last step). By hand."""
    models, batch, opt_g, opt_d = setup
    data, pair_eps, states, _ = trajectory_data(batch)
    cfg = MethodConfig(distill_weight=2.0, adversarial_weight=0.0, paired_target="trajectory",
                       student_inputs="simulate", student_timesteps=TS, student_timestep_probs=(0, 0.5, 0.5, 0),
                       grad_clip_g=0)
    seed = seed_drawing(data, cfg, [0.75, 0.9])
    t = draw_noise(data, 0, cfg, torch.Generator().manual_seed(seed))[0]
    ref = copy.deepcopy(models.student)
    chain, x = [pair_eps], pair_eps
    with torch.no_grad():
        for now, nxt in zip(TS[:-1], TS[1:]):
            x = x + (nxt - now) * ref(x, torch.full((2,), now), batch.cap_feats).velocity
            chain.append(x)
    path = [pair_eps, states[:, 0], states[:, 1], states[:, 2], batch.x0]
    x_t, target = torch.empty_like(batch.x0), torch.empty_like(batch.x0)
    for i in range(2):
        k = [round(v, 4) for v in TS].index(round(t[i].item(), 4))
        x_t[i] = chain[k][i]
        target[i] = x_t[i] - TS[k] * (x_t[i] - path[k + 1][i]) / (TS[k] - TS[k + 1])
        step = x_t[i] + (TS[k + 1] - TS[k]) * (x_t[i] - target[i]) / TS[k]  # Euler with v = (x_t − x̂0)/t
        torch.testing.assert_close(step, path[k + 1][i])
    assert not torch.allclose(x_t, torch.stack([path[1 if v > 0.8 else 2][i] for i, v in enumerate(t.tolist())]))
    assert_paired_gradient(models, opt_g, data, cfg, seed, ref, x_t, t, target)


@pytest.mark.parametrize("chain", [0, 1, 2])
def test_last_step_rollout_starts_from_the_students_own_state_and_aims_where_the_teacher_takes_it(setup, chain):
    """method.last_step_rollout K: the rows at the last timestep start from the student's own state there
    (its Euler steps from the pair's noise, no grad; with last_step_chain k its last k steps from the
    teacher's state k timesteps earlier) and aim at the guided teacher's K Euler steps from that state
    to 0 (σ uniform); the other rows keep their windows. The student's gradient, by hand."""
    models, batch, opt_g, opt_d = setup
    data, pair_eps, states, neg = trajectory_data(batch)
    cfg = MethodConfig(distill_weight=2.0, adversarial_weight=0.0, paired_target="trajectory", last_step_rollout=3,
                       last_step_chain=chain, score_guidance=4.0, student_timesteps=TS,
                       student_timestep_probs=(0, 0.5, 0, 0.5), grad_clip_g=0)
    seed = seed_drawing(data, cfg, [0.5, 0.9])
    t = draw_noise(data, 0, cfg, torch.Generator().manual_seed(seed))[0]
    i_last, i_other = (0, 1) if t[0] == 0.5 else (1, 0)
    ref, te = copy.deepcopy(models.student), models.teacher
    caps_last = [batch.cap_feats[i_last]]
    first = len(TS) - 1 - chain if chain else 0  # the chain starts at TS[first]: ε, or the teacher's state there
    x = pair_eps[i_last : i_last + 1] if chain == 0 else states[i_last : i_last + 1, first - 1]
    with torch.no_grad():
        for now, nxt in zip(TS[first:-1], TS[first + 1 :]):
            x = x + (nxt - now) * ref(x, torch.full((1,), now), caps_last).velocity
        y = x
        for now, nxt in ((0.5, 1 / 3), (1 / 3, 1 / 6), (1 / 6, 0.0)):  # the teacher, CFG 4, 3 steps
            s_ = torch.full((1,), now)
            v_c, v_u = te(y, s_, caps_last).velocity, te(y, s_, [neg]).velocity
            y = y + (nxt - now) * (v_c + 4.0 * (v_c - v_u))
    x_t, target = torch.empty_like(batch.x0), torch.empty_like(batch.x0)
    x_t[i_last], target[i_last] = x[0], y[0]
    x_t[i_other] = states[i_other, 0]  # the teacher's state at 0.9, its window towards the one at 0.75
    target[i_other] = x_t[i_other] - 0.9 * (x_t[i_other] - states[i_other, 1]) / (0.9 - 0.75)
    assert_paired_gradient(models, opt_g, data, cfg, seed, ref, x_t, t, target, rel=1e-4)
    with pytest.raises(ConfigError, match="last_step_rollout > 0 needs paired_target = 'trajectory'"):
        MethodConfig(distill_weight=1.0, last_step_rollout=2)
    with pytest.raises(ConfigError, match="last_step_chain > 0 shortens the chain"):
        MethodConfig(distill_weight=1.0, paired_target="trajectory", last_step_chain=1)
    with pytest.raises(ConfigError, match="last_step_chain 3 must be below 3"):
        MethodConfig(distill_weight=1.0, paired_target="trajectory", last_step_rollout=2, last_step_chain=3,
                     student_timesteps=TS, student_timestep_probs=(0.25,) * 4)


def test_rollout_steps_start_the_earlier_steps_from_the_students_own_state_towards_the_teachers_next_one(setup):
    """method.rollout_steps 2: the rows at the step before the last also start from the student's own
    state there (its Euler steps from the pair's noise) and aim at the x0 whose Euler step from it
    lands where the guided teacher's K Euler steps take it to the next timestep (σ uniform from 0.75
    to 0.5); the last step's rows as with rollout_steps 1. The student's gradient, by hand."""
    models, batch, opt_g, opt_d = setup
    data, pair_eps, states, neg = trajectory_data(batch)
    cfg = MethodConfig(distill_weight=2.0, adversarial_weight=0.0, paired_target="trajectory", last_step_rollout=2,
                       rollout_steps=2, score_guidance=4.0, student_timesteps=TS,
                       student_timestep_probs=(0, 0, 0.5, 0.5), grad_clip_g=0)
    assert cfg.rollout_timesteps == (0.75, 0.5)
    seed = seed_drawing(data, cfg, [0.5, 0.75])
    t = draw_noise(data, 0, cfg, torch.Generator().manual_seed(seed))[0]
    ref, te = copy.deepcopy(models.student), models.teacher
    x_t, target = torch.empty_like(batch.x0), torch.empty_like(batch.x0)
    for i in range(2):
        caps = [batch.cap_feats[i]]
        k = [round(v, 4) for v in TS].index(round(t[i].item(), 4))
        x = pair_eps[i : i + 1]
        with torch.no_grad():
            for now, nxt in zip(TS[:k], TS[1 : k + 1]):  # the student's own steps from the pair's noise
                x = x + (nxt - now) * ref(x, torch.full((1,), now), caps).velocity
            end = TS[k + 1] if k + 1 < len(TS) else 0.0
            y, mid = x, (TS[k] + end) / 2
            for now, nxt in ((TS[k], mid), (mid, end)):  # the teacher, CFG 4, 2 steps
                s_ = torch.full((1,), now)
                v_c, v_u = te(y, s_, caps).velocity, te(y, s_, [neg]).velocity
                y = y + (nxt - now) * (v_c + 4.0 * (v_c - v_u))
        x_t[i] = x[0]
        target[i] = y[0] if end == 0 else x[0] - TS[k] * (x[0] - y[0]) / (TS[k] - end)
    assert_paired_gradient(models, opt_g, data, cfg, seed, ref, x_t, t, target, rel=1e-4)
    with pytest.raises(ConfigError, match="rollout_steps 4 must be below 4"):
        MethodConfig(distill_weight=1.0, paired_target="trajectory", last_step_rollout=2, rollout_steps=4,
                     student_timesteps=TS, student_timestep_probs=(0.25,) * 4)
    with pytest.raises(ConfigError, match="last_step_chain > 0 shortens the last step's chain only"):
        MethodConfig(distill_weight=1.0, paired_target="trajectory", last_step_rollout=2, rollout_steps=2,
                     last_step_chain=1, student_timesteps=TS, student_timestep_probs=(0.25,) * 4)


def test_terms_on_the_last_step_with_no_row_there_still_call_the_teacher_and_train_nothing(setup):
    """adversarial_timesteps / score_timesteps "last" on a micro-batch with no row at the last timestep:
    the teacher's graph call and its guided call still run (on row 0: every rank makes the same calls,
    as FSDP's collectives need), the two terms add no gradient and the score term counts zero."""
    models, batch, opt_g, opt_d = setup
    data, pair_eps, states, neg = trajectory_data(batch)
    grads = {}
    for name, extra in (("last", dict(score_weight=3.0, adversarial_timesteps="last", score_timesteps="last")),
                        ("paired only", dict(adversarial_weight=0.0))):
        cfg = MethodConfig(distill_weight=2.0, paired_target="trajectory", student_timesteps=TS,
                           student_timestep_probs=(0, 0.5, 0.5, 0), grad_clip_g=0, **extra)
        student = copy.deepcopy(models.student)
        opt = torch.optim.SGD(trainable(student), lr=0.0)
        spy = Spy(models.teacher)
        with recorded_grads(opt, student) as got:
            metrics, inputs = generator_step(LaddModels(student, models.teacher, models.disc), opt, [data], 0, cfg,
                                             torch.Generator().manual_seed(3))
        spy.handle.remove()
        grads[name] = got
        if name == "last":
            assert metrics["score_loss"] == 0.0
            assert [len(c["x"]) for c in spy.calls if c["grad"]] == [1]  # the graph call, on row 0
            assert [len(c["x"]) for c in spy.calls if not c["taps"]] == [2]  # the guided call, row 0's cond + uncond
            assert all(len(f) == 2 for f in inputs[0].fake.values())  # the disc still judges every row
    assert_grads_equal(grads["last"], grads["paired only"])


def test_distill_timestep_weights_scale_each_rows_paired_error(setup):
    """method.distill_timestep_weights: each row's squared error in the paired term is weighted by its
    timestep's weight, the mean still over every element; the metric is that weighted mean. By hand."""
    models, batch, opt_g, opt_d = setup
    data, pair_eps, states, _ = trajectory_data(batch)
    cfg = MethodConfig(distill_weight=2.0, adversarial_weight=0.0, paired_target="trajectory", student_timesteps=TS,
                       student_timestep_probs=(0, 0.5, 0, 0.5), distill_timestep_weights=(0.5, 0.25, 1.0, 4.0),
                       grad_clip_g=0)
    seed = seed_drawing(data, cfg, [0.5, 0.9])
    t = draw_noise(data, 0, cfg, torch.Generator().manual_seed(seed))[0]
    ref = copy.deepcopy(models.student)
    x_t, target, w = torch.empty_like(batch.x0), torch.empty_like(batch.x0), torch.empty(2)
    for i in range(2):
        if t[i] == 0.5:
            x_t[i], target[i], w[i] = states[i, 2], batch.x0[i], 4.0
        else:
            x_t[i], w[i] = states[i, 0], 0.25
            target[i] = x_t[i] - 0.9 * (x_t[i] - states[i, 1]) / (0.9 - 0.75)
    x0_hat = x_t - t.view(-1, 1, 1, 1) * ref(x_t, t, batch.cap_feats).velocity
    weighted = (w.view(-1, 1, 1, 1) * (x0_hat - target).square()).mean()
    (2.0 * weighted).backward()
    want = [p.grad for p in trainable(ref)]
    with recorded_grads(opt_g, models.student) as got:
        metrics, _ = generator_step(models, opt_g, [data], 0, cfg, torch.Generator().manual_seed(seed))
    assert metrics["distill_loss"] == pytest.approx(weighted.item(), rel=1e-5)
    assert_grads_equal(got, want)
    for bad in ((1.0, 1.0, 1.0), (1.0, 1.0, -1.0, 1.0)):
        with pytest.raises(ConfigError, match="distill_timestep_weights"):
            MethodConfig(distill_weight=1.0, student_timesteps=TS, distill_timestep_weights=bad)
