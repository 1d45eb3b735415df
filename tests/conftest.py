"""Shared fixtures: tiny offline Z-Image pipelines (never the network)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from ladd.models.tiny import build_tiny_pipeline  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pipe():
    """A random-weight tiny ZImagePipeline; shared, so tests must not modify its weights."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_dir(tiny_pipe, tmp_path_factory):
    """`tiny_pipe` saved as a pipeline folder (safetensors), for commands that take a path."""
    path = tmp_path_factory.mktemp("tiny")
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on the
    shared 2-core machine tiny ops are all synchronisation with two (a tiny forward 0.04 s with one
    thread, 3 s with two when the other core is busy); results never depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ["a red circle on a white background", "a blue striped square and an orange triangle"]
