"""The small training world the trainer's tests share: a tiny teacher, 8 prompts and their teacher
data, and the overrides that make a seconds-long run of it (tests/test_train.py, test_faults.py,
test_checkpoint_faults.py)."""

from pathlib import Path

from ladd.data.precompute import PrecomputeConfig, run_precompute
from ladd.models.tiny import build_tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green triangle", "an orange circle",
           "a red square on white", "a gray circle", "a blue circle on black", "a green square"]


def make_train_world(root: Path) -> Path:
    """`root/tiny` (the teacher), `root/prompts.txt`, `root/data` (4-step teacher data, 3 per shard)."""
    build_tiny_pipeline(seed=2).save_pretrained(root / "tiny")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run_precompute(PrecomputeConfig(pipeline=str(root / "tiny"), prompts=str(root / "prompts.txt"),
                                    out=str(root / "data"), steps=4, shard_size=3))
    return root


def train_overrides(root: Path, out: Path, steps: int = 6, **extra) -> list[str]:
    """`--set` items for a run of `steps` on the world at `root`, writing to `out`."""
    base = {
        "model.pipeline": f'"{root / "tiny"}"', "data.path": f'"{root / "data"}"', "train.out": f'"{out}"',
        "model.disc_layers": "[1, 3, 5]", "model.disc_hidden": "64", "model.disc_cond_dim": "64",
        "train.steps": str(steps), "train.checkpoint_every": "2", "validation.every": "3",
        "validation.num_prompts": "3", "optim.lr_g": "1e-3", "optim.lr_d": "1e-3", "health.collapse_window": "1000",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
