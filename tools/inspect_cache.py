"""``longkd cache inspect``: what the cached teacher distributions look like, and what they cost.

Before training many students from one cache, a user wants to know whether the stored view of
the teacher is faithful enough (how much probability the top-k ids cover, how peaked the
rows are), whether that changes along the window or with the distance from a packed sample's
start, and how many bytes each token costs. This module answers from a deterministic sample
of windows, and shows single positions (context, true next token, the teacher's candidates),
as JSON-serialisable dicts; :mod:`longkd.tools.inspect_report` renders them (terminal tables,
PNG, HTML).

    longkd cache inspect CACHE                       # tables on the terminal
    longkd cache inspect CACHE --json                # the same, machine-readable
    longkd cache inspect CACHE --plot stats.png --html report.html
    longkd cache inspect CACHE --window 3 --at 100   # one position

Definitions (per row t < length - 1; row t is the teacher's distribution for input_ids[t+1]):

- top-k and adaptive caches: the stored probabilities p_1..p_k plus the tail r = 1 - sum(p)
  as one extra category (the k+1 bucket distribution the ``bucket`` loss uses; an adaptive
  row stores 1..K entries). ``entropy`` is the entropy of that distribution in nats (a lower
  bound of the teacher's full entropy, since merging categories can only lower it);
  ``covered`` is 1 - r.
- sampled caches: the empirical distribution counts / draws; ``covered`` is 1 by definition.
- ``top1`` is the largest stored probability; ``entries`` the number of stored ids (K for
  top-k, 1..K for adaptive, the distinct ids drawn for sampled); ``target_nll`` is
  -log p_T(true next token) at the cache's temperature; ``target_stored`` is 1 when the true
  next token is among the ids.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from longkd.errors import LongkdError

# Offset of a row's input token from the start of its segment (a packed sample, or the part of
# a split sample that begins the window): bucket i is [edges[i], edges[i+1]), the last is open.
SEGMENT_EDGES = (0, 8, 32, 128, 512)
HIST_BINS = 20
STATS = ("entropy", "top1", "covered", "entries", "target_nll", "target_stored")
ENTROPY_NOTE = {
    "topk": "entropy (nats) of the k+1 bucket distribution: the stored top-k probabilities plus the tail "
    "mass as one category; a lower bound of the teacher's full entropy",
    "adaptive": "entropy (nats) of the bucket distribution: the stored entries (1..k a row) plus the "
    "tail mass as one category; a lower bound of the teacher's full entropy",
    "sampled": "entropy (nats) of the empirical distribution counts / draws",
}


# ----------------------------------------------------------------------------- statistics


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x log x with 0 log 0 = 0, elementwise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def row_statistics(window, mode: str) -> dict[str, np.ndarray]:
    """Per-row statistics of one cached window, over the rows a trainer trains on.

    Args:
        window: a :class:`longkd.cache.reader.CachedWindow` (ids/logprobs [W, K]).
        mode: the cache's selection mode, ``topk``, ``adaptive`` or ``sampled``.

    Returns:
        Arrays of length R (the rows t < length - 1 whose target is finite): ``row`` (t),
        ``segment_offset`` (t minus the start of t's segment), and float64 ``entropy``,
        ``top1``, ``covered``, ``entries``, ``target_nll``, ``target_stored`` (see the module
        docstring).
    """
    from longkd.cache.packing import position_ids_for

    w = window.input_ids.shape[0]
    rows = np.arange(w)
    target = window.target_logprob.astype(np.float64)
    valid = (rows < window.length - 1) & np.isfinite(target)
    lp = window.logprobs[valid].astype(np.float64)  # [R, K]
    ids = window.ids[valid]
    p = np.exp(lp)  # exp(-inf) = 0 at padding
    if mode != "sampled":  # stored log-probs of the teacher: the rest is the tail
        mass = p.sum(axis=1)
        tail = np.clip(1.0 - mass, 0.0, None)
        entropy = -_xlogx(p).sum(axis=1) - _xlogx(tail)
        covered = np.minimum(mass, 1.0)
    else:
        entropy = -_xlogx(p).sum(axis=1)
        covered = np.ones(len(p))
    nxt = np.append(window.input_ids[1:], -2)[valid]  # -2 matches no id (padding is -1)
    return {
        "row": rows[valid],
        "segment_offset": position_ids_for(w, window.segment_starts, "reset")[valid],
        "entropy": entropy,
        "top1": p.max(axis=1) if p.shape[1] else np.zeros(len(p)),
        "covered": covered,
        "entries": (ids >= 0).sum(axis=1).astype(np.float64),
        "target_nll": -target[valid],
        "target_stored": (ids == nxt[:, None]).any(axis=1).astype(np.float64),
    }


def sample_indices(num_windows: int, sample_windows: int, seed: int) -> list[int]:
    """The windows inspected: all when ``sample_windows >= num_windows``, otherwise a sorted
    uniform sample without replacement from ``numpy.random.default_rng(seed)``."""
    if sample_windows < 1:
        raise LongkdError(f"--windows must be at least 1, got {sample_windows}")
    if sample_windows >= num_windows:
        return list(range(num_windows))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_windows, size=sample_windows, replace=False))


def window_edges(window: int, buckets: int) -> np.ndarray:
    """Equal-width bucket edges over rows ``0..W-1``: int[B+1] from 0 to W (B <= W)."""
    if buckets < 1:
        raise LongkdError(f"--buckets must be at least 1, got {buckets}")
    return np.unique(np.linspace(0, window, min(buckets, window) + 1).round().astype(np.int64))


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if x.size else None


def _grouped(stats: dict[str, np.ndarray], group: np.ndarray, edges, last_open: bool) -> list[dict]:
    """Mean of every statistic per bucket; ``group`` holds each row's bucket index."""
    out = []
    for b in range(len(edges) - (0 if last_open else 1)):
        lo = int(edges[b])
        hi = None if last_open and b == len(edges) - 1 else int(edges[b + 1])
        sel = group == b
        label = f"{lo}+" if hi is None else f"{lo}-{hi - 1}"
        entry = {"bucket": label, "start": lo, "end": hi, "rows": int(sel.sum())}
        entry.update({name: _mean(stats[name][sel]) for name in STATS})
        out.append(entry)
    return out


class _RawSizer:
    """Uncompressed Arrow size of single rows: ``nbytes`` of a one-row slice of its record batch
    (the decoded buffers' sizes), read through the cache's own filesystem."""

    def __init__(self, reader):
        self.reader = reader
        self._files: dict = {}  # shard index -> rows.ShardFile (one at a time)

    def row_bytes(self, index: int) -> int:
        """The raw size of window ``index``, one the reader has already read and checked.

        Raises:
            DamagedWindow: its batch no longer reads (the file changed meanwhile).
        """
        from longkd.cache.rows import BadShard, DamagedWindow, ShardFile

        shard, row = self.reader.shard_of(index)
        entry = self.reader.shards[shard]
        if shard not in self._files:
            # windows are sorted, so one open shard suffices
            self._files = {shard: ShardFile(self.reader.location, entry["path"], int(entry["rows"]))}
        try:
            batch, r = self._files[shard].locate(row)
        except BadShard as bad:
            raise DamagedWindow(self.reader.location, entry["path"], index, str(bad)) from None
        return int(batch.slice(r, 1).nbytes)


def _summary(reader, sampled: list[int], raw_sampled: int, tokens_sampled: int) -> dict:
    """The cache-wide part of :func:`inspect_cache`; ``sampled`` are the windows actually read."""
    m = reader.manifest
    on_disk = sum(max(reader.location.size(s["path"]), 0) for s in reader.shards)
    tokens = int(m["totals"]["tokens"])
    n = len(sampled)
    exact = n == reader.num_windows
    raw = raw_sampled if exact else (raw_sampled / n * reader.num_windows if n else 0)
    return {
        "uri": reader.location.uri,
        "teacher": m["teacher"].get("name_or_path"),
        "model_type": m["teacher"].get("model_type"),
        "tokenizer_size": m["vocab"].get("tokenizer_size"),
        "embedding_size": m["vocab"].get("embedding_size"),
        "window": reader.window,
        "windows": reader.num_windows,
        "tokens": tokens,
        "selection": dict(reader.selection),
        "temperature": reader.temperature,
        "logprobs_encoding": m["encoding"].get("logprobs"),
        "position_mode": reader.position_mode,
        "packing": {k: v for k, v in m["packing"].items() if k != "stats"},
        "packing_stats": dict(m["packing"].get("stats", {})),
        "shards": len(reader.shards),
        "bytes_on_disk": int(on_disk),
        "raw_bytes": int(round(raw)),
        "raw_bytes_exact": exact,
        "bytes_per_token_disk": on_disk / tokens if tokens else None,
        "bytes_per_token_raw": raw_sampled / tokens_sampled if tokens_sampled else None,
        "compression_ratio": raw / on_disk if on_disk else None,
    }


def inspect_cache(
    uri, *, sample_windows: int = 64, seed: int = 0, buckets: int = 8, skip_damaged: bool = False
) -> dict:
    """Summary and distribution statistics of a cache.

    Args:
        uri: the cache directory or URI.
        sample_windows: how many windows to read (all when the cache has fewer).
        seed: seed of the window sample (see :func:`sample_indices`).
        buckets: equal-width buckets of the row index along the window.
        skip_damaged: leave damaged windows of the sample out (listed under
            ``sample.damaged``) instead of stopping at the first.

    Returns:
        A JSON-serialisable dict: ``summary`` (teacher, vocabulary, window, selection, packing,
        ``bytes_on_disk`` (shard files), ``raw_bytes`` (uncompressed Arrow buffers; measured on
        the sample and scaled to all windows unless ``raw_bytes_exact``), bytes per token on
        disk and raw, ``compression_ratio`` = raw / disk), ``sample`` (the window indices read,
        and ``damaged``: those skipped),
        ``definitions``, ``overall`` (mean of each statistic), ``by_position`` (per window
        bucket), ``by_segment_offset`` (per :data:`SEGMENT_EDGES` bucket) and ``histograms``
        (``top1`` and ``entropy``: ``edges`` [HIST_BINS+1], ``counts`` [HIST_BINS]).

    Raises:
        LongkdError: not a finished cache, bad arguments, or (without ``skip_damaged``) a
            damaged window.
    """
    from longkd.cache.reader import CacheReader

    reader = CacheReader(uri, skip_damaged=skip_damaged)
    edges = window_edges(reader.window, buckets)
    indices = sample_indices(reader.num_windows, sample_windows, seed)
    mode = reader.selection["mode"]
    sizer = _RawSizer(reader)
    parts: dict[str, list[np.ndarray]] = {}
    raw_sampled = tokens_sampled = 0
    read = []
    for window in reader.iter_windows(indices):
        read.append(window.window_id)
        raw_sampled += sizer.row_bytes(window.window_id)
        tokens_sampled += window.length
        for name, values in row_statistics(window, mode).items():
            parts.setdefault(name, []).append(values)
    reader.close()
    empty = {name: np.zeros(0) for name in ("row", "segment_offset", *STATS)}
    stats = {name: np.concatenate(v) if v else empty[name] for name, v in parts.items()} or empty
    by_pos = np.searchsorted(edges, stats["row"], side="right") - 1
    by_seg = np.searchsorted(np.asarray(SEGMENT_EDGES), stats["segment_offset"], side="right") - 1
    top_entropy = float(stats["entropy"].max()) if stats["entropy"].size else 0.0
    histograms = {}
    for name, lo, hi in (("top1", 0.0, 1.0), ("entropy", 0.0, max(top_entropy, 1e-6))):
        counts, hist_edges = np.histogram(stats[name], bins=HIST_BINS, range=(lo, hi))
        histograms[name] = {"edges": hist_edges.tolist(), "counts": counts.tolist()}
    overall = {"rows": int(stats["row"].size)}
    overall.update({name: _mean(stats[name]) for name in STATS})
    return {
        "summary": _summary(reader, read, raw_sampled, tokens_sampled),
        "sample": {"windows": read, "seed": seed, "rows": int(stats["row"].size), "damaged": reader.damaged},
        "definitions": {
            "rows": "row t (t < length - 1) is the teacher's distribution for input_ids[t+1]",
            "entropy": ENTROPY_NOTE[mode],
            "top1": "largest stored probability",
            "covered": "stored probability mass, 1 - tail" if mode != "sampled" else "1 (sampled cache)",
            "entries": "stored ids per row",
            "target_nll": "-log p_T(true next token), nats, at the cache temperature",
            "target_stored": "fraction of rows whose true next token is among the stored ids",
            "by_position": "buckets of the row index t along the window",
            "by_segment_offset": "buckets of t minus the start of t's packed segment",
        },
        "overall": overall,
        "by_position": _grouped(stats, by_pos, edges, last_open=False),
        "by_segment_offset": _grouped(stats, by_seg, SEGMENT_EDGES, last_open=True),
        "histograms": histograms,
    }


# ----------------------------------------------------------------------------- one position


def _tokenizer_for(manifest: dict):
    """The teacher's tokenizer if it loads offline and matches the cache; else ``(None, why)``."""
    from longkd.cache.identity import tokenizer_fingerprint

    path = manifest["teacher"].get("name_or_path")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # any failure just means "show ids"
        return None, f"not loadable from {path} ({type(exc).__name__}); showing ids"
    if tokenizer_fingerprint(tok) != manifest["tokenizer"].get("fingerprint"):
        return None, f"tokenizer at {path} differs from the cache's (fingerprint); showing ids"
    return tok, f"loaded from {path}"


def _token(tok, token_id: int) -> str | None:
    if tok is None:
        return None
    if not 0 <= token_id < len(tok):
        return f"<id {token_id}>"  # a padded embedding slot beyond the tokenizer
    return tok.decode([token_id])


def show_position(uri, window: int, at: int, top: int = 10, context: int = 16) -> dict:
    """One row of one window: the context, the true next token and the teacher's candidates.

    Args:
        uri: the cache directory or URI.
        window: global window index.
        at: row index t in ``[0, W)``; row t is the distribution for input_ids[t+1].
        top: how many stored candidates to show (most likely first).
        context: how many tokens of context, ending at input_ids[t].

    Returns:
        JSON-serialisable dict: ``window``, ``at``, ``length``, ``position_id``,
        ``segment_offset``, ``context`` (``start``, ``ids``, ``tokens``, ``text``), ``next``
        (``id``, ``token``, ``logprob``, ``prob``, ``rank`` among the stored ids or None; None
        when t >= length - 1), ``candidates`` (``rank``, ``id``, ``token``, ``prob``,
        ``logprob``, ``count`` for sampled caches), ``tail_mass`` (top-k, adaptive) and ``tokenizer``
        (how tokens were decoded). Tokens are None when no matching tokenizer loads.

    Raises:
        LongkdError: not a cache, or ``window`` / ``at`` out of range.
    """
    from longkd.cache.reader import CacheReader

    with CacheReader(uri) as reader:
        if not 0 <= window < reader.num_windows:
            raise LongkdError(
                f"--window {window} is out of range; the cache has windows 0..{reader.num_windows - 1}"
            )
        if not 0 <= at < reader.window:
            raise LongkdError(f"--at {at} is out of range; rows are 0..{reader.window - 1}")
        w = reader.read_window(window)
        mode, manifest = reader.selection["mode"], reader.manifest
    tok, tok_status = _tokenizer_for(manifest)
    start = max(0, at - context + 1)
    ctx = [int(i) for i in w.input_ids[start : at + 1]]
    keep = w.ids[at] >= 0
    ids, lps = w.ids[at][keep], w.logprobs[at][keep].astype(np.float64)
    order = np.argsort(-lps, kind="stable")
    candidates = []
    for rank, j in enumerate(order[:top], start=1):
        entry = {"rank": rank, "id": int(ids[j]), "token": _token(tok, int(ids[j])),
                 "prob": float(math.exp(lps[j])), "logprob": float(lps[j])}  # fmt: skip
        if w.counts is not None:
            entry["count"] = int(w.counts[at][keep][j])
        candidates.append(entry)
    nxt = None
    if at < w.length - 1:
        nid = int(w.input_ids[at + 1])
        hit = np.flatnonzero(ids[order] == nid)
        lp = float(w.target_logprob[at])
        nxt = {"id": nid, "token": _token(tok, nid), "logprob": lp, "prob": math.exp(lp),
               "rank": int(hit[0]) + 1 if hit.size else None}  # fmt: skip
    return {
        "window": window,
        "at": at,
        "length": int(w.length),
        "position_id": int(w.position_ids[at]),
        "segment_offset": int(at - w.segment_starts[w.segment_starts <= at].max()),
        "selection": mode,
        "context": {"start": start, "ids": ctx, "tokens": [_token(tok, i) for i in ctx] if tok else None,
                    "text": tok.decode(ctx) if tok else None},  # fmt: skip
        "next": nxt,
        "candidates": candidates,
        "tail_mass": float(max(0.0, 1.0 - np.exp(lps).sum())) if mode != "sampled" else None,
        "tokenizer": tok_status,
    }


# ----------------------------------------------------------------------------- CLI


def register_inspect(cache_subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect`` to the ``longkd cache`` subcommands."""
    p = cache_subparsers.add_parser(
        "inspect",
        help="statistics of the cached distributions, or one position",
        description="Entropy, top-1 probability and covered mass of the cached rows (overall, by position, "
        "by offset in the packed sample), sizes and compression; or one position with --window and --at.",
    )
    p.add_argument("cache", metavar="DIR", help="cache directory or URI")
    p.add_argument("--windows", type=int, default=64, metavar="N", help="windows to sample (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window sample (default: 0)")
    p.add_argument("--buckets", type=int, default=8, help="position buckets along the window (default: 8)")
    p.add_argument("--window", type=int, metavar="I", help="show one position of window I (with --at)")
    p.add_argument("--at", type=int, metavar="POS", help="the row to show (it predicts token POS+1)")
    p.add_argument("--top", type=int, default=10, help="candidates shown with --at (default: 10)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a PNG of the statistics")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    p.add_argument("--skip-damaged", action="store_true",
                   help="leave damaged windows out (counted) instead of stopping at the first")  # fmt: skip
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    # Imported here: inspect_report reads STATS from this module, so a top-level import would cycle.
    from longkd.tools import inspect_report

    if (args.window is None) != (args.at is None):
        raise LongkdError("--window and --at go together; pass both to show one position")
    if args.window is not None:
        if args.plot or args.html:
            raise LongkdError("--plot and --html describe the whole cache; drop --window/--at to write them")
        result = show_position(args.cache, args.window, args.at, top=args.top)
        print(json.dumps(result, indent=2) if args.json else inspect_report.format_position(result))
        return 0
    result = inspect_cache(
        args.cache, sample_windows=args.windows, seed=args.seed, buckets=args.buckets,
        skip_damaged=args.skip_damaged,
    )  # fmt: skip
    damaged = result["sample"]["damaged"]
    if damaged:
        print(f"longkd: skipped {len(damaged)} damaged windows: {damaged[:20]}", file=sys.stderr)
    png = inspect_report.plot_inspect(result, args.plot) if args.plot else None
    if args.html:
        inspect_report.html_inspect(result, args.html, png=png)
    print(json.dumps(result, indent=2) if args.json else inspect_report.format_inspect(result))
    return 0
