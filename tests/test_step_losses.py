"""bench/step_losses.py: each row is the teacher's own path to t_k, then the student's own steps from there."""

import importlib.util
from pathlib import Path

import torch

from ladd.eval.samplers import teacher_sampler, untrained_sampler
from ladd.models.loading import TOY_PIPELINE, load_pipeline
from ladd.models.text import encode_prompts
from ladd.sampling import euler_sample, initial_noise
from ladd.toy import world
from ladd.toy.build import pipeline_world

BENCH = Path(__file__).parents[1] / "bench" / "step_losses.py"


def _bench():
    spec = importlib.util.spec_from_file_location("step_losses", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_the_teacher_path_then_the_student_steps():
    pipe = load_pipeline(TOY_PIPELINE, torch.device("cpu"), torch.float32)
    teacher = teacher_sampler(pipe, 6, 5.0)  # 6 steps: the student's 0.9, 0.75, 0.5 fall inside its steps
    student = untrained_sampler(pipe, 4, [1.0, 0.9, 0.75, 0.5])
    prompts, seeds = world.prompts(3, "eval", seed=1, **pipeline_world("toy")), [11, 12, 13]
    rows = _bench().suffix_latents(teacher, student, prompts, seeds, 64, batch_size=3)
    assert len(rows) == 5 and all(r.shape == (3, 16, 16, 16) for r in rows)
    # first row: the student alone; last: the teacher alone (each sampler's own latents)
    torch.testing.assert_close(rows[0], student.latents(prompts, seeds, 64, 3), rtol=0, atol=1e-5)
    torch.testing.assert_close(rows[-1], teacher.latents(prompts, seeds, 64, 3), rtol=0, atol=1e-5)
    # the row before the teacher's: its recorded state at 0.5 (on its Euler line), then one student step
    caps, neg = encode_prompts(pipe, prompts), encode_prompts(pipe, [""])[0]
    noise = initial_noise(pipe, seeds, 64)
    with torch.no_grad():
        _, states = euler_sample(teacher.adapter, noise, teacher.sigmas_at((16, 16)), caps, [neg] * 3, 5.0, record=[0.5])
        x = states[:, 0]
        last = x - 0.5 * student.adapter(x, torch.full((3,), 0.5), caps).velocity
    torch.testing.assert_close(rows[3], last, rtol=0, atol=1e-5)
    assert (rows[3] - rows[0]).abs().max() > 0.1 and (rows[3] - rows[4]).abs().max() > 0.1  # the rows differ
