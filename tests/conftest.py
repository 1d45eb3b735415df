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


PROMPTS = ["a red circle on a white background", "a blue striped square and an orange triangle"]
