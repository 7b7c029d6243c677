"""The toy world: generator invariants, the retrieval scorer against scripted models, and the
tiny teacher / student training (a smoke run, and the quick teacher's precondition)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from longkd.errors import LongkdError
from longkd.tools import toy_models
from longkd.tools.toy_world import (
    ToyWorld,
    long_documents,
    make_probes,
    retrieval_accuracy,
    save_documents,
    short_documents,
)

W, S = 256, 64


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


def _check_structure(world, doc):
    """Every query repeats its fact; markers, keys and values appear only where the document
    says; a repeat document is its first period over and over."""
    ids = doc.input_ids
    if doc.copies:
        (c,) = doc.copies
        assert c.src == 0 and c.dst + c.length == len(ids) and world.min_period <= c.dst <= max(
            world.min_period, len(ids) // 2)
        assert np.array_equal(ids, np.resize(ids[: c.dst], len(ids)))
        assert np.isin(ids, world.content_ids).all() and not doc.facts
        return
    structured = np.zeros(len(ids), dtype=bool)
    stated = {}
    for f in doc.facts:
        assert 3 <= f.distance == f.query_pos - f.fact_pos
        assert list(ids[f.fact_pos : f.fact_pos + 3]) == [world.fact_id, f.key, f.value]
        assert list(ids[f.query_pos : f.query_pos + 3]) == [world.query_id, f.key, f.value]
        assert f.key in world.key_ids and f.value in world.value_ids
        assert ids[f.answer_pos] == f.value
        assert stated.setdefault(f.key, f.fact_pos) == f.fact_pos, "a key is stated twice"
        structured[f.query_pos : f.query_pos + 3] = True
    fact_at = np.flatnonzero(ids == world.fact_id)
    for p in fact_at:
        structured[p : p + 3] = True
        assert ids[p + 1] in world.key_ids and ids[p + 2] in world.value_ids
    assert len(set(ids[fact_at + 1].tolist())) == len(fact_at), "a key is stated twice"
    assert (ids == world.query_id).sum() == len(doc.facts)
    assert np.isin(ids[~structured], world.filler_ids).all()


def test_vocabulary_layout(world):
    parts = [np.arange(4), [world.fact_id, world.query_id], world.key_ids, world.value_ids, world.filler_ids]
    ids = np.concatenate(parts)
    assert sorted(ids.tolist()) == list(range(world.vocab_size))
    assert sorted(world.content_ids.tolist()) == sorted(np.concatenate(parts[2:]).tolist())
    assert world.chance == 1 / world.num_values
    tok = world.tokenizer()
    assert tok("t4 t63").input_ids == [world.fact_id, 63]
    assert ToyWorld(**json.loads(json.dumps(world.to_dict()))) == world
    with pytest.raises(LongkdError, match="filler"):
        ToyWorld(vocab_size=64, num_keys=32, num_values=32)
    with pytest.raises(LongkdError, match="repeat_share"):
        ToyWorld(repeat_share=1.0)


def test_long_documents(world):
    docs = long_documents(world, 60, W, seed=3)
    distances = []
    for doc in docs:
        assert len(doc) == W and doc.input_ids.dtype == np.int64
        _check_structure(world, doc)
        distances += [f.distance for f in doc.facts]
    share = np.mean([bool(doc.copies) for doc in docs])
    assert abs(share - world.repeat_share) < 0.2
    # Queries pick any stated key, so distances spread over the whole window.
    assert max(distances) > 0.8 * W and min(distances) == 3
    assert np.median(distances) > W / 5


def test_short_documents(world):
    docs = short_documents(world, 200, S, seed=4)
    lengths = [len(d) for d in docs]
    assert max(lengths) <= S and min(lengths) >= S // 2
    for doc in docs:
        _check_structure(world, doc)
        assert doc.copies or len(doc.facts) >= 1
        assert all(f.answer_pos < len(doc) for f in doc.facts)
    with pytest.raises(LongkdError, match="max_length"):
        short_documents(world, 1, 4)


def test_generators_are_deterministic(world):
    a, b = short_documents(world, 20, S, seed=7), short_documents(world, 20, S, seed=7)
    assert all(np.array_equal(x.input_ids, y.input_ids) and x.facts == y.facts for x, y in zip(a, b))
    c = short_documents(world, 20, S, seed=8)
    assert not all(len(x) == len(y) and np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    p, q = make_probes(world, [5, 40], 8, seed=1), make_probes(world, [5, 40], 8, seed=1)
    assert torch.equal(p.buckets[40].input_ids, q.buckets[40].input_ids)
    r = make_probes(world, [5, 40], 8, seed=2)
    assert not torch.equal(p.buckets[40].input_ids, r.buckets[40].input_ids)


@pytest.mark.parametrize("length", [None, 200])
def test_probes_state_the_fact_d_tokens_before_the_query(world, length):
    distances = [3, 17, 64, 150]
    probes = make_probes(world, distances, 16, length=length, seed=5)
    assert probes.distances == distances
    for d, bucket in probes.buckets.items():
        n, T = bucket.input_ids.shape
        assert n == 16 and T == (length or d + 18)
        for row, answer in zip(bucket.input_ids.numpy(), bucket.answers.numpy()):
            key = row[-1]
            assert row[-2] == world.query_id and key in world.key_ids
            assert list(row[T - 2 - d : T - d + 1]) == [world.fact_id, key, answer]
            assert (row == key).sum() == 2, "the queried key appears only in its fact and query"
            # Around the target the probe reads like a fact document: keys only after markers,
            # and every marker followed by a key and (but for the last) a value.
            is_key = np.isin(row, world.key_ids)
            markers = np.flatnonzero((row == world.fact_id) | (row == world.query_id))
            assert np.array_equal(np.flatnonzero(is_key), markers + 1)
            assert np.isin(row[markers[:-1] + 2], world.value_ids).all()
        if T >= 64:
            assert (bucket.input_ids == world.fact_id).sum(1).float().mean() > 3  # distractors
    with pytest.raises(LongkdError, match="probe distance"):
        make_probes(world, [2], 4)
    with pytest.raises(LongkdError, match="probe distance"):
        make_probes(world, [100], 4, length=50)


class ScriptedModel(torch.nn.Module):
    """Reads the probe like a perfect retriever, then answers right or shifts to a wrong value.

    ``right_up_to``: answer right only when the fact is at most this many tokens back.
    """

    def __init__(self, world, right_up_to=10**9, wrong_always=False):
        super().__init__()
        self.world, self.right_up_to, self.wrong_always = world, right_up_to, wrong_always
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device
        self.calls = []

    def forward(self, input_ids, position_ids=None, logits_to_keep=0):
        self.calls.append((tuple(input_ids.shape), None if position_ids is None else position_ids.clone()))
        B, T = input_ids.shape
        logits = torch.zeros(B, 1, self.world.vocab_size)
        values = torch.as_tensor(self.world.value_ids)
        for b in range(B):
            row = input_ids[b]
            key = row[-1]
            hits = [j for j in range(1, T - 2) if row[j] == key and row[j - 1] == self.world.fact_id]
            j = hits[-1]
            value = int(row[j + 1])
            distance = (T - 2) - (j - 1)
            if self.wrong_always or distance > self.right_up_to:
                value = int(values[(int((values == value).nonzero()) + 1) % len(values)])
            logits[b, 0, value] = 1.0
        return type("Out", (), {"logits": logits})()


def test_scorer_on_scripted_models(world):
    probes = make_probes(world, [4, 30, 31, 100], 20, seed=9)
    right = retrieval_accuracy(ScriptedModel(world), probes, batch_size=7)
    assert right == {4: 1.0, 30: 1.0, 31: 1.0, 100: 1.0}
    wrong = retrieval_accuracy(ScriptedModel(world, wrong_always=True), probes)
    assert wrong == {4: 0.0, 30: 0.0, 31: 0.0, 100: 0.0}
    near = retrieval_accuracy(ScriptedModel(world, right_up_to=30), probes)
    assert near == {4: 1.0, 30: 1.0, 31: 0.0, 100: 0.0}


def test_scorer_passes_position_ids_cut_to_each_bucket(world):
    probes = make_probes(world, [4, 40], 5, seed=10)
    model = ScriptedModel(world)
    offset = torch.arange(probes.max_length) + 1000
    retrieval_accuracy(model, probes, position_ids=offset, batch_size=4)
    shapes = [c[0] for c in model.calls]
    assert shapes == [(4, 22), (1, 22), (4, 58), (1, 58)]
    for (shape, pos) in model.calls:
        assert pos.shape == shape and torch.equal(pos[0], offset[: shape[1]])
    with pytest.raises(LongkdError, match="position_ids"):
        retrieval_accuracy(model, probes, position_ids=torch.arange(10))


def test_scorer_matches_full_logits_on_a_real_model(world):
    torch.manual_seed(0)
    model = toy_models.build_model(toy_models.ModelSpec(hidden_size=32), world, context=128, seed=1).eval()
    probes = make_probes(world, [5, 60], 12, seed=11)
    got = retrieval_accuracy(model, probes, batch_size=5)
    position_ids = torch.arange(probes.max_length) * 2
    got_pos = retrieval_accuracy(model, probes, position_ids=position_ids)
    with torch.no_grad():
        for d, bucket in probes.buckets.items():
            T = bucket.input_ids.shape[1]
            pred = model(input_ids=bucket.input_ids).logits[:, -1].argmax(-1)
            assert got[d] == (pred == bucket.answers).float().mean().item()
            pos = position_ids[:T].expand(len(bucket.answers), T)
            pred = model(input_ids=bucket.input_ids, position_ids=pos).logits[:, -1].argmax(-1)
            assert got_pos[d] == (pred == bucket.answers).float().mean().item()


def test_save_documents_round_trip(world, tmp_path):
    import datasets

    docs = short_documents(world, 10, S, seed=12)
    tok = world.tokenizer()
    path = save_documents(docs, tmp_path / "short.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [tok(r["text"]).input_ids for r in rows] == [d.input_ids.tolist() for d in docs]
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert ds.column_names == ["text"] and len(ds) == 10
    saved = datasets.load_from_disk(str(save_documents(docs, tmp_path / "short_ids", field="input_ids")))
    assert saved["input_ids"] == [d.input_ids.tolist() for d in docs]
    with pytest.raises(LongkdError, match="field"):
        save_documents(docs, tmp_path / "x.jsonl", field="ids")


def test_recipe_hash_separates_teacher_and_student():
    base = toy_models.RECIPES["w256"]
    other_student = dataclasses.replace(base, student_train=dataclasses.replace(base.student_train, lr=1e-3))
    assert toy_models.recipe_hash("teacher", base) == toy_models.recipe_hash("teacher", other_student)
    assert toy_models.recipe_hash("student", base) != toy_models.recipe_hash("student", other_student)
    assert toy_models.recipe_hash("teacher", base) != toy_models.recipe_hash("student", base)
    assert toy_models.recipe_hash("teacher", base) != toy_models.recipe_hash(
        "teacher", dataclasses.replace(base, window=128))
    with pytest.raises(LongkdError, match="kind"):
        toy_models.recipe_hash("tutor", base)


def test_learning_rate_schedule():
    spec = toy_models.TrainSpec(max_steps=100, warmup=10, lr=1.0, final_lr_ratio=0.1)
    lrs = [toy_models._lr_at(s, spec) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(0.1)


def test_get_or_train_saves_a_loadable_model_and_reuses_it(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = toy_models.ToyRecipe(
        name="smoke", window=64, short=32,
        teacher=toy_models.ModelSpec(hidden_size=32), student=toy_models.ModelSpec(hidden_size=32),
        teacher_train=toy_models.TrainSpec(max_steps=3, min_steps=2, check_every=2, warmup=1,
                                           batch_tokens=128),
        student_train=toy_models.TrainSpec(max_steps=3, min_steps=2, check_every=2, warmup=1,
                                           batch_tokens=64),
        probes_per_distance=4, check_per_distance=2,
    )
    # Both at once: on a machine with two cores the student trains in a child process.
    paths = toy_models.get_or_train_both(tiny, tmp_path, progress=False)
    for kind, context in (("teacher", 64), ("student", 32)):
        path = paths[kind]
        assert path.name == f"{kind}-{toy_models.recipe_hash(kind, tiny)}"
        metrics = toy_models.load_metrics(path)
        assert metrics["steps"] == 3 and metrics["context"] == context
        assert set(metrics["retrieval"]) == {str(d) for d in tiny.distances()}
        assert all(0.0 <= a <= 1.0 for a in metrics["retrieval"].values())
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.max_position_embeddings == context
        assert AutoTokenizer.from_pretrained(path)("t9 t10").input_ids == [9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{k}-{toy_models.recipe_hash(k, tiny)}" for k in ("teacher", "student"))

    def fail(*args, **kwargs):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(toy_models, "train", fail)
    assert toy_models.get_or_train("teacher", tiny, tmp_path, progress=False).is_dir()


def test_precondition_rule():
    recipe = toy_models.RECIPES["w256"]
    chance = recipe.world.chance
    ds = recipe.distances()
    assert toy_models.precondition("teacher", recipe, {d: 0.95 for d in ds})
    assert not toy_models.precondition("teacher", recipe, {d: (0.95 if d < 200 else 0.85) for d in ds})
    inside = recipe.short_max_distance()
    good = {d: (0.97 if d <= inside else chance) for d in ds}
    assert toy_models.precondition("student", recipe, good)
    assert toy_models.precondition("student", recipe, {**good, recipe.short + 16: 3 * chance})
    assert not toy_models.precondition("student", recipe, {**good, recipe.short + 16: 3.5 * chance})
    assert not toy_models.precondition("student", recipe, {**good, 4: 0.5})


@pytest.mark.slow
def test_teacher_curriculum_then_long_documents(tmp_path, monkeypatch):
    """The teacher reads S-token documents for ``short_steps``, then W-token ones; the weighted
    loss falls well below where it started, and metrics.json agrees with the precondition rule."""
    lengths = []
    real_batch = toy_models._batch

    def recording_batch(recipe, length, rng, spec):
        lengths.append(length)
        ids, weights = real_batch(recipe, length, rng, spec)
        assert ids.shape == (spec.batch_tokens // length, length)
        assert weights.shape == (ids.shape[0], length - 1)
        return ids, weights

    monkeypatch.setattr(toy_models, "_batch", recording_batch)
    recipe = toy_models.ToyRecipe(
        window=128, short=32,
        teacher_train=toy_models.TrainSpec(max_steps=150, min_steps=150, short_steps=100, check_every=150,
                                           batch_tokens=1024),
        probes_per_distance=16, check_per_distance=8,
    )
    metrics = toy_models.train("teacher", recipe, tmp_path / "t", progress=False)
    assert lengths == [32] * 100 + [128] * 50
    assert metrics["final_loss"] < metrics["first_loss"] - 0.5, metrics
    acc = {int(d): a for d, a in metrics["retrieval"].items()}
    assert metrics["precondition"] == toy_models.precondition("teacher", recipe, acc)


def test_batch_weights_mark_answers_and_repeats():
    recipe = toy_models.RECIPES["w256"]
    spec = toy_models.TrainSpec(batch_tokens=64 * 40, answer_weight=4.0, copy_weight=0.5)
    ids, weights = toy_models._batch(recipe, 64, np.random.default_rng(0), spec)
    world = recipe.world
    for row, w in zip(ids.numpy(), weights.numpy()):
        queried = np.flatnonzero(row[:-1] == world.query_id) + 1  # the key; its row predicts the value
        expected = np.ones(63)
        if not (row == world.fact_id).any() and not queried.size:  # a repeat document
            period = next(p for p in range(world.min_period, 33)
                          if np.array_equal(row, np.resize(row[:p], 64)))
            expected[period : 63] += 0.5
        expected[queried[queried < 63]] += 4.0
        np.testing.assert_allclose(w, expected)
