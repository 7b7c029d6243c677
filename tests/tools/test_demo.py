"""``longkd demo``: the end-to-end run (slow) and the pieces it is assembled from (fast).

The slow test drives the real command at a size below ``--quick`` (fewer steps, documents
and probes) and checks that its outputs exist and agree with each other: every number in
results.md is re-derived here from the eval output files, not trusted from results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from longkd.errors import LongkdError
from longkd.tools import cli as tools_cli
from longkd.tools import demo, demo_report
from longkd.tools.toy_models import RECIPES

# ----------------------------------------------------------------------------- fast pieces


def test_precondition_check_names_every_failing_distance():
    from longkd.tools.toy_models import check_precondition

    recipe = RECIPES["w256"]
    check_precondition("teacher", recipe, {8: 1.0, 200: 0.95})
    with pytest.raises(LongkdError, match=r"teacher retrieves 80% at distance 200 \(needs >= 90%\)"):
        check_precondition("teacher", recipe, {8: 1.0, 200: 0.8})
    check_precondition("student", recipe, {8: 1.0, 46: 0.9, 64: 0.6, 200: 0.1})
    with pytest.raises(LongkdError, match=r"50% at distance 8 .*; 50% at distance 200 beyond S=64"):
        check_precondition("student", recipe, {8: 0.5, 46: 1.0, 200: 0.5})


def test_out_dir_not_made_by_the_demo_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LongkdError, match="not made by longkd demo"):
        demo.prepare_out(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    fresh = tmp_path / "new"
    demo.prepare_out(fresh)
    (fresh / "train").mkdir()
    (fresh / "models").mkdir()
    demo.prepare_out(fresh)  # a rerun clears the stage folders and keeps the models
    assert not (fresh / "train").exists() and (fresh / "models").is_dir()


def test_size_flags_override_the_preset():
    args = argparse.Namespace(quick=True, steps=7, seeds=None, lr=None, recipe=None, batch_size=None,
                              train_docs=None, heldout_docs=None, top_k=None, per_distance=5)  # fmt: skip
    s = tools_cli.demo_settings_from_args(args)
    assert (s.steps, s.per_distance, s.seeds, s.recipe) == (7, 5, 1, "w256")
    args.quick, args.steps = False, None
    assert tools_cli.demo_settings_from_args(args).seeds == 3
    args.steps = 0
    with pytest.raises(LongkdError, match="--steps"):
        tools_cli.demo_settings_from_args(args)


def test_train_config_is_valid_and_schedules_grow_from_s_to_w(tmp_path):
    from longkd.tools.toy_models import build_model
    from longkd.trainer.config import parse_config
    from longkd.trainer.rope import build_schedule

    recipe = RECIPES["w512"]
    d = demo.Demo(out=tmp_path, models_dir=tmp_path, device="cpu", settings=demo.DemoSettings(recipe="w512"))
    names = ["kd-phasewise", "kd-static", "ce-phasewise"]
    cfg = parse_config(
        demo.train_config(d, tmp_path / "student", tmp_path / "cache", tmp_path / "run", names, 3)
    )
    assert [s.name for s in cfg.students] == names and cfg.seed == 3
    ce = cfg.student("ce-phasewise")
    assert (ce.loss.kd_weight, ce.loss.ce_weight) == (0.0, 1.0)
    assert cfg.student("kd-phasewise").loss.ce_weight == 0.0
    base = build_model(recipe.student, recipe.world, recipe.short, 0).config
    phasewise = build_schedule(cfg.student("kd-phasewise").schedule, base_config=base)
    static = build_schedule(cfg.student("kd-static").schedule, base_config=base)
    assert phasewise[0].window == recipe.short and phasewise[-1].window == recipe.window
    assert phasewise[0].rope_parameters is None  # factor 1 at window S
    factors = [p.rope_parameters["factor"] for p in phasewise[1:]]
    assert factors == sorted(factors) and factors[-1] == recipe.window / recipe.short
    assert all(p.rope_parameters["factor"] == recipe.window / recipe.short for p in static)
    assert phasewise[-1].until == cfg.steps


def _fake_eval(rng, distances, with_kl):
    entry = {"toy": {d: float(rng.integers(0, 65)) / 64 for d in distances}, "toy_results": "x"}
    if with_kl:
        rows = [int(r) for r in rng.integers(1, 50, size=4)]
        entry["kl"] = {
            "overall": {"kl": 0.5},
            "by_position": [{"start": 64 * i, "rows": rows[i], "kl": float(rng.random())} for i in range(4)],
        }
        entry["kl_results"] = "y"
    return entry


def _random_summary(rng):
    """Random evals of every demo model over 3 seeds, and the demo report's summary of them."""
    recipe = RECIPES["w256"]
    distances = recipe.distances()
    evals = {
        seed: {name: _fake_eval(rng, distances, name != "teacher") for name in demo_report.ORDER}
        for seed in range(3)
    }
    res = demo_report.summarize(evals, recipe=recipe, settings={"steps": 1, "batch_size": 1}, timings={},
                                record={}, device="cpu")  # fmt: skip
    return recipe, evals, res


def test_summary_statistics_match_numpy_on_random_evals():
    recipe, evals, res = _random_summary(np.random.default_rng(0))
    for name in ("kd-phasewise", "ce-phasewise"):
        beyond = [
            np.mean([a for d, a in evals[s][name]["toy"].items() if d > recipe.short]) for s in range(3)
        ]
        agg = res["models"][name]["summary"]["beyond"]
        assert agg["mean"] == pytest.approx(np.mean(beyond)) and agg["sd"] == pytest.approx(
            np.std(beyond, ddof=1)
        )
        kl = evals[1][name]["kl"]["by_position"]
        want = sum(e["kl"] * e["rows"] for e in kl[1:]) / sum(e["rows"] for e in kl[1:])
        assert res["models"][name]["per_seed"]["1"]["kl_from_S"] == pytest.approx(want)
    text = demo_report.markdown(res)
    assert "kd-reset-control" in text and "±" in text


def test_claim_checks_match_numpy_on_random_evals():
    recipe, evals, res = _random_summary(np.random.default_rng())
    claims = {c["name"]: c for c in res["claims"]}
    assert set(claims) == {c[0] for c in demo_report.CLAIMS}

    def mean(seed, name, low, high=recipe.window):
        return np.mean([a for d, a in evals[seed][name]["toy"].items() if low < d <= high])

    S, W = recipe.short, recipe.window
    for seed in range(3):
        want = {
            "kd_beyond_S": mean(seed, "kd-phasewise", S),
            "kd_over_ce": mean(seed, "kd-phasewise", S) - mean(seed, "ce-phasewise", S),
            "phasewise_vs_static": mean(seed, "kd-phasewise", S) - mean(seed, "kd-static", S),
            "kd_over_control": mean(seed, "kd-phasewise", 2 * S, W - S)
            - mean(seed, "kd-reset-control", 2 * S, W - S),
        }
        for name, value in want.items():
            assert claims[name]["per_seed"][str(seed)] == pytest.approx(value), name
    for c in claims.values():
        assert c["ok"] == (min(c["per_seed"].values()) >= c["bound"])
    table = _table(demo_report.markdown(res), "## Claims")
    assert [row[-1] for row in table.values()] == ["ok" if c["ok"] else "FAILED" for c in res["claims"]]


def test_a_failed_claim_stops_the_demo_unless_no_checks(tmp_path, capsys):
    claim = dict(name="kd_over_ce", claim="KD beats cross-entropy", measures="a - b, distances 64 < d <= 256",
                 bound=0.25, per_seed={"0": 0.40, "1": 0.21}, ok=False)  # fmt: skip
    with pytest.raises(LongkdError, match=r"cross-entropy \(a - b, distances 64 < d <= 256: 21.0 < 25\)"):
        demo.check_claims({"claims": [claim]}, tmp_path)
    demo.check_claims({"claims": [claim]}, tmp_path, checks=False)
    assert "WARNING: the demo's claims failed" in capsys.readouterr().out
    demo.check_claims({"claims": [dict(claim, ok=True)]}, tmp_path)  # nothing failed: no error


def test_cpu_numerics_are_set_before_torch_and_never_override(monkeypatch):
    monkeypatch.setattr(demo.platform, "machine", lambda: "x86_64")
    for name in demo.CPU_NUMERICS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    demo.pin_cpu_numerics()
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"  # the user's value wins
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_numerics_records_the_code_paths_in_use():
    record = demo.numerics()
    assert record["threads"] >= 1 and record["torch"] and record["cpu_capability"]
    assert all(record[name] == os.environ.get(name) for name in demo.CPU_NUMERICS)


# ----------------------------------------------------------------------------- the whole demo


def _table(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the markdown table under ``heading``: first cell -> the other cells."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2 :]:  # past the header and the |---| row
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    return float(re.match(r"-?[\d.]+", cell).group(0))


def _weak_models(models_dir: Path) -> None:
    """Save briefly trained toy models where ``get_or_train`` looks for the quick recipe's.

    Pre-training to the recipe's preconditions takes minutes (docs/toy.md); the pipeline test
    needs only real, loadable models with the recipe's shapes, so it trains each for a few
    steps and runs the demo with ``--no-checks``.
    """
    from longkd.tools.toy_models import TrainSpec, recipe_hash, train

    recipe = RECIPES["w256"]
    brief = TrainSpec(max_steps=3, min_steps=3, check_every=3)
    for kind in ("teacher", "student"):
        weak = dataclasses.replace(recipe, **{f"{kind}_train": brief})
        train(kind, weak, models_dir / f"{kind}-{recipe_hash(kind, recipe)}", progress=False)


@pytest.mark.slow
def test_demo_stops_on_a_teacher_that_cannot_retrieve(tmp_path, capsys):
    from longkd.cli import main

    _weak_models(tmp_path / "models")
    rc = main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--models-dir", str(tmp_path / "models"),
               "--per-distance", "8"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("longkd: error: the toy teacher retrieves") and "whole window W" in err
    assert not (tmp_path / "demo" / "caches").exists()  # stopped before building anything


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """The README's main job as it is: pre-trains both toy models, checks their preconditions,
    builds the caches, trains and evaluates every student (about 3 minutes on 2 cores)."""
    from longkd.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    recipe = RECIPES["w256"]
    for path in ("results.md", "results.json", "retrieval.png", "inspect-main.json", "inspect-reset.json"):
        assert (out / path).is_file() and (out / path).stat().st_size > 0, path
    assert (out / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for cache in ("main-s0", "reset-s0", "heldout"):
        assert (out / "caches" / cache / "manifest.json").is_file(), cache
    modes = {
        c: json.loads((out / "caches" / c / "manifest.json").read_text()) for c in ("main-s0", "reset-s0")
    }
    assert json.dumps(modes["main-s0"]).count('"continuous"') and json.dumps(modes["reset-s0"]).count(
        '"reset"'
    )
    results = json.loads((out / "results.json").read_text())
    # The models met their preconditions (the run would have stopped otherwise); the flags
    # agree with the eval files (checked below) and with the pre-training metrics.
    assert results["precondition_error"] is None and "WARNING" not in (out / "results.md").read_text()
    assert results["preconditions"]["teacher_ok"] and results["preconditions"]["student_ok"]
    for kind in ("teacher", "student"):
        metrics = json.loads((Path(results["pretrain"][kind]["dir"]) / "metrics.json").read_text())
        assert metrics["precondition"] and metrics["steps"] == results["pretrain"][kind]["steps"]

    md = (out / "results.md").read_text()
    by_distance = _table(md, "## Retrieval by fact-query distance")
    headline = _table(md, "## Headline")
    assert set(by_distance) == set(demo_report.ORDER) == set(headline)
    for name in demo_report.ORDER:
        toy = json.loads((out / "eval" / "s0" / name / "toy" / "results.json").read_text())
        assert results["models"][name]["per_seed"]["0"]["toy_results"] == str(
            out / "eval/s0" / name / "toy/results.json"
        )
        scores = {r["distance"]: r["score"] for r in toy["by_distance"]}
        assert sorted(scores) == recipe.distances()
        # Every per-distance cell of the table is the eval file's score (in %, 1 decimal).
        for cell, d in zip(by_distance[name], sorted(scores)):
            assert abs(_number(cell) - scores[d]) <= 0.05 + 1e-9, (name, d, cell, scores[d])
        within = np.mean([s for d, s in scores.items() if d <= recipe.short_max_distance()])
        beyond = np.mean([s for d, s in scores.items() if d > recipe.short])
        assert abs(_number(headline[name][1]) - within) <= 0.05 + 1e-9
        assert abs(_number(headline[name][2]) - beyond) <= 0.05 + 1e-9
        if name == "teacher":
            assert min(scores.values()) >= 90.0
            continue
        if name == "untrained":
            inside = min(s for d, s in scores.items() if d <= recipe.short_max_distance())
            far = max(s for d, s in scores.items() if d > recipe.short)
            assert results["preconditions"]["student_within_S"] == pytest.approx(within / 100)
            assert inside >= 90.0 and far <= 300 * recipe.world.chance
        kl = json.loads((out / "eval" / "s0" / name / "kl" / "results.json").read_text())
        after = [e for e in kl["by_position"] if e["start"] >= recipe.short]
        want = sum(e["kl"] * e["rows"] for e in after) / sum(e["rows"] for e in after)
        assert math.isfinite(want) and abs(_number(headline[name][5]) - want) <= 5e-4 + 1e-9
        if name != "untrained":
            run = "reset" if name == "kd-reset-control" else "main"
            ckpt_root = out / "train" / "s0" / run / name / "checkpoints"
            ckpt = ckpt_root / (ckpt_root / "latest").read_text().strip()
            assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
            config = json.loads((ckpt / "config.json").read_text())
            # Every trained student ends in the last phase: window W, scaled rope.
            assert config["max_position_embeddings"] == recipe.window
    # The README's claims hold in this run; each value checked is re-derived from the eval files.
    scores = {
        name: {r["distance"]: r["score"] / 100 for r in json.loads(
            (out / "eval" / "s0" / name / "toy" / "results.json").read_text())["by_distance"]}
        for name in demo_report.ORDER
    }  # fmt: skip
    for name, claim, minuend, subtrahend, where, bound in demo_report.CLAIMS:
        low, high = {"beyond": (recipe.short, recipe.window),
                     "far": (2 * recipe.short, recipe.window - recipe.short)}[where]  # fmt: skip
        want = np.mean([a for d, a in scores[minuend].items() if low < d <= high])
        if subtrahend:
            want -= np.mean([a for d, a in scores[subtrahend].items() if low < d <= high])
        got = next(c for c in results["claims"] if c["name"] == name)
        assert got["per_seed"]["0"] == pytest.approx(want) and want >= bound, (claim, want, bound)
    assert all(row[-1] == "ok" for row in _table(md, "## Claims").values())
    assert results["numerics"]["threads"] == 1 and results["numerics"]["torch"].startswith("2.")
    # The held-out cache is other documents than the training cache.
    held = (out / "data" / "heldout.jsonl").read_text().splitlines()
    train = set((out / "data" / "train-s0.jsonl").read_text().splitlines())
    assert not train.intersection(held)
