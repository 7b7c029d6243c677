"""The front door: help works, errors are one line with exit 2."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "longkd", *args], capture_output=True, text=True)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0
    assert "cache build" in out.stdout


def test_version():
    out = run("--version")
    assert out.returncode == 0 and "longkd" in out.stdout


def test_help_does_not_import_torch():
    """`longkd --help` stays instant: torch and transformers load inside the commands."""
    code = (
        "import sys, longkd.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_one_line_flattens_and_cuts_foreign_messages():
    import random

    from longkd.errors import one_line

    rng = random.Random()
    words = ["".join(rng.choice("abcxyz") for _ in range(rng.randint(1, 9))) for _ in range(200)]
    message = "\n".join(" \t".join(words[i : i + 7]) for i in range(0, 200, 7))
    flat = " ".join(words)
    assert one_line(ValueError(message), limit=10**6) == flat
    cut = one_line(ValueError(message), limit=50)
    assert len(cut) == 50 and cut.endswith("...") and flat.startswith(cut[:-3])
    assert one_line(OSError("short\nmessage")) == "short message"
    assert one_line(KeyError()) == "KeyError" and one_line(ValueError(" \n ")) == "ValueError"
