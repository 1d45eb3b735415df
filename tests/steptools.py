"""Shared by the LADD-step tests: the tiny models and batch, a spy on adapter calls, and the gradients
an optimizer step applies."""

import contextlib
import copy

import torch

from ladd.models.discriminator import Discriminator
from ladd.models.text import encode_prompts, pooled
from ladd.models.tiny import build_tiny_pipeline
from ladd.models.zimage import ZImageAdapter
from ladd.train.step import Batch, LaddModels, trainable
from tests.conftest import PROMPTS


def ladd_setup():
    """(models, batch, opt_g, opt_d) on the tiny pipeline: a student copied from the teacher, a disc on
    layers 1, 3, 5 whose conditioning matters from the start, and a batch of 2."""
    pipe = build_tiny_pipeline(seed=5)
    torch.manual_seed(0)
    teacher = ZImageAdapter(pipe.transformer)
    student = ZImageAdapter(copy.deepcopy(pipe.transformer)).train()
    disc = Discriminator(feature_dim=64, layers=[1, 3, 5], text_dim=32, hidden=64, cond_dim=64, num_teacher_layers=6)
    with torch.no_grad():  # make the disc depend on its conditioning from the start
        for head in disc.heads.values():
            head.film[-1].weight.normal_(0, 0.02)
    models = LaddModels(student, teacher, disc)
    caps = encode_prompts(pipe, PROMPTS)
    x0 = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = Batch(x0, caps, pooled(caps))
    opt_g = torch.optim.AdamW(trainable(student), lr=1e-3)
    opt_d = torch.optim.AdamW(trainable(disc), lr=1e-3)
    return models, batch, opt_g, opt_d


class Spy:
    """Records every call to an adapter: its inputs and whether a graph was being built."""

    def __init__(self, adapter):
        self.calls = []
        self.handle = adapter.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, _module, args, kwargs):
        x, sigma = args[0], args[1]
        self.calls.append({"x": x.detach().clone(), "sigma": torch.as_tensor(sigma).clone(),
                           "grad": torch.is_grad_enabled(), "taps": kwargs.get("taps", ())})


@contextlib.contextmanager
def recorded_grads(opt, module):
    """The gradients `opt` steps `module` with (after any clipping), recorded as each step runs."""
    got, step = [], opt.step
    opt.step = lambda *a, **k: (got.extend(p.grad.clone() for p in trainable(module)), step(*a, **k))
    try:
        yield got
    finally:
        opt.step = step


def assert_grads_equal(got, want):
    assert got, "no optimizer step ran"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
