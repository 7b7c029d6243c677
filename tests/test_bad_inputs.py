"""Bad input to `longkd cache build` and `longkd train`: one line naming the problem and the fix,
exit status 2, and nothing written. (Changed settings and shapes on --resume are in
tests/trainer/test_resume_safety.py.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from longkd.cli import main
from tests.helpers import build_cache, cache_build_argv, write_random_text

VOCAB = 64
FLAGS = {"window": 16, "top_k": 4, "max_windows": 4}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A teacher, good data and a cache built from them."""
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=32, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("bad-inputs")
    data = write_random_text(root / "good.jsonl", samples=20, vocab=VOCAB, lengths=(3, 20), seed=None)
    cache = build_cache(teacher, data, root / "cache", **FLAGS)
    return teacher, data, cache


def refused(capsys, argv: list[str]) -> str:
    """Run the command; require status 2 and exactly one error line, no traceback; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("longkd: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("longkd: error: ")


def unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create anything in (root ignores file modes: /sys)."""
    if os.geteuid() == 0:
        if not os.path.isdir("/sys"):
            pytest.skip("running as root without /sys: no unwritable place to try")
        return Path("/sys") / "longkd-test"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "out"


def train_argv(tmp_path: Path, cache, out, init=None) -> list[str]:
    student = {"name": "a", "init": init or {"arch": "llama", "hidden_size": 32, "num_heads": 2}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"cache": str(cache), "out": str(out), "steps": 1, "batch_size": 2,
                                    "students": [student]}))  # fmt: skip
    return ["train", str(path), "--no-progress"]


def test_a_typo_inside_init_is_named(setup, tmp_path, capsys):
    _, _, cache = setup
    out = tmp_path / "run"
    line = refused(capsys, train_argv(tmp_path, cache, out, init={"arch": "llama", "hiden_size": 256}))
    assert line.startswith(
        "students[0].init.hiden_size: unknown key for a fresh llama model; did you mean 'hidden_size'? "
        "valid keys are arch, seed, hidden_size,"
    ), line
    assert not out.exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_non_utf8_text_is_named(setup, tmp_path, capsys, streaming):
    teacher, data, _ = setup
    bad = tmp_path / "bad.jsonl"
    rows = data.read_bytes().splitlines()
    bad.write_bytes(b"\n".join([rows[0], b'{"text": "t5 \xff\xfe t9"}', *rows[1:]]) + b"\n")
    out = tmp_path / "cache"
    line = refused(capsys, cache_build_argv(teacher, bad, out, streaming=streaming, **FLAGS))
    where = "a text in rows 0..999" if streaming else "row 1 of text field 'text'"
    assert line.startswith(f"{bad}: {where} is not valid UTF-8"), line
    assert line.endswith("re-encode the data as UTF-8 (e.g. iconv -f latin1 -t utf-8)"), line
    assert not out.exists()


def test_out_below_a_regular_file(setup, tmp_path, capsys):
    teacher, data, cache = setup
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a directory")
    out = blocker / "sub" / "out"
    line = refused(capsys, cache_build_argv(teacher, data, out, **FLAGS))
    assert line == f"--out {out} is below {blocker}, a file, not a directory; choose another --out"
    line = refused(capsys, train_argv(tmp_path, cache, out))
    assert line == f"out {out} is below {blocker}, a file, not a directory; choose another out"
    assert blocker.read_text() == "a file, not a directory"


def test_out_in_an_unwritable_place(setup, tmp_path, capsys):
    teacher, data, cache = setup
    out = unwritable(tmp_path)
    parent = re.escape(str(out.parent))
    line = refused(capsys, cache_build_argv(teacher, data, out, **FLAGS))
    pattern = (
        rf"--out {re.escape(str(out))}(: cannot create the cache there \(.+\); choose a writable --out"
        rf"|: {parent} is not writable; choose another --out)"
    )
    assert re.fullmatch(pattern, line), line
    line = refused(capsys, train_argv(tmp_path, cache, out))
    pattern = (
        rf"out: cannot write the run directory {re.escape(str(out))} \(.+\); choose a writable --out"
        rf"|out {re.escape(str(out))}: {parent} is not writable; choose another out"
    )
    assert re.fullmatch(pattern, line), line
    assert not out.exists()
