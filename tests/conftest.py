"""Shared fixtures: tiny real models saved to temp dirs, the ``gpu`` marker's skip rule, and
the CPU code paths every test leaves as it found them."""

from __future__ import annotations

import os

import pytest
import torch

from longkd.tools.demo import CPU_NUMERICS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# ATen picks its CPU kernels once, at the first call of this: now, from the environment the
# run started with, not from whatever a test has set by the time torch first needs it.
torch.backends.cpu.get_cpu_capability()
# One thread: tiny models gain nothing from more, and a busy 2-core machine loses a lot.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_code_paths_stay_as_they_were():
    """Restore the variables that pin CPU code paths (tools/demo.py ``CPU_NUMERICS``) after
    every test. One left behind by a test (the demo sets them for its child processes) would
    give later tests' subprocesses, and torch.compile in this process, other kernels than
    this process's ATen: on an AVX-512 machine, a killed subprocess's training run then no
    longer equals the in-process one, and a compiled student's loss is NaN."""
    saved = {name: os.environ.get(name) for name in CPU_NUMERICS}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
