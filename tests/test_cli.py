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
