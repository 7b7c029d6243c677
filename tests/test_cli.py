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
