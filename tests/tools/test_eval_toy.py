"""The toy task of ``longkd eval``: the token-level retrieval probe on a scripted oracle, the world lookup."""

from __future__ import annotations

import json

import pytest
import torch

from longkd.errors import LongkdError
from longkd.tools import eval_toy


class ToyOracle(torch.nn.Module):
    """Answers a toy probe by finding ``FACT key value`` for the queried key (or answers a filler id)."""

    def __init__(self, world, right: bool = True):
        super().__init__()
        self.world, self.right = world, right
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, logits_to_keep=1, position_ids=None):
        logits = torch.zeros(input_ids.shape[0], 1, self.world.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            key = row[-1]
            value = next(
                row[i + 2] for i in range(len(row) - 2) if row[i] == self.world.fact_id and row[i + 1] == key
            )
            logits[b, 0, value if self.right else int(self.world.filler_ids[0])] = 1.0
        return type("Out", (), {"logits": logits})()


def test_toy_task_scores_by_distance():
    from longkd.tools.toy_world import ToyWorld

    world = ToyWorld()
    res = eval_toy.run_toy(ToyOracle(world), world, max_positions=64, distances=[8, 40, 100], per_distance=6)
    assert [(r["distance"], r["score"], r["extrapolation"]) for r in res["by_distance"]] == [
        (8, 100.0, False), (40, 100.0, False), (100, 100.0, True)]  # fmt: skip
    assert [r["length"] for r in res["by_distance"]] == [26, 58, 118]  # d + 2 + 16 lead tokens
    res = eval_toy.run_toy(ToyOracle(world, right=False), world, max_positions=64, distances=[8],
                           per_distance=4)  # fmt: skip
    assert res["mean_score"] == 0.0
    assert eval_toy.toy_distances(64) == [8, 16, 32, 64]


def test_toy_world_found_beside_the_model(tmp_path):
    from longkd.tools.cli import _toy_world

    world = {"vocab_size": 96, "num_keys": 8, "num_values": 12}
    (tmp_path / "metrics.json").write_text(json.dumps({"kind": "teacher", "recipe": {"world": world}}))
    found = _toy_world(None, tmp_path, 128).to_dict()
    assert {k: found[k] for k in world} == world
    assert _toy_world('{"vocab_size": 64, "num_keys": 4, "num_values": 4}', tmp_path, 128).num_keys == 4
    with pytest.raises(LongkdError, match="--toy-world"):
        _toy_world('{"vocab_size": 16, "num_keys": 8, "num_values": 8}', tmp_path, 128)
