"""Dataset loading: real files through the datasets library, tokenized with the word tokenizer.

Samples are random id lists written as text (``t5 t9 ...``), so every loaded sample must equal
the ids it was written from; streaming must equal non-streaming; shuffles must be seeded
permutations.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from longkd.cache.data import load_samples
from longkd.cache.packing import Packer, PackingConfig
from longkd.errors import LongkdError
from longkd.tools.random_models import build_word_tokenizer, ids_to_text

VOCAB = 64


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    # load_dataset caches converted Arrow files; keep them in the test's own directory.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(VOCAB)


@pytest.fixture
def samples():
    """Random samples (fresh each run): ids in [4, VOCAB), lengths 0..40, one empty."""
    rng = np.random.default_rng()
    out = [rng.integers(4, VOCAB, size=int(rng.integers(1, 41))).tolist() for _ in range(37)]
    out[5] = []
    return out


def write_jsonl(path, samples, **extra):
    with open(path, "w") as f:
        for ids in samples:
            f.write(json.dumps({"text": ids_to_text(ids), "ids": ids, **extra}) + "\n")
    return path


def as_dataset(samples):
    return datasets.Dataset.from_dict({"text": [ids_to_text(s) for s in samples], "ids": samples})


def test_jsonl_text_and_describe(tmp_path, tok, samples):
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    source = load_samples(str(path), tokenizer=tok)
    got = list(source)
    assert got == samples and all(isinstance(x, list) for x in got)
    assert list(source) == samples  # re-iterable
    # Batched tokenization equals one-by-one tokenization without special tokens.
    assert got[1] == tok(ids_to_text(samples[1]), add_special_tokens=False)["input_ids"]
    assert source.describe() == {
        "source": str(path),
        "format": "json",
        "split": "train",
        "text_field": "text",
        "streaming": False,
        "shuffle": False,
        "seed": 0,
        "samples": len(samples),
    }


def test_json_list_parquet_csv_text(tmp_path, tok, samples):
    ds = as_dataset(samples)
    (tmp_path / "d.json").write_text(json.dumps([{"body": ids_to_text(s)} for s in samples]))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.select_columns(["text"]).to_csv(str(tmp_path / "d.csv"), index=False)
    (tmp_path / "d.txt").write_text("".join(ids_to_text(s) + "\n" for s in samples))
    assert list(load_samples(tmp_path / "d.json", tokenizer=tok, text_field="body")) == samples
    assert list(load_samples(tmp_path / "d.parquet", tokenizer=tok)) == samples
    # csv reads an empty cell as missing (None): an empty sample all the same.
    assert list(load_samples(tmp_path / "d.csv", tokenizer=tok)) == samples
    text = load_samples(tmp_path / "d.txt", tokenizer=tok)
    assert list(text) == samples and text.describe()["format"] == "text"


def test_glob_and_directory_of_files(tmp_path, tok, samples):
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, start in enumerate(range(0, len(samples), 10)):
        write_jsonl(parts / f"p{i:02d}.jsonl", samples[start : start + 10])
    assert list(load_samples(str(parts / "p*.jsonl"), tokenizer=tok)) == samples
    assert list(load_samples(parts, tokenizer=tok)) == samples


def test_save_to_disk_dataset_and_dict(tmp_path, tok, samples):
    ds = as_dataset(samples)
    ds.save_to_disk(str(tmp_path / "plain"))
    source = load_samples(tmp_path / "plain", tokenizer=tok)
    assert list(source) == samples and source.describe()["format"] == "load_from_disk"

    half = len(samples) // 2
    dd = datasets.DatasetDict(
        {"train": ds.select(range(half)), "validation": ds.select(range(half, len(ds)))}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert list(load_samples(tmp_path / "dict", tokenizer=tok)) == samples[:half]
    val = load_samples(tmp_path / "dict", tokenizer=tok, split="validation")
    assert list(val) == samples[half:] and val.describe()["split"] == "validation"
    with pytest.raises(LongkdError, match="no split 'test'.*train, validation"):
        load_samples(tmp_path / "dict", tokenizer=tok, split="test")

    datasets.DatasetDict({"only": ds}).save_to_disk(str(tmp_path / "one"))
    one = load_samples(tmp_path / "one", tokenizer=tok, split="train")
    assert list(one) == samples and one.describe()["split"] == "only"
    before = sorted(p.name for p in (tmp_path / "plain").iterdir())
    list(load_samples(tmp_path / "plain", tokenizer=tok, shuffle=True, seed=3))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == before  # nothing written there


def test_pretokenized_column_needs_no_tokenizer(tmp_path, samples):
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    source = load_samples(path, input_ids_field="ids")
    assert list(source) == samples
    d = source.describe()
    assert d["input_ids_field"] == "ids" and "text_field" not in d
    as_dataset(samples).to_parquet(str(tmp_path / "d.parquet"))
    assert list(load_samples(tmp_path / "d.parquet", input_ids_field="ids", streaming=True)) == samples


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "saved"])
def test_streaming_equals_in_memory(tmp_path, tok, samples, kind):
    ds = as_dataset(samples)
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", samples)
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    elif kind == "txt":
        path = tmp_path / "d.txt"
        path.write_text("".join(ids_to_text(s) + "\n" for s in samples))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    streamed = load_samples(path, tokenizer=tok, streaming=True)
    assert isinstance(streamed.dataset, datasets.IterableDataset)
    assert list(streamed) == list(load_samples(path, tokenizer=tok)) == samples
    assert list(streamed) == samples
    d = streamed.describe()
    assert d["streaming"] is True and d["samples"] is None


@pytest.mark.parametrize("streaming", [False, True])
def test_shuffle_is_a_seeded_permutation(tmp_path, tok, streaming):
    rng = np.random.default_rng()
    # Distinct samples, so a permutation is visible as such.
    samples = [[4 + i % 60, 4 + i // 60, *rng.integers(4, VOCAB, size=3).tolist()] for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    a = load_samples(path, tokenizer=tok, streaming=streaming, shuffle=True, seed=11)
    order = list(a)
    assert order == list(a)  # re-iteration keeps the order
    assert order == list(load_samples(path, tokenizer=tok, streaming=streaming, shuffle=True, seed=11))
    other = list(load_samples(path, tokenizer=tok, streaming=streaming, shuffle=True, seed=12))
    assert order != samples and other != order
    assert sorted(order) == sorted(other) == sorted(samples)
    assert a.describe()["shuffle"] is True and a.describe()["seed"] == 11


def test_load_then_pack_keeps_every_token(tmp_path, tok, samples):
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    eos = tok.eos_token_id
    packer = Packer(PackingConfig(window=16, eos_id=eos, tail="pad", pad_id=tok.pad_token_id))
    windows = list(packer.pack(load_samples(path, tokenizer=tok)))
    real = np.concatenate([w.input_ids[: w.length] for w in windows]).tolist()
    assert real == [t for s in samples if s for t in [*s, eos]]
    assert packer.stats.samples == len(samples) and packer.stats.empty_samples == 1


def test_missing_paths(tmp_path, tok):
    with pytest.raises(LongkdError, match="does not exist"):
        load_samples(tmp_path / "nope.jsonl", tokenizer=tok)
    with pytest.raises(LongkdError, match="does not exist"):
        load_samples(str(tmp_path / "nodir"), tokenizer=tok)
    with pytest.raises(LongkdError, match="no file matches"):
        load_samples(str(tmp_path / "*.parquet"), tokenizer=tok)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LongkdError, match="neither a saved dataset"):
        load_samples(tmp_path / "empty_dir", tokenizer=tok)


def test_unknown_extension_and_override(tmp_path, tok, samples):
    path = write_jsonl(tmp_path / "d.data", samples)
    with pytest.raises(LongkdError, match="data_files_format"):
        load_samples(path, tokenizer=tok)
    assert list(load_samples(path, tokenizer=tok, data_files_format="json")) == samples
    with pytest.raises(LongkdError, match="data_files_format must be one of"):
        load_samples(path, tokenizer=tok, data_files_format="xml")


@pytest.mark.parametrize("streaming", [False, True])
def test_empty_dataset(tmp_path, tok, streaming):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(LongkdError, match="is empty"):
        list(load_samples(tmp_path / "e.jsonl", tokenizer=tok, streaming=streaming))
    features = datasets.Features({"text": datasets.Value("string")})
    datasets.Dataset.from_dict({"text": []}, features=features).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(LongkdError, match="is empty"):
        list(load_samples(tmp_path / "e.parquet", tokenizer=tok, streaming=streaming))
    # An empty saved dataset (datasets writes it with zero shards).
    as_dataset([[4]]).select([]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(LongkdError, match="is empty"):
        list(load_samples(tmp_path / "saved", tokenizer=tok, streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_text_field_lists_columns(tmp_path, tok, samples, streaming):
    path = write_jsonl(tmp_path / "d.jsonl", samples, lang="x")
    with pytest.raises(LongkdError, match="no column 'content'; available columns: text, ids, lang"):
        list(load_samples(path, tokenizer=tok, text_field="content", streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True])
def test_non_integer_input_ids(tmp_path, streaming):
    path = tmp_path / "d.jsonl"
    path.write_text('{"ids": [4.5, 6.0]}\n{"ids": [4, 5]}\n')
    with pytest.raises(LongkdError, match="row 0 of input_ids field 'ids' is not a list of integer"):
        list(load_samples(path, input_ids_field="ids", streaming=streaming))
    path.write_text('{"ids": "t4 t5"}\n')
    with pytest.raises(LongkdError, match="input_ids field 'ids'"):
        list(load_samples(path, input_ids_field="ids", streaming=streaming))
    path.write_text('{"ids": [4, -1]}\n')
    with pytest.raises(LongkdError, match="negative"):
        list(load_samples(path, input_ids_field="ids", streaming=streaming))


def test_text_field_errors(tmp_path, tok, samples):
    path = write_jsonl(tmp_path / "d.jsonl", samples)
    with pytest.raises(LongkdError, match="tokenizer is needed"):
        load_samples(path)
    with pytest.raises(LongkdError, match="not text"):
        list(load_samples(path, tokenizer=tok, text_field="ids"))


def test_hub_name_offline_is_a_clear_error(monkeypatch, tok):
    # Patch the hub call so the test never touches the network; the name must route to it.
    seen = []

    def fake_load_dataset(name, **kwargs):
        seen.append(name)
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(LongkdError, match="could not load someone/corpus as a hub dataset"):
        load_samples("someone/corpus", tokenizer=tok)
    assert seen == ["someone/corpus"]
