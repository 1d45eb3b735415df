"""LoRA students: adapters off == the teacher exactly; a G-step changes only adapter weights."""

import pytest
import torch

from ladd.config import MethodConfig
from ladd.models.discriminator import Discriminator
from ladd.models.lora import TeacherView, add_lora, lora_state_dict
from ladd.models.text import encode_prompts, pooled
from ladd.models.tiny import build_tiny_pipeline
from ladd.models.zimage import ZImageAdapter
from ladd.train.step import Batch, LaddModels, generator_step, trainable

pytest.importorskip("peft")


@pytest.fixture()
def lora():
    pipe = build_tiny_pipeline(seed=4)
    caps = encode_prompts(pipe, ["a red circle", "a blue square on white"])
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ZImageAdapter(pipe.transformer)(x, torch.tensor([0.3, 0.8]), caps, taps=(2, 5))
    n = add_lora(pipe.transformer, rank=4, alpha=4)
    return pipe, caps, x, before, n


def test_adapters_off_is_the_teacher_exactly(lora):
    pipe, caps, x, before, n = lora
    assert 0 < n < sum(p.numel() for p in pipe.transformer.parameters()) / 5
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that really change the output
        teacher = TeacherView(pipe.transformer)(x, torch.tensor([0.3, 0.8]), caps, taps=(2, 5))
        student = ZImageAdapter(pipe.transformer)(x, torch.tensor([0.3, 0.8]), caps)
    assert torch.equal(teacher.velocity, before.velocity)
    assert all(torch.equal(teacher.feats[k], before.feats[k]) for k in (2, 5))
    assert (student.velocity - before.velocity).abs().max() > 1e-3


def test_g_step_changes_only_adapters(lora):
    pipe, caps, x, _, _ = lora
    tr = pipe.transformer
    models = LaddModels(ZImageAdapter(tr).train(), TeacherView(tr),
                        Discriminator(feature_dim=64, layers=[1, 5], text_dim=32, hidden=64, cond_dim=64))
    with torch.no_grad():  # B = 0 at init: give the adapters a non-trivial start so A gets gradients too
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    snapshot = {k: v.clone() for k, v in tr.state_dict().items()}
    opt = torch.optim.AdamW(trainable(models.student), lr=1e-3)
    generator_step(models, opt, [Batch(x, caps, pooled(caps))], 0, MethodConfig(), torch.Generator().manual_seed(0))
    changed = {k for k, v in tr.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert changed and all("lora_" in k for k in changed)
    assert len(lora_state_dict(tr)) == len([k for k in tr.state_dict() if "lora_" in k])
