"""Subcommands of `longkd` that live in tools/ (registered by longkd/cli.py)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this folder's subcommands to the top-level parser."""
