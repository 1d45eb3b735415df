"""Training, evaluation and export on multi-bucket data (tiny pipeline): every bucket trains, resume is
bit-identical on 1 and 2 ranks, eval reports each bucket, and an exported student at a non-square
bucket through plain ZImagePipeline equals `ladd generate`."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ladd.cli import main
from ladd.config import load_config
from ladd.data.precompute import PrecomputeConfig, run_precompute
from ladd.data.shards import DataError
from ladd.models.tiny import build_tiny_pipeline
from ladd.train.checkpoint import Checkpointer
from tests.worlds import PROMPTS, assert_same_weights, run_train, train_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "32x32,40x24,24x40"  # the tiny pipeline's VAE factor 2: multiples of 4
TIMEOUT = 300


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """`tiny` (teacher), `data`: 24 prompts over three buckets (2-step teacher), `eval`: 9 references
    (3 per bucket)."""
    root = tmp_path_factory.mktemp("bucket-train")
    build_tiny_pipeline(seed=2).save_pretrained(root / "tiny")
    lines = [json.dumps({"prompt": p, "width": w, "height": h})
             for k, p in enumerate(PROMPTS * 3) for w, h in [[(32, 32), (40, 24), (24, 40)][k % 3]]]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")  # 8 samples per bucket
    run_precompute(PrecomputeConfig(pipeline=str(root / "tiny"), prompts=str(root / "train.jsonl"),
                                    out=str(root / "data"), steps=2, shard_size=5, buckets=SPEC))
    held_out = PROMPTS[:6] + ["a white square", "a red triangle", "a blue dot"]
    lines = [json.dumps({"prompt": p, "width": w, "height": h})
             for k, p in enumerate(held_out) for w, h in [[(32, 32), (40, 24), (24, 40)][k % 3]]]
    (root / "eval.jsonl").write_text("\n".join(lines) + "\n")  # 3 references per bucket
    run_precompute(PrecomputeConfig(pipeline=str(root / "tiny"), prompts=str(root / "eval.jsonl"),
                                    out=str(root / "eval"), steps=2, buckets=SPEC, seed=1000, decode_first=9))
    return root


def overrides(world, out, steps=6, **extra):
    return train_overrides(world, out, steps, **{"data.buckets": f'"{SPEC}"', "validation.num_prompts": "6",
                                                  "data.batch_per_rank": "2", **extra})


def run_cli(args, nproc=1, fault=None, check=True):
    return run_train(args, nproc, TIMEOUT, fault, check)


@pytest.fixture(scope="module")
def run(world):
    """An unbroken single-process run of 6 steps."""
    from ladd.train.loop import train

    out = world / "run"
    assert train(load_config(None, overrides(world, out)))["finished"]
    return out


@pytest.mark.slow
def test_every_bucket_is_trained_and_validated(world, run, monkeypatch):
    from ladd.train import loop

    shapes = []
    real = loop.Trainer.next_micro_batches

    def spy(self):
        batches = real(self)
        shapes.extend(tuple(b.x0.shape[-2:]) for b in batches)
        return batches

    monkeypatch.setattr(loop.Trainer, "next_micro_batches", spy)
    loop.train(load_config(None, overrides(world, world / "spy", steps=12)))
    assert set(shapes) == {(16, 16), (12, 20), (20, 12)}  # latent (H, W) of 32x32, 40x24, 24x40
    for name in SPEC.split(","):
        assert (run / "validation" / f"teacher-{name}.png").is_file()
        assert (run / "validation" / f"step-00000006-{name}.png").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_latent_mse" in r] == [0, 3, 6]


@pytest.mark.slow
def test_resume_on_buckets_is_bit_identical(world, run):
    out = world / "killed"
    proc = run_cli(overrides(world, out), fault="step:5", check=False)
    assert proc.returncode == -9
    assert "resumed from" in run_cli(overrides(world, out)).stdout
    assert_same_weights(run, out, 6)


@pytest.mark.slow
def test_two_ranks_share_each_step_bucket_and_resume_bit_identically(world):
    ref, out = world / "two", world / "two-sigterm"
    run_cli(overrides(world, ref), nproc=2)
    proc = run_cli(overrides(world, out), nproc=2, fault="sigterm:3")
    assert "preempted (SIGTERM) at step 3" in proc.stdout
    assert "resumed from" in run_cli(overrides(world, out), nproc=2).stdout
    assert_same_weights(ref, out, 6)


def test_data_and_config_buckets_must_agree(world):
    from ladd.train.loop import train

    with pytest.raises(DataError, match=r"holds buckets 32x32,40x24,24x40, but data.buckets = '32x32,40x24' .*"
                                        r"not asked for 24x40"):
        train(load_config(None, overrides(world, world / "x", **{"data.buckets": '"32x32,40x24"'})))
    with pytest.raises(DataError, match="24 samples cannot fill one step of 10 per rank on 1 rank"):
        train(load_config(None, overrides(world, world / "y", **{"data.batch_per_rank": "10"})))
    assert not (world / "x" / "checkpoints").exists() and not (world / "y" / "checkpoints").exists()


@pytest.mark.slow
def test_eval_reports_every_bucket(world, run):
    from ladd.eval.commands import EvalConfig, evaluate

    result = evaluate(EvalConfig(data=str(world / "eval"), source="run", path=str(run), features="random-conv",
                                 seeds=(0, 1), subsets=3, subset_size=3, device="cpu", dtype="fp32"))
    for row in result["rows"]:
        buckets = row["buckets"]
        assert list(buckets) == SPEC.split(",") and sum(b["num_images"] for b in buckets.values()) == 9
        assert all(b["kid"]["n"] == 2 for b in buckets.values())  # KID over the two eval seeds, per bucket
        mse = sum(b["latent_mse"] * b["num_images"] for b in buckets.values()) / 9
        assert row["latent_mse"] == pytest.approx(mse, rel=1e-12)  # overall = the per-sample mean


@pytest.mark.slow
def test_exported_student_at_a_non_square_bucket_equals_generate(world, run, tmp_path):
    from diffusers import ZImagePipeline

    out, gen = tmp_path / "exported", tmp_path / "gen"
    assert main(["export", str(run), "--out", str(out)]) == 0
    prompts, seeds = ["a red circle", "a blue square"], [3, 11]
    args = ["generate", "--run", str(run), "--out", str(gen), "--device", "cpu", "--dtype", "fp32",
            "--width", "40", "--height", "24", "--seeds", *map(str, seeds)]
    assert main(args + [a for p in prompts for a in ("--prompt", p)]) == 0
    ours = load_file(str(gen / "latents.safetensors"))["latents"]
    assert ours.shape == (2, 16, 12, 20)
    pipe = ZImagePipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        latents = pipe(prompt, height=24, width=40, num_inference_steps=4, guidance_scale=0.0,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images
        torch.testing.assert_close(latents.float(), ours[i : i + 1], rtol=0, atol=1e-5)
    assert Checkpointer(run / "checkpoints", None).latest().name == "step-00000006"


def test_generate_refuses_half_a_size(world, capsys):
    assert main(["generate", "--untrained", str(world / "tiny"), "--prompt", "x", "--width", "40",
                 "--out", "unused"]) != 0
    assert "--width and --height go together" in capsys.readouterr().err


@pytest.mark.slow
def test_doctor_runs_a_step_at_every_bucket(world, capsys):
    args = [a for o in overrides(world, world / "doc") for a in ("--set", o)]
    assert main(["doctor", *args]) == 0
    out = capsys.readouterr().out
    for name in SPEC.split(","):
        assert f"[ok] one step gives finite, non-zero student gradients at {name}: grad norm" in out
    assert "[ok] every bucket fills a step of distinct samples: buckets 32x32 ×8, 40x24 ×8, 24x40 ×8" in out
