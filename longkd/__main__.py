"""Lets ``python -m longkd`` work exactly like the ``longkd`` command (torchrun needs it)."""

from longkd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
