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


@pytest.mark.slow
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


def test_g_step_under_checkpointing_matches_plain(lora):
    """Checkpointing both roles: the teacher's blocks are recomputed with adapters off, so a G-step
    gives the same adapter update as without checkpointing."""
    pipe, caps, x, _, _ = lora
    tr = pipe.transformer
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    start = {k: v.clone() for k, v in tr.state_dict().items()}
    torch.manual_seed(0)
    disc = Discriminator(feature_dim=64, layers=[1, 5], text_dim=32, hidden=64, cond_dim=64)
    after = {}
    for ckpt in (False, True):
        tr.load_state_dict(start)
        student, teacher = ZImageAdapter(tr).train(), TeacherView(tr)
        student.gradient_checkpointing = teacher.gradient_checkpointing = ckpt
        models = LaddModels(student, teacher, disc)
        opt = torch.optim.SGD(trainable(student), lr=1.0)
        generator_step(models, opt, [Batch(x, caps, pooled(caps))], 0, MethodConfig(), torch.Generator().manual_seed(0))
        after[ckpt] = {k: v.clone() for k, v in tr.state_dict().items() if "lora_" in k}
        disc.zero_grad(set_to_none=True)
    moved = max((after[False][k] - start[k]).abs().max().item() for k in after[False])
    assert moved > 1e-4
    for k in after[False]:
        torch.testing.assert_close(after[True][k], after[False][k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_lora_run_exports_a_pipeline_and_a_lora_file(tmp_path):
    """A trained LoRA student: the exported folder and the LoRA file both reproduce it."""
    from diffusers import ZImagePipeline

    from ladd.config import load_config
    from ladd.data.precompute import PrecomputeConfig, run_precompute
    from ladd.eval.export import export_student
    from ladd.eval.samplers import load_sampler
    from ladd.train.loop import train

    build_tiny_pipeline(seed=2).save_pretrained(tmp_path / "tiny")
    (tmp_path / "p.txt").write_text("a red circle\na blue square\na green triangle\nan orange circle\n")
    run_precompute(PrecomputeConfig(pipeline=str(tmp_path / "tiny"), prompts=str(tmp_path / "p.txt"),
                                    out=str(tmp_path / "data"), steps=4))
    sets = {"model.pipeline": f'"{tmp_path / "tiny"}"', "data.path": f'"{tmp_path / "data"}"',
            "train.out": f'"{tmp_path / "run"}"', "model.disc_layers": "[1, 5]", "model.disc_hidden": "64",
            "model.disc_cond_dim": "64", "train.steps": "4", "optim.lr_g": "1e-2", "model.student": '"lora"',
            "model.lora_rank": "4", "model.lora_alpha": "4.0", "validation.num_prompts": "2"}
    train(load_config(None, [f"{k}={v}" for k, v in sets.items()]))

    sampler = load_sampler("run", tmp_path / "run", steps=4, device="cpu", dtype="fp32")
    prompts, seeds = ["a red circle", "a green square"], [3, 4]
    ours = sampler.latents(prompts, seeds, 32)
    teacher = load_sampler("untrained", tmp_path / "tiny", steps=4, device="cpu", dtype="fp32")
    assert (ours - teacher.latents(prompts, seeds, 32)).abs().max() > 1e-4  # the adapters did learn

    def pipe_latents(pipe):
        pipe.set_progress_bar_config(disable=True)
        return torch.cat([pipe(p, height=32, width=32, num_inference_steps=4, guidance_scale=0.0,
                               generator=torch.Generator("cpu").manual_seed(s), output_type="latent").images
                          for p, s in zip(prompts, seeds)])

    export_student(tmp_path / "run", tmp_path / "folder")
    assert (pipe_latents(ZImagePipeline.from_pretrained(tmp_path / "folder")) - ours).abs().max() <= 1e-5

    export_student(tmp_path / "run", tmp_path / "lora", lora=True)
    base = ZImagePipeline.from_pretrained(tmp_path / "tiny")
    base.scheduler = ZImagePipeline.from_pretrained(tmp_path / "folder").scheduler  # shift 1: the student's
    base.load_lora_weights(tmp_path / "lora")
    assert (pipe_latents(base) - ours).abs().max() <= 1e-4
