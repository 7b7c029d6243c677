"""The device rule (longkd/devices.py) shared by cache build, train, eval and analyze."""

from __future__ import annotations

import pytest
import torch

from longkd.devices import resolve_device
from longkd.errors import LongkdError

DEFAULT = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", [None, "", "auto"])
def test_unset_means_cuda_when_there_is_one(name):
    assert resolve_device(name) == DEFAULT
    assert resolve_device(name, check=True) == DEFAULT


def test_each_rank_takes_its_own_gpu():
    assert resolve_device("cuda", local_rank=3, world=8) == "cuda:3"
    assert resolve_device("cuda", local_rank=3, world=1) == "cuda"
    assert resolve_device("cuda:1", local_rank=3, world=8) == "cuda:1"  # explicit index kept
    assert resolve_device("cpu", local_rank=3, world=8) == "cpu"
    assert resolve_device(None, local_rank=2, world=4) == ("cuda:2" if DEFAULT == "cuda" else "cpu")


def test_check_refuses_what_torch_cannot_use():
    assert resolve_device("gpu") == "gpu"  # unchecked: left for torch to refuse where it is used
    with pytest.raises(LongkdError, match="'gpu' is not a torch device"):
        resolve_device("gpu", check=True)
    if not torch.cuda.is_available():
        with pytest.raises(LongkdError, match="CUDA is not available; use --device cpu"):
            resolve_device("cuda:0", check=True)
