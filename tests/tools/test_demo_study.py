"""``tools/demo_study.py``: the recipe it spells out, its tables, and one tiny study end to end.

The fast tests check that the study's default recipe is the demo's (the same schedule and
loss, so the base level of every factor reproduces ``longkd demo``), that levels and bad
input are read as documented, and that the tables are the mean and spread of the runs
(against numpy, on random runs). The slow one runs a study of two levels and two arms with
briefly trained toy models, through the child processes, and checks what it shares and
keeps.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from longkd.errors import LongkdError
from longkd.tools import demo, demo_study
from longkd.tools.demo_study import StudyRecipe
from longkd.tools.toy_models import RECIPES


def _student_config():
    from longkd.tools.toy_models import build_model

    recipe = RECIPES["w256"]
    return build_model(recipe.student, recipe.world, recipe.short, 0).config


def test_default_recipe_trains_what_the_demo_trains(tmp_path):
    from longkd.trainer.config import parse_config
    from longkd.trainer.rope import build_schedule

    toy = RECIPES["w256"]
    st = demo.PRESETS["full"]
    d = demo.Demo(out=tmp_path, models_dir=tmp_path, device="cpu", settings=st)
    paths = dict(student=tmp_path / "student", cache=tmp_path / "cache", out=tmp_path / "run")
    for arm in ("kd-phasewise", "ce-phasewise"):
        ours = parse_config(demo_study.train_config(StudyRecipe(), arm, seed=2, short=toy.short,
                                                    window=toy.window, **paths))  # fmt: skip
        theirs = parse_config(demo.train_config(d, paths["student"], paths["cache"], paths["out"], [arm], 2))
        a, b = ours.student(arm), theirs.student(arm)
        assert (a.loss, a.optimizer, a.init) == (b.loss, b.optimizer, b.init)
        assert (ours.steps, ours.batch_size, ours.seed, ours.loader) == (theirs.steps, theirs.batch_size, 2,
                                                                         theirs.loader)  # fmt: skip
        base = _student_config()
        assert build_schedule(a.schedule, base_config=base) == build_schedule(b.schedule, base_config=base)
    default = StudyRecipe()
    assert (default.steps, default.top_k, default.train_docs) == (st.steps, st.top_k, st.train_docs)


def test_schedule_shares_headroom_and_rope_type():
    from longkd.trainer.rope import build_schedule

    r = StudyRecipe(steps=100, phases="64:1,128:1,256:2", rope_type="linear", rope_headroom=1.5)
    phases = build_schedule(demo_study.schedule(r, 64, 256), base_config=_student_config())
    assert [p.until for p in phases] == [25, 50, 100]
    assert [p.window for p in phases] == [64, 128, 256]
    assert [p.rope_parameters["factor"] for p in phases] == [1.5, 3.0, 6.0]  # window / S x 1.5
    assert {p.rope_parameters["rope_type"] for p in phases} == {"linear"}
    plain = build_schedule(demo_study.schedule(StudyRecipe(steps=9, phases="256:1"), 64, 256),
                           base_config=_student_config())  # fmt: skip
    assert len(plain) == 1 and plain[0].until == 9 and plain[0].rope_parameters["factor"] == 4.0


def test_the_untrained_arm_is_the_student_with_the_last_phase_rope(tmp_path):
    import torch
    from safetensors.torch import load_file

    from longkd.tools.toy_models import build_model

    toy = RECIPES["w256"]
    build_model(toy.student, toy.world, toy.short, 0).save_pretrained(tmp_path / "student")
    recipe = StudyRecipe(rope_headroom=1.25, rope_type="linear")
    out = demo_study.scaled_student(tmp_path / "student", recipe, tmp_path / "scaled", toy.short, toy.window)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "linear"
    assert cfg["rope_parameters"]["factor"] == 1.25 * toy.window / toy.short
    assert cfg["max_position_embeddings"] == 1.25 * toy.window
    before = load_file(tmp_path / "student" / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(LongkdError, match="no training for study arm 'untrained-scaled'"):
        demo_study.train_config(recipe, "untrained-scaled", student=out, cache=out, out=out, seed=0,
                                short=toy.short, window=toy.window)  # fmt: skip


def test_levels_are_parsed_by_the_factor_type_and_bad_ones_refused():
    r = StudyRecipe()
    assert demo_study.with_setting(r, "steps", "480").steps == 480
    assert demo_study.with_setting(r, "temperature", "2").temperature == 2.0
    assert demo_study.with_setting(r, "temperature", "none").temperature is None
    assert demo_study.with_setting(r, "mode", "renorm").mode == "renorm"
    assert demo_study.split_levels("top_k", ["8,32", "64"]) == ["8", "32", "64"]
    assert demo_study.split_levels("phases", ["64:1,256:1", "256:1"]) == ["64:1,256:1", "256:1"]
    with pytest.raises(LongkdError, match="unknown study factor 'temprature'"):
        demo_study.with_setting(r, "temprature", "2")
    with pytest.raises(LongkdError, match="steps cannot be none"):
        demo_study.with_setting(r, "steps", "none")
    with pytest.raises(LongkdError, match="'x' is not a number"):
        demo_study.with_setting(r, "lr", "x")
    with pytest.raises(LongkdError, match="WINDOW:SHARE"):
        demo_study.phase_list(StudyRecipe(phases="64,256"), 64, 256)
    with pytest.raises(LongkdError, match="must lie in 64..256"):
        demo_study.phase_list(StudyRecipe(phases="64:1,512:1"), 64, 256)
    with pytest.raises(LongkdError, match=r"MAX <= S=64"):
        demo_study.doc_range(StudyRecipe(doc_tokens="16-80"), 64)
    assert demo_study.doc_range(StudyRecipe(), 64) == (32, 64)
    assert demo_study.main(["--factor", "steps"]) == 2


def test_caches_are_shared_by_what_they_depend_on_and_runs_named_by_everything():
    r = StudyRecipe()
    key = demo_study.cache_key
    other_training = dataclasses.replace(r, steps=960, temperature=2.0)
    assert key(r, "kd-phasewise", 0) == key(other_training, "ce-phasewise", 0)
    assert key(r, "kd-phasewise", 0) != key(r, "kd-reset-control", 0)
    assert key(r, "kd-phasewise", 0) != key(r, "kd-phasewise", 1)
    assert key(r, "kd-phasewise", 0) != key(dataclasses.replace(r, top_k=8), "kd-phasewise", 0)
    assert key(r, "kd-phasewise", 0) != key(dataclasses.replace(r, doc_tokens="16-32"), "kd-phasewise", 0)
    rid = demo_study.run_id
    assert rid(r, "kd-phasewise", 0) == rid(StudyRecipe(), "kd-phasewise", 0)
    others = {rid(dataclasses.replace(r, ce_weight=0.1), "kd-phasewise", 0), rid(r, "kd-phasewise", 1),
              rid(r, "kd-reset-control", 0)}  # fmt: skip
    assert rid(r, "kd-phasewise", 0) not in others and len(others) == 3


def test_summary_is_the_mean_and_sample_sd_of_the_runs():
    rng = np.random.default_rng()
    toy = RECIPES["w256"]
    distances = toy.distances()
    runs = [
        {"level": level, "arm": arm, "seed": seed, "train_cpu_s": float(rng.random() * 30),
         "train_wall_s": float(rng.random() * 30),
         "by_distance": {str(d): float(rng.integers(0, 65)) / 64 for d in distances}}
        for level in ("a", "b") for arm in ("kd-phasewise", "kd-reset-control") for seed in range(3)
    ]  # fmt: skip
    rows = demo_study.summarize(runs, toy.short, toy.window)
    assert len(rows) == 4
    for row in rows:
        group = [r for r in runs if (r["level"], r["arm"]) == (row["level"], row["arm"])]
        acc = np.array([[r["by_distance"][str(d)] for d in distances] for r in group])
        ds = np.array(distances)
        beyond = acc[:, ds > toy.short].mean(axis=1)
        assert row["beyond"]["mean"] == pytest.approx(beyond.mean())
        assert row["beyond"]["sd"] == pytest.approx(beyond.std(ddof=1))
        assert row["within"]["mean"] == pytest.approx(acc[:, ds <= toy.short_max_distance()].mean())
        assert row["at_238"]["values"] == pytest.approx(acc[:, -1].tolist())
        assert row["at_178"]["mean"] == pytest.approx(acc[:, list(ds).index(178)].mean())
        assert row["lowest"]["min"] == pytest.approx(acc.min())
        assert row["train_cpu_s"]["mean"] == pytest.approx(np.mean([r["train_cpu_s"] for r in group]))
    table = demo_study.markdown({"factor": "steps", "summary": rows}, toy.short, toy.window)
    assert table.count("\n| a | ") == 2 and "at 178" in table and "at 238 per seed" in table


@pytest.mark.slow
def test_a_tiny_study_runs_shares_caches_and_resumes(tmp_path, capsys):
    from tests.tools.test_demo import _weak_models  # briefly trained models, the w256 recipe's names

    _weak_models(tmp_path / "models")
    argv = ["--factor", "steps", "--levels", "3,4", "--seeds", "0", "--arms",
            "kd-phasewise,kd-reset-control,untrained-scaled",
            "--set", "train_docs=24", "--set", "batch_size=2", "--per-distance", "2", "--out",
            str(tmp_path / "study"), "--models-dir", str(tmp_path / "models"), "--jobs", "2"]  # fmt: skip
    assert demo_study.main(argv) == 0
    out = tmp_path / "study"
    study = json.loads((out / "steps.json").read_text())
    arms = ["kd-phasewise", "kd-reset-control", "untrained-scaled"]
    assert [(r["level"], r["arm"]) for r in study["runs"]] == [(lv, a) for lv in ("3", "4") for a in arms]
    assert sorted(p.name for p in (out / "caches").iterdir()) == ["continuous-s0-n24-k32", "reset-s0-n24-k32"]
    for run in study["runs"]:
        assert run["train_cpu_s"] > 0 and run["train_wall_s"] > 0
        folder = out / "runs" / run["id"]
        toy = json.loads((folder / "toy" / "results.json").read_text())
        assert {str(r["distance"]): r["score"] / 100 for r in toy["by_distance"]} == run["by_distance"]
        trained = run["arm"] != "untrained-scaled"
        assert (folder / "train.yaml").is_file() == trained and (folder / "model").is_dir() != trained
        if trained:
            assert f"steps: {run['recipe']['steps']}" in (folder / "train.yaml").read_text()
    assert "| 4 | kd-reset-control | 1 |" in (out / "steps.md").read_text()
    capsys.readouterr()
    mtimes = {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")}
    assert demo_study.main(argv) == 0  # a rerun reuses every finished run
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/result.json")} == mtimes
    assert capsys.readouterr().out.count("[study]") == 6
