"""Flow-matching math: formulas, samplers, curriculum, and schedules from diffusers."""

import math

import pytest
import torch

from ladd.flow import (
    Curriculum, default_call_shift, image_seq_len, interpolate, logit_normal, student_scheduler, student_sigmas,
    teacher_sigmas, velocity_target, x0_from_velocity,
)


def test_interpolate_and_velocity_to_x0_roundtrip():
    """Regression (no velocity→x0 conversion): x̂0 = x_t − t·v recovers x0 from the true velocity."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1.0, 0.5, 0.25])
    x_t = interpolate(x0, eps, t)
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * eps[2])
    torch.testing.assert_close(x_t[0], eps[0])  # σ = 1 is pure noise
    torch.testing.assert_close(x0_from_velocity(x_t, velocity_target(x0, eps), t), x0)
    assert (x0_from_velocity(x_t, velocity_target(x0, eps), t) - velocity_target(x0, eps)).abs().max() > 0.1


def test_logit_normal_clamp_and_median():
    g = torch.Generator().manual_seed(0)
    t = logit_normal(20000, m=1.0, s=1.0, generator=g)
    assert t.min() >= 0.001 and t.max() <= 0.999
    assert abs(t.median().item() - 1 / (1 + math.exp(-1))) < 0.01  # sigmoid(m) ≈ 0.731
    wide = logit_normal(20000, m=0.0, s=8.0, generator=g)
    assert wide.min() == 0.001 and wide.max() == 0.999


def test_curriculum_frequencies():
    cur = Curriculum(warmup_steps=10)
    g = torch.Generator().manual_seed(0)
    warm = cur.sample(step=3, n=20000, generator=g)
    assert set(warm.tolist()) == {0.5, 0.25}  # only the two easiest during warmup
    assert abs((warm == 0.25).float().mean().item() - 0.5) < 0.02
    main = cur.sample(step=10, n=40000, generator=g)
    for t, p in zip((1.0, 0.75, 0.5, 0.25), (0.7, 0.1, 0.1, 0.1)):
        assert abs((main == t).float().mean().item() - p) < 0.01


def test_curriculum_rejects_bad_settings():
    import pytest

    with pytest.raises(ValueError, match="sum to 1"):
        Curriculum(probs=(0.5, 0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="decreasing"):
        Curriculum(timesteps=(0.25, 0.5, 0.75, 1.0))


def test_scheduler_reaches_zero_in_50_and_4_steps(tiny_pipe):
    """Regression (linspace off-by-one left σ = 0.109): our schedules come from diffusers and end at 0."""
    for steps in (50, 4):
        sig = teacher_sigmas(tiny_pipe.scheduler, steps, image_seq_len(16, 16))
        assert len(sig) == steps + 1 and sig[0] == 1.0 and sig[-1] == 0.0
        assert bool((sig[1:] < sig[:-1]).all())
    assert teacher_sigmas(tiny_pipe.scheduler, 50, 64)[-2] < 0.07  # the last real step is nearly clean


@pytest.mark.slow
def test_teacher_sigmas_are_the_pipelines(tiny_pipe):
    tiny_pipe("x", height=32, width=32, num_inference_steps=50, guidance_scale=0.0,
              generator=torch.Generator().manual_seed(0), output_type="latent")
    torch.testing.assert_close(teacher_sigmas(tiny_pipe.scheduler, 50, 64), tiny_pipe.scheduler.sigmas)


def test_student_schedule_visits_training_timesteps():
    assert student_sigmas().tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # The exported scheduler's *default* 4-step call (ZImagePipeline: sigmas = linspace(1, 1/4, 4)).
    sched = student_scheduler()
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.25, 4).tolist())
    assert sched.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_the_exported_scheduler_shifts_the_default_call_onto_the_training_timesteps(tiny_pipe):
    """student_scheduler(timesteps): the shift that takes ZImagePipeline's default 4-step sigmas to the
    student's timesteps (3 for the teacher's spacing 1, .9, .75, .5), read off the transformer's own
    inputs in a real pipeline call; timesteps that no shift reaches get shift 1 (and need sigmas=)."""
    assert default_call_shift((1.0, 0.75, 0.5, 0.25)) == 1.0
    assert default_call_shift((1.0, 0.9, 0.75, 0.5)) == 3.0
    assert default_call_shift((1.0, 0.8, 0.5, 0.25)) is None
    assert student_scheduler((1.0, 0.8, 0.5, 0.25)).config.shift == 1.0
    seen, forward = [], tiny_pipe.transformer.forward
    tiny_pipe.transformer.forward = lambda x, t, *a, **k: (seen.append(t.tolist()), forward(x, t, *a, **k))[1]
    scheduler = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = student_scheduler((1.0, 0.9, 0.75, 0.5))
        tiny_pipe("x", height=32, width=32, num_inference_steps=4, guidance_scale=0.0,
                  generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        tiny_pipe.transformer.forward, tiny_pipe.scheduler = forward, scheduler
    # Z-Image's transformer takes t_model = 1 − σ
    assert [round(1 - t[0], 6) for t in seen] == [1.0, 0.9, 0.75, 0.5]
