"""Subcommands of `longkd` that live in cache/ (registered by longkd/cli.py).

    longkd cache build --teacher PATH --data DATA --window W --out DIR [--top-k K | --sample-draws N]
        [--min-mass M] [--min-prob P]
    longkd cache verify DIR
    longkd cache info DIR [--json]

Build flags may also come from ``--config FILE`` (YAML or TOML, keys as the flags); flags
typed on the command line override the file, so build options default to "not given" here
and the real defaults live in :class:`longkd.cache.build_settings.BuildSettings`.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add this folder's subcommands to the top-level parser.

    Returns:
        The subcommands of ``longkd cache``, where the front door adds ``inspect`` (which
        lives in tools/, as it draws plots and reports).
    """
    cache = sub.add_parser("cache", help="build, verify and inspect teacher-logit caches")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND")
    cache_sub.required = True

    build = cache_sub.add_parser(
        "build",
        help="run a teacher once over packed windows and write a cache",
        description="Pack a dataset into windows, run the teacher, and write shards plus manifest.json. "
        "Rerun the same command on the same --out to resume an interrupted build.",
        argument_default=argparse.SUPPRESS,
    )
    _add_build_flags(build)
    build.set_defaults(func=_cmd_build)

    verify = cache_sub.add_parser("verify", help="check every shard of a cache against its manifest")
    verify.add_argument("cache", metavar="DIR", help="cache directory or URI")
    verify.set_defaults(func=_cmd_verify)

    info = cache_sub.add_parser("info", help="summarise a cache (teacher, window, sizes)")
    info.add_argument("cache", metavar="DIR", help="cache directory or URI")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=_cmd_info)
    return cache_sub


def _add_build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="YAML or TOML file with build settings (keys as the flags)"
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--teacher", help="teacher model: Hugging Face name or local directory (required)")
    g.add_argument(
        "--data", help="dataset: a datasets hub name, a local dataset directory or data files (required)"
    )
    g.add_argument("--text-field", help="column holding the text to tokenize (default: text)")
    g.add_argument("--input-ids-field", help="column holding pre-tokenized ids (instead of --text-field)")
    g.add_argument("--split", help="dataset split (default: train)")
    g.add_argument("--streaming", action="store_true", help="stream the dataset instead of loading it whole")
    g.add_argument("--shuffle", action="store_true", help="shuffle samples (with --seed) before packing")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    g = p.add_argument_group("packing")
    g.add_argument("--window", type=int, help="W, tokens per window (required)")
    g.add_argument("--max-sample-tokens", type=int, help="cap on tokens per sample (default: no cap)")
    g.add_argument(
        "--overflow",
        choices=("split", "truncate"),
        help="samples longer than the cap: split (default) or truncate",
    )
    g.add_argument(
        "--position-mode",
        choices=("continuous", "reset"),
        help="position ids: continuous (default) or reset at each sample",
    )
    g.add_argument("--no-eos", action="store_true", help="do not append EOS after each sample")
    g.add_argument("--tail", choices=("drop", "pad"), help="the last partial window: drop (default) or pad")
    g.add_argument(
        "--max-windows", type=int, help="stop after N windows (tests, benchmarks, samples of a dataset)"
    )
    g.add_argument("--allow-extrapolation", action="store_true",
                   help="allow --window beyond the teacher's max_position_embeddings")  # fmt: skip
    g = p.add_argument_group("teacher run")
    sel = g.add_mutually_exclusive_group()
    sel.add_argument("--top-k", type=int, help="store the K most likely ids per position (default: 64)")
    sel.add_argument("--sample-draws", type=int, help="store ids and counts of N draws per position instead")
    g.add_argument("--min-mass", type=float, help="top-k: keep a row's entries only until they cover this "
                   "probability mass, e.g. 0.999 (the rest goes to the tail)")  # fmt: skip
    g.add_argument("--min-prob", type=float, help="top-k: keep a row's entries only while their probability "
                   "is at least this, e.g. 1e-4 (always at least one)")  # fmt: skip
    g.add_argument("--temperature", type=float, help="T: store log_softmax(logits / T) (default: 1.0)")
    g.add_argument("--batch-size", type=int, help="windows per teacher forward (default: 1)")
    g.add_argument("--chunk-size", type=int, help="positions per LM-head chunk (default: 1024)")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="teacher forward dtype: float32 (default), bfloat16 or float16",
    )
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument(
        "--tensor-parallel",
        type=int,
        metavar="N",
        help="under torchrun, split the teacher over groups of N consecutive ranks (one GPU each); "
        "the groups share the windows, each group's first rank writes (default: 1)",
    )
    g.add_argument(
        "--device-map",
        choices=("auto",),
        help="one process: spread the teacher's layers over the visible GPUs (accelerate), for "
        "teachers that cannot be tensor-parallel",
    )
    g.add_argument("--seed", type=int, help="seed for shuffling and sampling draws (default: 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="cache directory to create, or to resume (required)")
    g.add_argument(
        "--shard-size", help="roll over to a new shard at this size, e.g. 256MB, 1GB (default: 256MB)"
    )
    g.add_argument(
        "--logprob-dtype",
        choices=("float32", "float16"),
        help="stored log-prob type of --encoding plain: float32 (default) or float16",
    )
    g.add_argument(
        "--encoding",
        choices=("plain", "compact"),
        help="column encodings: compact (default: ids through the window's dictionary, log-probs "
        "within 1/128 nat where p >= 1e-4 with each row's tail kept, about a third of plain's bytes "
        "at top-64) or plain (Arrow lists; --logprob-dtype applies to it); docs/format.md",
    )
    g.add_argument(
        "--compression-level",
        type=int,
        help="zstd level (default: 3; higher: smaller, slower to write, as fast to read)",
    )
    g.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )


def _cmd_build(args: argparse.Namespace) -> int:
    from longkd.cache.build import build_cache
    from longkd.cache.build_settings import load_config_file, resolve_settings

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "cache_command", "verbose")}
    config_path = given.pop("config", None)
    progress = True if given.pop("progress", False) else None
    config = load_config_file(config_path) if config_path else {}
    settings = resolve_settings(given, config)
    build_cache(settings, progress=progress)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from longkd.cache.verify import verify_cache

    result = verify_cache(args.cache)
    if not result.ok:
        print(f"longkd: verify failed: {result.problem}", file=sys.stderr)
        return 1
    print(f"ok: {result.shards} shards, {result.windows} windows verified")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from longkd.cache.verify import cache_info, describe_selection

    info = cache_info(args.cache)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    selection = describe_selection(info["selection"])
    eff = info["packing_efficiency"]
    bpt = info["bytes_per_token"]
    lines = [
        ("cache", info["uri"]),
        ("teacher", info["teacher"]),
        ("tokenizer size", f"{info['tokenizer_size']} (embedding {info['embedding_size']})"),
        ("window", info["window"]),
        ("windows", info["windows"]),
        ("tokens", info["tokens"]),
        ("selection", f"{selection} ({info['logprobs_encoding']} log-probs)"),
        (
            "column encodings",
            ", ".join(f"{c} {e}" for c, e in info["column_encodings"].items() if e != "plain") or "all plain",
        ),
        ("entries per row", _entries(info)),
        ("temperature", info["temperature"]),
        ("position mode", info["position_mode"]),
        ("packing efficiency", f"{eff:.4f}" if isinstance(eff, float) else eff),
        ("shards", info["shards"]),
        ("bytes on disk", f"{info['bytes_on_disk']:,}"),
        ("bytes per token", f"{bpt:.1f}" if bpt is not None else "n/a"),
    ]
    for name, value in lines:
        print(f"{name + ':':<20}{value}")
    return 0


def _entries(info: dict) -> str:
    """Mean stored entries per row; for rows of varying length, how many windows it is over."""
    read = info["entries_sampled_windows"]
    mean = info["mean_entries_per_row"]
    return f"{mean:.2f} (mean over {read} windows)" if read else f"{mean:g}"
