"""Shared fixtures: tiny real models saved to temp dirs, and the ``gpu`` marker's skip rule."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: tiny models gain nothing from more, and a busy 2-core machine loses a lot.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(arch="llama", seed=0, **config)`` -> path of a saved tiny model.

    Models with the same arguments are built once per test session.
    """
    from longkd.tools.random_models import save_tiny_model

    made: dict = {}

    def make(arch: str = "llama", seed: int = 0, **config):
        key = (arch, seed, repr(sorted(config.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = save_tiny_model(path, arch=arch, seed=seed, **config)
        return made[key]

    return make
