"""A seconds-long end-to-end smoke run on a CPU, no teacher needed: build a random-weight tiny
ZImagePipeline, make teacher latents (50 steps, CFG 5) through the adapter, run a few LADD steps,
sample the student in 4 steps, and say what happened at each stage. It checks that the installation
works end to end; `ladd demo` (without --smoke) is the real job on the toy teacher.

    ladd demo --smoke
"""

from __future__ import annotations

import copy
import time

import torch

from ladd.config import MethodConfig
from ladd.flow import image_seq_len, student_sigmas, teacher_sigmas
from ladd.models.discriminator import Discriminator
from ladd.models.text import encode_prompts, pooled
from ladd.models.tiny import TinyConfig, build_tiny_pipeline
from ladd.models.zimage import ZImageAdapter
from ladd.sampling import euler_sample, initial_noise
from ladd.train.step import Batch, LaddModels, ladd_step, trainable

PROMPTS = [
    "a red circle on a white background",
    "a blue square on a gray background",
    "a green triangle on a black background",
    "an orange circle on a purple background",
]


def run_smoke(seed: int = 0, steps: int = 6) -> dict[str, float]:
    t0 = time.perf_counter()
    cfg_tiny = TinyConfig(seed=seed)
    pipe = build_tiny_pipeline(cfg_tiny)
    teacher = ZImageAdapter(pipe.transformer)
    print(f"[1/5] tiny ZImagePipeline: {cfg_tiny.n_layers}-layer transformer, dim {cfg_tiny.dim}, "
          f"{cfg_tiny.image_size}px images (random weights: this checks plumbing, not quality)")

    caps = encode_prompts(pipe, PROMPTS)
    neg = encode_prompts(pipe, [""] * len(PROMPTS))
    print(f"[2/5] encoded {len(PROMPTS)} prompts with ZImagePipeline.encode_prompt: "
          f"token counts {[len(c) for c in caps]}")

    res = cfg_tiny.image_size
    noise = initial_noise(pipe, range(seed, seed + len(PROMPTS)), res)
    sig = teacher_sigmas(pipe.scheduler, 50, image_seq_len(*noise.shape[-2:]))
    x0 = euler_sample(teacher, noise, sig, caps, neg, guidance=5.0)
    print(f"[3/5] teacher latents: 50 Euler steps, CFG 5, sigma {sig[0]:.2f} -> {sig[-2]:.4f} -> {sig[-1]:.1f}; "
          f"latents {tuple(x0.shape)}")

    method = MethodConfig()
    student = ZImageAdapter(copy.deepcopy(pipe.transformer)).train()
    disc = Discriminator(
        feature_dim=cfg_tiny.dim, layers=[1, 3, 5], text_dim=cfg_tiny.text_hidden, hidden=64, cond_dim=64,
        num_teacher_layers=cfg_tiny.n_layers,
    )
    models = LaddModels(student, teacher, disc)
    opt_g = torch.optim.AdamW(trainable(student), lr=5e-6)
    opt_d = torch.optim.AdamW(trainable(disc), lr=1e-5)
    rng = torch.Generator().manual_seed(seed)
    batches = [Batch(x0[i : i + 2], caps[i : i + 2], pooled(caps[i : i + 2])) for i in (0, 2)]
    for step in range(steps):
        m = ladd_step(models, opt_g, opt_d, [batches[step % 2]], step, method, rng)
        kind = "G+D" if m["gen_step"] else "D  "
        print(f"[4/5] step {step} {kind} d_loss {m['d_loss']:.3f} g_loss {m['g_loss']:+.3f} "
              f"gap {m['logit_gap']:+.3f} acc real/fake {m['accuracy_real']:.2f}/{m['accuracy_fake']:.2f}")

    few = student_sigmas(method.student_timesteps)
    x_student = euler_sample(student, noise, few, caps)
    mse = torch.mean((x_student - x0) ** 2).item()
    print(f"[5/5] student: {len(few) - 1} steps at sigmas {[round(s, 2) for s in few.tolist()]}; "
          f"latent MSE to teacher {mse:.4f}; total {time.perf_counter() - t0:.1f}s")
    return {"latent_mse": mse}
