"""Retrieval evals: prompts fitted to length, RULER / passkey scoring on scripted models, outputs, CLI."""

from __future__ import annotations

import json
import logging
import random
import re
import string
from types import SimpleNamespace

import pytest
import torch

from longkd.cli import main
from longkd.errors import LongkdError
from longkd.tools import eval_cache, eval_prompts, evals


@pytest.fixture(scope="module")
def char_tokenizer():
    """A real fast tokenizer with one token per character, so any prompt text round-trips."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(set(string.printable) - set("\t\r\x0b\x0c")):
        vocab[c] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class ScriptedModel:
    """Reads the needle(s) out of the prompt text and answers per ``policy``.

    ``oracle``: every expected value; ``never``: a fixed wrong answer; ``shallow``: right only
    when the (first) needle sits in the first half of the haystack; ``first2``: only the first
    two values of the queried key. Records the prompt lengths it was given.
    """

    def __init__(self, tokenizer, policy: str):
        self.tokenizer, self.policy, self.prompt_lengths = tokenizer, policy, []

    def answer(self, text: str) -> str:
        intro, haystack, question = text.split("\n")
        passkey = re.search(r"The pass key is (\d+)\.", haystack)
        if passkey:
            values, first = [passkey.group(1)], passkey.start()
        else:
            key = re.search(r"for (\S+) mentioned", question).group(1)
            found = list(re.finditer(rf"for {re.escape(key)} is: (\S+)\.", haystack))
            values, first = [m.group(1) for m in found], min(m.start() for m in found)
        if self.policy == "never":
            return " I do not know."
        if self.policy == "shallow" and first / len(haystack) >= 0.5:
            return " 0"
        if self.policy == "first2":
            values = values[:2]
        return " " + ", ".join(values) + "."

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and attention_mask.shape == input_ids.shape
        self.prompt_lengths.append(input_ids.shape[1])
        text = self.tokenizer.decode(input_ids[0].tolist(), skip_special_tokens=True)
        out = self.tokenizer(self.answer(text), add_special_tokens=False).input_ids[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([out], dtype=torch.long)], dim=1)


NEEDLES = [
    eval_prompts.NeedleConfig("single", "word", "number"),
    eval_prompts.NeedleConfig("single", "number", "uuid"),
    eval_prompts.NeedleConfig("multikey", "uuid", "word", num_keys=3),
    eval_prompts.NeedleConfig("multivalue", "word", "number", num_values=4),
]


@pytest.mark.parametrize("task,needle", [("passkey", None)] + [("needle", n) for n in NEEDLES])
def test_oracle_scores_100_and_silent_model_0(char_tokenizer, task, needle):
    lengths, depths = [700, 1100], [0, 33, 50, 100]
    for policy, expected in (("oracle", 100.0), ("never", 0.0)):
        model = ScriptedModel(char_tokenizer, policy)
        res = evals.run_retrieval(model, char_tokenizer, task, lengths, depths, samples=2, seed=3,
                                  needle=needle, max_new_tokens=200)  # fmt: skip
        assert res.score == [[expected] * len(depths)] * len(lengths)
        assert res.mean == expected
        # Every prompt fills its length to within a filler sentence (at most ~22 characters here).
        assert all(n - 22 <= got <= n for n, got in zip([700] * 8 + [1100] * 8, model.prompt_lengths))


def test_half_the_depths_scores_50(char_tokenizer):
    model = ScriptedModel(char_tokenizer, "shallow")
    res = evals.run_retrieval(model, char_tokenizer, "passkey", [900], [0, 25, 75, 100], samples=3)
    assert res.score == [[100.0, 100.0, 0.0, 0.0]]
    assert res.mean == 50.0
    res = evals.run_retrieval(model, char_tokenizer, "needle", [3000], [10, 40, 60, 90],
                              needle=eval_prompts.NeedleConfig("multikey"))  # fmt: skip
    assert res.score == [[100.0, 100.0, 0.0, 0.0]]


def test_multivalue_scores_the_fraction_found(char_tokenizer):
    model = ScriptedModel(char_tokenizer, "first2")
    cfg = eval_prompts.NeedleConfig("multivalue", value_type="uuid", num_values=4)
    res = evals.run_retrieval(
        model, char_tokenizer, "needle", [1500], [0, 50], needle=cfg, max_new_tokens=120
    )
    assert res.score == [[50.0, 50.0]]


def test_scorers():
    assert eval_prompts.score_passkey(" 4821. The pass key", "4821") == 100.0
    assert eval_prompts.score_passkey(" 54821", "4821") == 0.0  # not a different, longer number
    assert eval_prompts.score_passkey(" 48210", "4821") == 0.0
    assert eval_prompts.string_match_all("Alpha and GAMMA", ["alpha", "beta", "gamma", "delta"]) == 50.0
    assert eval_prompts.string_match_all("", ["x"]) == 0.0


def test_prompts_are_the_published_templates():
    import random

    probe = eval_prompts.passkey_probe(0.5, random.Random(0))
    text = probe.build(10)
    key = probe.answers[0]
    assert text.startswith(eval_prompts.PASSKEY_INTRO + "\n") and text.endswith(
        "\nWhat is the pass key? The pass key is"
    )
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
    assert 1 <= int(key) <= 50000
    # Depth 50% of 10 sentences: the needle after the 5th filler sentence.
    hay = text.split("\n")[1]
    assert hay.split(" The pass key")[0].count(".") == 5
    probe = eval_prompts.needle_probe(
        0.0, random.Random(1), eval_prompts.NeedleConfig("multivalue", "uuid", "uuid", num_values=3)
    )
    text = probe.build(20)
    assert text.startswith("Some special magic uuids are hidden within the following text.")
    assert text.count("One of the special magic uuids for ") == 3
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
               for v in probe.answers)  # fmt: skip
    assert text.split("\n")[1].startswith("One of the special magic uuids")  # depth 0: first in the haystack


@pytest.mark.parametrize("length", [64, 97, 250, 1000])
def test_fit_prompt_is_the_longest_that_fits(length):
    import random

    from longkd.tools.random_models import build_word_tokenizer

    tok = build_word_tokenizer(64)  # every whitespace word is one token (mostly <unk>)
    probe = eval_prompts.passkey_probe(0.3, random.Random(length))
    ids, n = eval_prompts.fit_prompt(tok, probe.build, length)
    assert len(ids) <= length < len(tok(probe.build(n + 1)).input_ids)
    assert ids == tok(probe.build(n)).input_ids
    with pytest.raises(LongkdError, match="too short"):
        eval_prompts.fit_prompt(tok, probe.build, 10)


def test_extrapolation_marked_and_outputs_written(char_tokenizer, tmp_path, caplog):
    model = ScriptedModel(char_tokenizer, "shallow")
    with caplog.at_level(logging.WARNING, logger="longkd.tools.evals"):
        res = evals.run_retrieval(model, char_tokenizer, "passkey", [600, 1200, 2400], [0, 100],
                                  max_positions=1000)  # fmt: skip
    assert res.extrapolation == [False, True, True]
    assert sum("exceeds the model's position limit 1000" in r.message for r in caplog.records) == 2
    paths = evals.write_outputs(res, tmp_path, model_name="/models/scripted")
    data = json.loads(paths["json"].read_text())
    assert {(c["length"], c["extrapolation"]) for c in data["cells"]} == {
        (600, False),
        (1200, True),
        (2400, True),
    }
    assert data["by_length"]["1200"] == {"score": 50.0, "extrapolation": True}
    table = paths["markdown"].read_text()
    assert (
        "| 1200 (extrapolation) | 100.0 | 0.0 | 50.0 |" in table and "| 600 | 100.0 | 0.0 | 50.0 |" in table
    )
    png = paths["heatmap"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_position_limit_reads_rope_scaling():
    from longkd.models import tiny_config

    assert evals.position_limit(tiny_config("llama", max_position_embeddings=256)) == 256
    rope = {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256}
    scaled = tiny_config("llama", max_position_embeddings=256, rope_parameters=rope)
    assert evals.position_limit(scaled) == 1024
    # A trainer checkpoint that already raised max_position_embeddings keeps it.
    scaled.max_position_embeddings = 2048
    assert evals.position_limit(scaled) == 2048
    # Dynamic NTK rescales at run time: its factor does not raise the limit (as in trainer/rope.py).
    rng = random.Random()
    mpe, original, factor = rng.randint(16, 4096), rng.randint(16, 4096), rng.uniform(1.1, 8.0)
    dynamic = {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": original}
    assert evals.position_limit(SimpleNamespace(max_position_embeddings=mpe, rope_parameters=dynamic)) == mpe
    # yarn with the original length kept on the config; the scaled length is rounded, not truncated.
    yarn = SimpleNamespace(max_position_embeddings=None, original_max_position_embeddings=original,
                           rope_parameters={"rope_type": "yarn", "factor": factor})  # fmt: skip
    assert evals.position_limit(yarn) == round(original * factor)
    # eval_cache (cache-kl) uses this same definition, not a copy.
    assert eval_cache.position_limit is evals.position_limit


def test_bad_input(tmp_path):
    with pytest.raises(LongkdError, match="not a model directory"):
        evals.load_model(str(tmp_path))
    with pytest.raises(LongkdError, match="needle-variant"):
        eval_prompts.NeedleConfig("triple")
    with pytest.raises(LongkdError, match="depths"):
        evals.parse_depths([50, 120])
    with pytest.raises(LongkdError, match="not a text retrieval task"):
        evals.run_retrieval(None, None, "toy", [10], [0])


@pytest.mark.slow
def test_cli_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama", max_position_embeddings=128, hidden_size=32, vocab_size=128)
    out = tmp_path / "ev"
    rc = main(["eval", str(model), "--task", "needle", "--lengths", "100,200", "--depths", "0,100",
               "--max-new-tokens", "3", "--out", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["max_positions"] == 128 and data["by_length"]["200"]["extrapolation"] is True
    assert all(c["prompt_tokens"] <= c["length"] for c in data["cells"])
    assert (out / "heatmap.png").stat().st_size > 0 and "extrapolation" in (out / "results.md").read_text()
    # The token-level toy probe runs on the same model, given a toy world that fits its vocabulary.
    world = '{"vocab_size": 128, "num_keys": 16, "num_values": 16}'
    rc = main(["eval", str(model), "--task", "toy", "--distances", "8,150", "--per-distance", "4",
               "--toy-world", world, "--out", str(tmp_path / "toy"), "--json"])  # fmt: skip
    assert rc == 0
    toy = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert [r["extrapolation"] for r in toy["by_distance"]] == [False, True]
    assert {k: toy["world"][k] for k in ("vocab_size", "num_keys", "num_values")} == json.loads(world)
    assert (tmp_path / "toy" / "accuracy.png").is_file()
    capsys.readouterr()
    assert main(["eval", str(model), "--task", "bogus"]) == 2
    assert main(["eval", str(tmp_path), "--task", "passkey"]) == 2
    assert main(["eval", str(model), "--task", "cache-kl"]) == 2
    err = capsys.readouterr().err
    assert "--task 'bogus' is unknown" in err and "is not a model directory" in err and "needs --cache" in err


@pytest.mark.slow
def test_cache_kl_task_delegates_to_eval_cache(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("llama", max_position_embeddings=128, hidden_size=32, vocab_size=128)
    data = tmp_path / "d.jsonl"
    docs = [" ".join(f"t{4 + (i * 7 + j) % 120}" for j in range(30)) for i in range(12)]
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    cache = tmp_path / "cache"
    assert main(["cache", "build", "--teacher", str(model), "--data", str(data), "--window", "32",
                 "--out", str(cache), "--top-k", "128", "--max-windows", "3"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "kl"
    assert main(["eval", str(model), "--task", "cache-kl", "--cache", str(cache), "--windows", "2",
                 "--buckets", "2", "--out", str(out), "--json"]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert json.loads(capsys.readouterr().out) == result
    # The teacher against its own full-vocabulary cache: KL ~ 0 in every bucket.
    assert len(result["by_position"]) == 2 and all(abs(b["kl"]) < 1e-5 for b in result["by_position"])
    assert (out / "kl.png").is_file() and (out / "results.md").is_file()


def _kl_result(rng: random.Random) -> dict:
    """A random result shaped like ``kl_by_position``'s, the last bucket beyond the position limit."""
    buckets = [(0, 8), (8, 16), (16, 24), (24, 32)]
    by_position = [
        {"bucket": f"{s}-{e - 1}", "start": s, "end": e, "rows": rng.randint(1, 50), "kl": rng.random(),
         "ce": rng.random() * 5, "perplexity": rng.random() * 100, "teacher_nll": rng.random() * 5,
         "max_position_id": e - 1, "extrapolation": s >= 24}
        for s, e in buckets
    ]  # fmt: skip
    overall = {k: by_position[0][k] for k in ("rows", "kl", "ce", "perplexity", "teacher_nll")}
    return {
        "model": "/models/student", "cache": "file:///caches/c", "windows": [5, 6], "window": 32,
        "cache_window": 32, "selection": {"mode": "topk", "k": 8}, "mode": "bucket", "temperature": 1.0,
        "max_positions": 24, "rows": sum(e["rows"] for e in by_position), "overall": overall,
        "by_position": by_position, "extrapolation": True,
    }  # fmt: skip


def test_cache_kl_task_calls_eval_cache(tmp_path, monkeypatch, capsys):
    result = _kl_result(random.Random())
    calls = []

    def fake_kl_by_position(model, uri, **kwargs):
        calls.append((model, uri, kwargs))
        return result

    monkeypatch.setattr(eval_cache, "kl_by_position", fake_kl_by_position)
    out = tmp_path / "kl"
    # Options left unset (--buckets) are not passed, so kl_by_position's defaults apply.
    assert main(["eval", "/models/student", "--task", "cache-kl", "--cache", "/caches/c", "--windows", "2",
                 "--device", "cpu", "--out", str(out), "--json"]) == 0  # fmt: skip
    assert calls == [("/models/student", "/caches/c", {"windows": 2, "device": "cpu", "dtype": "float32"})]
    assert json.loads(capsys.readouterr().out) == result == json.loads((out / "results.json").read_text())
    table = eval_cache.format_kl(result)
    assert (out / "results.md").read_text() == f"# KL to the teacher by position\n\n```\n{table}\n```\n"
    assert (out / "kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without --json the terminal gets the same table as results.md.
    assert main(["eval", "m", "--task", "cache-kl", "--cache", "c", "--buckets", "4", "--dtype", "bfloat16",
                 "--device", "cpu", "--out", str(tmp_path / "kl2")]) == 0  # fmt: skip
    assert calls[-1][2] == {"buckets": 4, "device": "cpu", "dtype": "bfloat16"}
    assert capsys.readouterr().out.strip() == table
    paths = eval_cache.write_cache_kl(result, tmp_path / "kl3")
    assert paths["table"] == table and paths["plot"] == tmp_path / "kl3" / "kl.png"
    assert main(["eval", "m", "--task", "cache-kl"]) == 2 and "needs --cache" in capsys.readouterr().err
