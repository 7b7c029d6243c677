"""Benchmark the read side: windows and tokens decoded per second from a top-k cache.

A trainer's input pipeline must keep up with the student's steps. This script builds a cache
from a tiny random Llama (vocabulary 32000 by default, so the stored ids look like a real
model's) at W=1024 and k=64, then times, on one thread, (1) ``CacheReader.read_window`` in
shard order, (2) the same in a random order, and (3) ``WindowStream`` batches (shuffle,
collation into torch tensors) with ``num_workers=0``, three epochs of the cache per pass.
Each is run once to warm the page cache, then timed ``--repeats`` times; the fastest pass is
reported.

It then prices the checks every read makes (cache/rows.py): the per-window checksum and the
cheap row rules, each timed alone over the same windows, as a share of the decode time
without them (``read_window`` minus both), in ``--rounds`` interleaved rounds; the median and
the range over the rounds are reported.

    python -m longkd.tools.bench_reader --windows 32 --window 1024 --top-k 64
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, open shards
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)  # the least-disturbed pass: the machine may be shared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=32, help="windows in the cache")
    parser.add_argument("--window", type=int, default=1024, help="W, tokens per window")
    parser.add_argument("--top-k", type=int, default=64, help="K stored ids per position")
    parser.add_argument("--vocab", type=int, default=32000, help="teacher vocabulary")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per WindowStream batch")
    parser.add_argument("--logprob-dtype", default="float32", help="stored log-prob type (plain caches)")
    parser.add_argument(
        "--encoding", default="compact", choices=("compact", "plain"), help="column encodings (compact)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds pricing the read checks")
    parser.add_argument("--workdir", default=None, help="keep the model, data and cache here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from longkd.cache.build import build_cache
    from longkd.cache.build_settings import resolve_settings
    from longkd.cache.reader import CacheReader
    from longkd.tools.bench_build import _make_data
    from longkd.tools.random_models import save_tiny_model
    from longkd.trainer.stream import WindowStream

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher = save_tiny_model(
            work / "teacher",
            vocab_size=args.vocab,
            hidden_size=64,
            num_layers=1,
            max_position_embeddings=args.window,
        )
        data = work / "data.jsonl"
        _make_data(data, int(args.windows * args.window * 1.2), args.vocab, seed=0)
        out = work / "cache"
        settings = resolve_settings(
            {
                "teacher": str(teacher),
                "data": str(data),
                "window": args.window,
                "out": str(out),
                "top_k": args.top_k,
                "max_windows": args.windows,
                "logprob_dtype": args.logprob_dtype,
                "encoding": args.encoding,
                "device": "cpu",
            }
        )
        result = build_cache(settings, progress=False, echo=lambda *_: None)
        totals = result.manifest["totals"]
        reader = CacheReader(str(out))
        n = reader.num_windows
        random_order = np.random.default_rng(0).permutation(n)

        def sequential():
            for w in reader.iter_windows(range(n)):
                assert w.ids.shape == (args.window, args.top_k)

        def shuffled():
            for i in random_order:
                reader.read_window(int(i))

        # three epochs per pass, so the per-iteration setup (opening readers) is amortised as
        # in a training run
        batches = 3 * -(-n // args.batch_size)

        def stream():
            it = iter(WindowStream(str(out), batch_size=args.batch_size, seed=0, num_workers=0))
            for _ in range(batches):
                next(it)
            it.close()

        rows = [
            ("CacheReader.read_window, shard order", n, _timed(sequential, args.repeats)),
            ("CacheReader.read_window, random order", n, _timed(shuffled, args.repeats)),
            (f"WindowStream batch {args.batch_size}, num_workers 0", batches * args.batch_size,
             _timed(stream, args.repeats)),
        ]  # fmt: skip
        checks = _price_checks(reader, sequential, args.rounds)

    cpu = platform.processor() or platform.machine()
    print(f"# cache reader, {_dt.date.today().isoformat()}, CPU ({cpu}), 1 torch thread, num_workers 0")
    print(
        f"# cache: {n} windows, W={args.window}, top-k {args.top_k}, vocab {args.vocab}, "
        f"{args.encoding} columns, logprobs {args.logprob_dtype}, {len(reader.shards)} shards, "
        f"{totals['bytes'] / totals['tokens']:.1f} bytes/token on disk"
    )
    print("| path | windows | windows/s | tokens/s | ms/window |")
    print("|---|---:|---:|---:|---:|")
    for label, windows, seconds in rows:
        rate = windows / seconds
        print(f"| {label} | {windows} | {rate:,.1f} | {rate * args.window:,.0f} | {1000 / rate:.2f} |")
    print()
    print(f"# read checks over {n} windows, {args.rounds} interleaved rounds (median, range)")
    print("| check | us/window | % of decode time |")
    print("|---|---:|---:|")
    for label, micros, shares in checks:
        low, mid, high = np.percentile(shares, [0, 50, 100])
        print(f"| {label} | {np.median(micros):.0f} | {mid:.1f}% ({low:.1f}-{high:.1f}) |")
    return 0


def _price_checks(reader, read_all, rounds: int, passes: int = 10):
    """Time the per-window checksum and the cheap row rules alone, and ``read_all`` (every
    window through ``read_window``, checks included), in interleaved rounds.

    Each round times ``passes`` passes of each, so a scheduling hiccup on a shared machine
    weighs little; the decode time of a round is ``read_all``'s minus the checks' own.

    Returns:
        ``(label, microseconds per window per round, percent of the decode time per round)``
        for the checksum, the row rules and both.
    """
    from longkd.cache.rows import RowRules, ShardFile, read_columns, window_checksum

    mode = reader.selection["mode"]
    columns = []
    for entry in reader.shards:
        shard = ShardFile(reader.location, entry["path"], int(entry["rows"]))
        for row in range(int(entry["rows"])):
            columns.append(read_columns(*shard.locate(row), mode, reader.rules.codecs))
    rules = RowRules.of(reader.manifest)
    rules.version = 1  # check_read without the checksum (timed on its own)

    def checksums():
        for c in columns:
            window_checksum(c, mode)

    def row_rules():
        for c in columns:
            rules.check_read(c)

    def timed(fn) -> float:
        start = time.perf_counter()
        for _ in range(passes):
            fn()
        return (time.perf_counter() - start) / (passes * len(columns))

    read_all()  # warm
    out = {"checksum": ([], []), "row rules": ([], []), "both": ([], [])}
    for _ in range(rounds):
        spent = {"read": timed(read_all), "checksum": timed(checksums), "row rules": timed(row_rules)}
        spent["both"] = spent["checksum"] + spent["row rules"]
        decode = spent["read"] - spent["both"]
        for name in out:
            out[name][0].append(1e6 * spent[name])
            out[name][1].append(100.0 * spent[name] / decode)
    return [(name, micros, shares) for name, (micros, shares) in out.items()]


if __name__ == "__main__":
    raise SystemExit(main())
