"""Compiled blocks (model.compile): the same velocity, taps, losses and gradients as eager blocks.

Tolerances, measured on this CPU (torch 2.13): inductor (C++ codegen, fused kernels) differs from
eager by float rounding only, max abs 1e-6 on velocities and taps of size ~2: pinned at rtol 1e-4,
atol 1e-5. aot_eager (dynamo + AOT autograd with eager kernels: what the LADD-step tests use, as
inductor's C++ compile of their fwd+bwd graphs takes minutes here) gave bitwise-equal losses and
weights, checkpointing and LoRA included: pinned at rtol 1e-5, atol 1e-7.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from ladd.config import MethodConfig
from ladd.models.compile import compile_blocks, is_compiled, transformer_blocks
from ladd.models.discriminator import Discriminator
from ladd.models.lora import TeacherView, add_lora
from ladd.models.text import pooled
from ladd.models.tiny import build_tiny_pipeline
from ladd.models.zimage import ZImageAdapter
from ladd.train.loop import build_roles
from ladd.train.step import Batch, LaddModels, ladd_step, trainable

pytestmark = pytest.mark.usefixtures("one_thread")


def _caps(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 32, generator=g) for n in lengths]


def test_compiled_adapter_matches_eager_and_compiles_once_for_all_lengths():
    """Inductor, no grad (precompute / eval): velocity and taps within float rounding of eager; a batch
    with other caption lengths (and batch size) reuses the graphs — 6 blocks of each kind, one graph."""
    tr = build_tiny_pipeline(seed=3).transformer.eval().requires_grad_(False)
    eager = ZImageAdapter(tr)
    x, sigma = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.8])
    batches = [(x, sigma, _caps([40, 7])), (torch.cat([x, x]), sigma.repeat(2), _caps([100, 9, 70, 33], 1))]
    with torch.no_grad():
        want = [eager(*b, taps=(1, 4)) for b in batches]
        compiled = ZImageAdapter(tr, compile=True)
        assert is_compiled(tr)
        got = [compiled(*batches[0], taps=(1, 4))]
        graphs = counters["stats"]["unique_graphs"]
        got.append(compiled(*batches[1], taps=(1, 4)))
    assert counters["stats"]["unique_graphs"] == graphs, "new caption lengths recompiled the blocks"
    for w, g in zip(want, got):
        torch.testing.assert_close(g.velocity, w.velocity, rtol=1e-4, atol=1e-5)
        for k in (1, 4):
            torch.testing.assert_close(g.feats[k], w.feats[k], rtol=1e-4, atol=1e-5)


def test_compile_is_in_place_idempotent_and_keeps_state_dict_keys():
    tr = build_tiny_pipeline(seed=3).transformer
    keys = list(tr.state_dict())
    assert compile_blocks(tr, backend="eager") == len(transformer_blocks(tr)) == 8
    assert compile_blocks(tr, backend="eager") == 0
    assert list(tr.state_dict()) == keys  # checkpoints and exports are unaffected


def test_a_copy_of_a_compiled_transformer_is_eager_and_runs_its_own_weights():
    """Eval copies the teacher's transformer for the student (and build_roles for a full student):
    `Module.__getstate__` drops the compiled call, so a copy is eager — never a call into the original —
    and is compiled on its own."""
    tr = build_tiny_pipeline(seed=3).transformer.eval().requires_grad_(False)
    compile_blocks(tr, backend="eager")
    other = copy.deepcopy(tr)
    assert not is_compiled(other)
    with torch.no_grad():
        for p in other.layers[0].parameters():
            p.mul_(0.5)
        x, caps = torch.randn(1, 16, 16, 16), _caps([12])
        compile_blocks(other, backend="eager")
        a, b = ZImageAdapter(tr)(x, 0.5, caps), ZImageAdapter(other)(x, 0.5, caps)
    assert is_compiled(other) and (a.velocity - b.velocity).abs().max() > 1e-3


def test_build_roles_compiles_both_roles():
    tr = build_tiny_pipeline(seed=3).transformer
    s, t = build_roles(tr, "full", 4, 4.0, checkpointing=False, compile=True)
    assert is_compiled(s.transformer) and is_compiled(t.transformer) and s.transformer is not t.transformer


def _ladd_models(student_kind: str, compiled: bool, checkpointing: bool):
    """As the trainer builds them (build_roles), on the tiny model, compiled with aot_eager."""
    pipe = build_tiny_pipeline(seed=5)
    tr = pipe.transformer
    if student_kind == "lora":
        torch.manual_seed(0)  # peft draws the adapters' A from the global generator
        add_lora(tr, 4, 4)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # B = 0 at init: adapters that change the output, so A gets gradients too
            for name, p in tr.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01, generator=g)
        student, teacher = ZImageAdapter(tr).train(), TeacherView(tr)
    else:
        student, teacher = ZImageAdapter(copy.deepcopy(tr).requires_grad_(True)).train(), ZImageAdapter(tr)
    if compiled:
        compile_blocks(student.transformer, backend="aot_eager")
        compile_blocks(teacher.transformer, backend="aot_eager")
    student.gradient_checkpointing = teacher.gradient_checkpointing = checkpointing
    torch.manual_seed(0)
    disc = Discriminator(feature_dim=64, layers=[1, 3, 5], text_dim=32, hidden=64, cond_dim=64, num_teacher_layers=6)
    return LaddModels(student, teacher, disc)


def _g_and_d_step(models: LaddModels):
    """One LADD step with a G-step (step 0: student update, then disc update); plain SGD and no clipping,
    so the weight changes are the gradients themselves (Adam's first step would keep only their sign)."""
    cfg = MethodConfig(grad_clip_g=0, grad_clip_d=0)
    opt_g = torch.optim.SGD(trainable(models.student), lr=1.0)
    opt_d = torch.optim.SGD(trainable(models.disc), lr=1.0)
    rng, g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    start = _weights(models)
    metrics = []
    caps = _caps((40, 9))
    batch = Batch(torch.randn(2, 16, 16, 16, generator=g), caps, pooled(caps))
    metrics.append(ladd_step(models, opt_g, opt_d, [batch], 0, cfg, rng))
    return metrics, start, _weights(models)


def _weights(models: LaddModels) -> dict:
    weights = {f"student.{k}": v for k, v in models.student.named_parameters() if v.requires_grad}
    weights.update({f"disc.{k}": v for k, v in models.disc.named_parameters()})
    return {k: v.detach().clone() for k, v in weights.items()}


@pytest.mark.slow
@pytest.mark.parametrize("student_kind", ["full", "lora"])
def test_compiled_ladd_step_matches_eager_under_checkpointing(student_kind):
    """Losses, grad norms and the updated student and disc weights of a G+D step: gradients through the
    compiled student, the compiled frozen teacher (input gradient) and checkpointing's recomputation.
    (The no-grad D-only path is the adapter test's.)"""
    eager_metrics, start, eager_weights = _g_and_d_step(_ladd_models(student_kind, compiled=False, checkpointing=True))
    metrics, _, weights = _g_and_d_step(_ladd_models(student_kind, compiled=True, checkpointing=True))
    assert metrics[0]["gen_step"] == 1.0
    for want, got in zip(eager_metrics, metrics):
        assert want.keys() == got.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    student_moved = max((eager_weights[k] - start[k]).abs().max().item() for k in start if k.startswith("student."))
    assert student_moved > 1e-4  # the G-step's gradients are not trivially zero
    for k in eager_weights:
        torch.testing.assert_close(weights[k], eager_weights[k], rtol=1e-5, atol=1e-7, msg=k)
