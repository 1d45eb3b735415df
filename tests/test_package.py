"""Packaging: a built wheel works on its own, the private diffusers API ladd leans on is still there, and the
`ladd` entry point leaves a torchrun worker without the interpreter teardown.

The wheel test builds the repo into a wheel (offline, no build isolation), installs it into a fresh venv
that sees this venv's dependencies through a .pth file (torch and diffusers are not reinstalled), and runs
`ladd generate` on the embedded toy teacher from outside the source tree, so `ladd` and the toy teacher
can only come from the wheel.
"""

import inspect
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from diffusers import ZImageTransformer2DModel

REPO = Path(__file__).resolve().parents[1]

# ladd.models.zimage calls these private ZImageTransformer2DModel methods by keyword, mirroring
# ZImageTransformer2DModel.forward. pyproject.toml caps diffusers below the next minor; when lifting
# the cap, check these (and the adapter's bit-identity tests in tests/test_adapter.py).
PRIVATE_API = {
    "_build_unified_sequence": [
        "x", "x_freqs", "x_seqlens", "x_noise_mask",
        "cap", "cap_freqs", "cap_seqlens", "cap_noise_mask",
        "siglip", "siglip_freqs", "siglip_seqlens", "siglip_noise_mask",
        "omni_mode", "device",
    ],
    "_prepare_sequence": ["feats", "pos_ids", "inner_pad_mask", "pad_token", "noise_mask", "device"],
}


@pytest.mark.parametrize("method", sorted(PRIVATE_API))
def test_private_diffusers_signatures_match_what_ladd_calls(method):
    import diffusers

    fn = getattr(ZImageTransformer2DModel, method, None)
    assert fn is not None, (
        f"diffusers {diffusers.__version__}: ZImageTransformer2DModel.{method} is gone; "
        f"ladd/models/zimage.py (ZImageAdapter.forward) calls it — port the adapter to this diffusers"
    )
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    assert params == PRIVATE_API[method], (
        f"diffusers {diffusers.__version__}: ZImageTransformer2DModel.{method} now takes {params}, "
        f"but ladd/models/zimage.py calls it with {PRIVATE_API[method]} — port the adapter "
        f"(mirror ZImageTransformer2DModel.forward) and update PRIVATE_API here"
    )


def _run(cmd, timeout, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_ships_the_toy_teacher_and_generates(tmp_path):
    """~7 s on an idle 2-core machine: build, venv, install, probe, one 4-step toy image."""
    # Build from a copy of what the wheel needs, so nothing (build/, *.egg-info) lands in the source tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "ladd", src / "ladd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--quiet", "-w", dist, src], timeout=120)
    (wheel,) = dist.glob("ladd-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=60)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--quiet", wheel],
         timeout=120)
    # This venv's dependencies, without its editable ladd: a directory named in a .pth file is put on
    # sys.path after the new venv's own site-packages, and its own .pth files (the editable finder) are
    # not run.
    new_site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 30).stdout.strip())
    deps = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (new_site / "_ladd_test_deps.pth").write_text("".join(f"{d}\n" for d in deps if Path(d).is_dir()))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    probe = (
        "import json, ladd; from ladd.models.loading import resolve_pipeline; "
        "print(json.dumps({'ladd': ladd.__file__, 'toy': str(resolve_pipeline('toy'))}))"
    )
    where = json.loads(_run([py, "-c", probe], timeout=60, cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    for what, path in where.items():
        assert Path(path).resolve().is_relative_to(new_site.resolve()), f"{what} came from {path}, not the wheel"
    assert not Path(where["ladd"]).resolve().is_relative_to(REPO)

    out = tmp_path / "out"
    ladd = venv / "bin" / "ladd"  # the wheel's console script
    _run([ladd, "generate", "--untrained", "toy", "--prompt", "a red circle", "--seeds", "0", "--device", "cpu",
          "--out", out], timeout=120, cwd=tmp_path, env=env)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0, sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("world", ["1", "2"])
def test_a_torchrun_worker_keeps_its_output_and_exit_code_and_skips_the_teardown(world):
    """Under torchrun (WORLD_SIZE > 1) `ladd` leaves with os._exit after flushing: a failing command's
    code and message still come out, but no interpreter teardown (an atexit hook here) runs."""
    hook = "import atexit, sys; atexit.register(lambda: print('teardown', flush=True)); "
    code = hook + "sys.argv = ['ladd'] + sys.argv[1:]; from ladd.cli import entry; entry()"
    env = {**os.environ, "WORLD_SIZE": world, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, "config", "show", "--config", "/nonexistent/x.toml"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config file /nonexistent/x.toml does not exist" in proc.stderr
    assert ("teardown" in proc.stdout) == (world == "1")
