"""The ``longkd`` command: a thin front door that hands each subcommand to its folder.

Every folder registers its own subcommands (``cache/cli.py``, ``trainer/cli.py``,
``tools/cli.py``), so this file only builds the top-level parser and turns
:class:`~longkd.errors.LongkdError` into a one-line message and exit status 2. The one
command that crosses folders is joined here: ``longkd cache inspect`` is a ``cache``
subcommand for users but lives in tools/ (plots, reports), and cache/ never imports tools/.
"""

from __future__ import annotations

import argparse
import logging
import sys

from longkd import __version__
from longkd.errors import LongkdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longkd",
        description=(
            "Distil long context into a student from an offline teacher-logit cache.\n\n"
            "  longkd cache build   run a teacher once over packed windows, write the cache\n"
            "  longkd train CONFIG  distil one or more students from a cache\n"
            "  longkd demo          the whole pipeline on a toy world, CPU, no downloads"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"longkd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from longkd.cache.cli import register as register_cache
    from longkd.tools.cli import register as register_tools
    from longkd.tools.inspect_cache import register_inspect
    from longkd.trainer.cli import register as register_trainer

    register_inspect(register_cache(sub))
    register_trainer(sub)
    register_tools(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        result = args.func(args)
    except LongkdError as err:
        if args.verbose:
            raise
        print(f"longkd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longkd: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
