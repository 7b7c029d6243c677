"""Bytes per token of caches built by ``longkd cache build``, plain against compact, and what
the compact encodings cost in accuracy and decoding speed.

Storage is what limits a teacher cache at scale, and a random-weight teacher (flat
distributions) is the worst case for compression, unlike any real teacher. So this benchmark
builds its caches from a teacher trained on real text (``tools/text_teacher.py``), from the
same teacher cached at a lower temperature (``--sharp-temperature``, default 0.5: peaked
rows, a stand-in for a better-trained teacher, since this small one is far flatter than a
real one) and from a random-weight teacher of the same shape and tokenizer, all over the same
held-out text, with the real command:

- ``plain_topk64``: top-64, plain columns (int32 ids, float32 log-probs);
- ``compact_topk64``: top-64, ``--encoding compact`` (and ``_zstd1``: at zstd level 1);
- ``adaptive``: ``--top-k 64 --min-mass M --encoding compact`` (mass-adaptive rows), and
  ``adaptive_min_prob``: the same with ``--min-prob P`` (a row also stops at its first entry
  below P);
- ``plain_sampled64`` / ``sampled64``: 64 draws per position, plain and compact.

For each cache it reports bytes per token (every shard file's bytes over the window tokens,
all columns included) and a per-column breakdown (each column written alone, with the cache's
zstd level). Against the plain cache of the same teacher it reports the largest log-prob error
of the compact and adaptive caches (over entries with p >= 1e-4, and over all entries) and
``bucket_loss_rel_error``: the bucket sparse KL of fixed students (an untrained one and one
half-trained on the plain cache) against each compact cache, relative to the same
loss against the plain cache (the half-trained student stops at half the untrained loss, so
that the loss stays well above the rounding). Decoding speed is the reader's (Arrow read, zstd, decode,
dense view) on one thread, and the column decoding alone (``decode_tokens_per_s_one_core``:
record batches already in memory, then the codecs and the dense view).

    python -m longkd.tools.text_teacher                        # once: trains the text teacher
    python -m longkd.tools.bench_encoding --json bench.json    # ~12 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from longkd.cache import format as fmt
from longkd.errors import LongkdError

P_MIN = 1e-4  # log-prob errors are bounded for entries at least this likely
STUDENT_STEPS = 50


def _build(teacher: Path, data: Path, out: Path, args, *extra: str) -> Path:
    """One ``longkd cache build`` run into ``out`` (its stderr kept in ``out``.log)."""
    cmd = [
        sys.executable, "-m", "longkd", "cache", "build", "--teacher", str(teacher), "--data", str(data),
        "--window", str(args.window), "--max-windows", str(args.windows), "--batch-size", "1",
        "--compression-level", str(args.zstd_level), "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    Path(f"{out}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LongkdError(f"`longkd cache build` for {out.name} failed: {tail}")
    return out


def heldout_dataset(teacher_dir: Path, out: Path) -> Path:
    """The text teacher's held-out files as a JSON-lines dataset (``{"text": ...}`` per file)."""
    from longkd.tools import text_teacher as tt

    spec = tt.TextTeacherSpec(**tt.load_metrics(teacher_dir)["spec"])
    with open(out, "w") as f:
        for path in tt.corpus_files(spec)[1]:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")
    return out


def random_teacher(teacher_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-weight model of the text teacher's config, saved with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher_dir))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def cache_bytes(cache: Path) -> tuple[int, int]:
    """(bytes of every shard file, window tokens) of a built cache."""
    manifest = json.loads((cache / "manifest.json").read_text())
    size = sum((cache / s["path"]).stat().st_size for s in manifest["shards"])
    windows = sum(s["rows"] for s in manifest["shards"])
    return size, windows * int(manifest["window"])


def column_bytes(cache: Path) -> dict[str, int]:
    """Each column's bytes when written alone into an Arrow file with zstd at the cache's level."""
    import pyarrow as pa

    manifest = json.loads((cache / "manifest.json").read_text())
    level = int(manifest["encoding"].get("compression_level", 1))
    options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))
    sizes: dict[str, int] = {}
    for shard in manifest["shards"]:
        with pa.memory_map(str(cache / shard["path"])) as source:
            table = pa.ipc.open_file(source).read_all()
        for name in table.column_names:
            alone = pa.table({name: table[name]})
            empty, sink = pa.BufferOutputStream(), pa.BufferOutputStream()
            for target, rows in ((empty, alone.slice(0, 0)), (sink, alone)):
                with pa.ipc.new_file(target, alone.schema, options=options) as writer:
                    writer.write_table(rows)
            sizes[name] = sizes.get(name, 0) + sink.getvalue().size - empty.getvalue().size
    return sizes


def _windows(cache: Path) -> list:
    from longkd.cache.reader import CacheReader

    with CacheReader(str(cache)) as reader:
        return list(reader.iter_windows())


def _by_id(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by id (padding, id -1, first), so caches that store another order compare."""
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def logprob_errors(plain: list, compact: list) -> dict[str, float]:
    """The largest |log-prob| differences of ``compact`` against ``plain`` (same teacher, same
    windows), matched by id within each row; ids the compact rows dropped (adaptive) are not
    compared, ids it holds that the plain rows lack are an error."""
    worst = {"max_logprob_error": 0.0, "max_logprob_error_all": 0.0, "max_target_error": 0.0}
    for a, b in zip(plain, compact, strict=True):
        a_ids, a_lp = _by_id(a.ids, a.logprobs)
        for t in range(a_ids.shape[0]):
            keep = b.ids[t] >= 0
            cols = np.searchsorted(a_ids[t], b.ids[t][keep])
            found = a_ids[t][np.minimum(cols, a_ids.shape[1] - 1)]
            if np.any(cols >= a_ids.shape[1]) or np.any(found != b.ids[t][keep]):
                raise LongkdError(f"window {a.window_id} row {t}: compact ids are not among the plain ids")
            err = np.abs(a_lp[t][cols].astype(np.float64) - b.logprobs[t][keep])
            big = a_lp[t][cols] >= np.log(P_MIN)
            worst["max_logprob_error_all"] = max(worst["max_logprob_error_all"], float(err.max(initial=0)))
            worst["max_logprob_error"] = max(worst["max_logprob_error"], float(err[big].max(initial=0)))
        real = ~np.isnan(a.target_logprob)
        diff = np.abs(a.target_logprob[real].astype(np.float64) - b.target_logprob[real])
        worst["max_target_error"] = max(worst["max_target_error"], float(diff.max(initial=0)))
    return worst


def id_alternatives(plain: list, vocab: int, level: int = fmt.DEFAULT_COMPRESSION_LEVEL) -> dict[str, float]:
    """Bytes/token of a top-k cache's ``ids`` under the format's encodings and under ones it
    does not have, each window's ids alone through zstd at ``level`` (in memory):

    - ``dictionary``: the format's compact encoding (the window's distinct ids ascending,
      then each row's places in them as sorted gaps);
    - ``sorted_gaps``: its earlier one (each row sorted, gaps, byte-shuffled);
    - ``remap_sorted_gaps``: ids first replaced by their rank in a frequency table fitted on
      the other half of the windows (what a table in the manifest, fitted on earlier data,
      would give), on that half of the windows only, beside ``sorted_gaps_same_half``;
    - ``window_dictionary``: per window, its distinct ids ordered by how many rows hold them
      (stored as byte-shuffled uint16/32), and each row's ids as sorted gaps of their places in
      that order; ``window_dictionary_table`` is the share of the dictionaries.
    """
    import zstandard

    from longkd.cache import encodings as enc

    def size(blob: bytes) -> int:
        return len(zstandard.ZstdCompressor(level=level).compress(blob))

    rows = [np.sort(w.ids, axis=1) for w in plain]
    tokens = sum(r.shape[0] for r in rows)
    out = dict.fromkeys(("dictionary", "window_dictionary", "window_dictionary_table"), 0.0)
    sorted_gaps = []  # each window's bytes under the earlier encoding
    for r in rows:
        counts = np.full(r.shape[0], r.shape[1])
        sorted_gaps.append(size(enc.encode_ids(r.reshape(-1), counts, vocab, packing="bytes")[0]))
        out["dictionary"] += size(enc.encode_dictionary_ids(r.reshape(-1), counts, vocab)[0])
        distinct, where, hits = np.unique(r.reshape(-1), return_inverse=True, return_counts=True)
        by_hits = np.argsort(-hits, kind="stable")
        place = np.empty(len(distinct), np.int64)
        place[by_hits] = np.arange(len(distinct))
        places = np.sort(place[where].reshape(r.shape), axis=1)
        width = 2 if vocab <= 2**16 else 4
        table = size(enc.shuffle_bytes(distinct[by_hits], width).tobytes())
        body = size(enc.encode_ids(places.reshape(-1), counts, len(distinct), packing="bytes")[0])
        out["window_dictionary"] += table + body
        out["window_dictionary_table"] += table
    out = {"sorted_gaps": sum(sorted_gaps) / tokens, **{k: v / tokens for k, v in out.items()}}
    half = len(rows) // 2
    if half:
        fitted = enc.frequency_remap(np.concatenate([r.reshape(-1) for r in rows[:half]]), vocab)
        remapped = 0
        for r in rows[half:]:
            ranks = np.sort(fitted[r], axis=1).reshape(-1)
            counts = np.full(r.shape[0], r.shape[1])
            remapped += size(enc.encode_ids(ranks, counts, vocab, packing="bytes")[0])
        held = sum(r.shape[0] for r in rows[half:])
        out["sorted_gaps_same_half"] = sum(sorted_gaps[half:]) / held
        out["remap_sorted_gaps"] = remapped / held
    return out


def logprob_alternatives(
    plain: list, vocab: int, level: int = fmt.DEFAULT_COMPRESSION_LEVEL
) -> dict[str, float]:
    """Bytes/token of a top-k cache's ``logprobs`` column under each grid encoding, rows by
    ascending id as the compact caches store them, each window's column alone through zstd at
    ``level`` (in memory): ``grid_max`` and ``grid_min`` (earlier compact encodings: the
    exact tail as float32), ``grid_shift_fine`` (``grid-shift`` without its coarse zone: what
    the stored shift alone saves), ``grid_shift`` (the format's: coarse zone 8 times coarser
    below p = 1e-4) and ``grid_shift_coarse{m}`` for other factors; ``share_below_1e-4`` is the
    share of entries below p = 1e-4, the ones a coarse zone may hold.
    """
    import zstandard

    from longkd.cache.column_codecs import COARSE_FACTOR, WindowContext, grid_logprobs

    encodings = {
        "grid_max": grid_logprobs("grid-max"),
        "grid_min": grid_logprobs("grid-min"),
        "grid_shift_fine": grid_logprobs("grid-shift", coarse_factor=1),
        "grid_shift": grid_logprobs("grid-shift"),
        **{f"grid_shift_coarse{m}": grid_logprobs("grid-shift", m) for m in (4, 16) if m != COARSE_FACTOR},
    }
    out = dict.fromkeys(encodings, 0.0)
    below = entries = 0
    for w in plain:
        order = np.argsort(w.ids, axis=1, kind="stable")
        logprobs = np.take_along_axis(w.logprobs, order, 1).reshape(-1)
        ctx = WindowContext(w.ids.shape[0], vocab, w.ids.shape[0], np.full(w.ids.shape[0], w.ids.shape[1]))
        for key, encoding in encodings.items():
            out[key] += len(zstandard.ZstdCompressor(level=level).compress(encoding.encode(logprobs, ctx)))
        below, entries = below + int((logprobs < np.log(P_MIN)).sum()), entries + logprobs.size
    tokens = sum(w.ids.shape[0] for w in plain)
    return {**{k: v / tokens for k, v in out.items()}, "share_below_1e-4": below / max(entries, 1)}


def curve_fit_errors(plain: list, degrees: tuple[int, ...] = (3, 6, 9)) -> dict[str, dict[str, float]]:
    """What a fitted curve in place of stored log-probs would cost and err: each row's sorted
    log-probs (rank r = 0..K-1) fitted by least squares with a polynomial of ``degree`` in
    ``log(1 + r)`` (in the Legendre basis, so that rounding the coefficients costs little), its
    coefficients stored as float16 (2 bytes each; the ids would still be
    stored in rank order, which is not counted here).

    Returns:
        ``{degree: {"coefficient_bpt": bytes/token, "max_error": nat, "mean_error": nat}}``,
        errors over the entries with p >= P_MIN of rows without -inf entries.
    """
    rows = np.concatenate([np.sort(w.logprobs, axis=1)[:, ::-1] for w in plain]).astype(np.float64)
    rows = rows[np.isfinite(rows).all(axis=1)]
    x = np.log1p(np.arange(rows.shape[1]))
    big = rows >= np.log(P_MIN)
    out = {}
    for degree in degrees:
        basis = np.polynomial.legendre.legvander(2 * x / x[-1] - 1, degree)  # [K, degree + 1]
        coef, *_ = np.linalg.lstsq(basis, rows.T, rcond=None)  # [degree + 1, rows]
        fitted = (basis @ coef.astype(np.float16).astype(np.float64)).T
        err = np.abs(fitted - rows)[big]
        out[str(degree)] = {
            "coefficient_bpt": 2.0 * (degree + 1),
            "max_error": float(err.max(initial=0)),
            "mean_error": float(err.mean()) if err.size else 0.0,
        }
    return out


def _batch(windows: list):
    import torch

    ids = torch.from_numpy(np.stack([w.input_ids for w in windows]).astype(np.int64))
    pos = torch.from_numpy(np.stack([w.position_ids for w in windows]).astype(np.int64))
    return ids, pos


def _padded(windows: list) -> tuple:
    """teacher ids / log-probs of ``windows`` padded to one K: int64 / float32 [B, W, K]."""
    import torch

    k = max(w.ids.shape[1] for w in windows)
    ids = np.full((len(windows), windows[0].ids.shape[0], k), -1, np.int64)
    lp = np.full(ids.shape, -np.inf, np.float32)
    for b, w in enumerate(windows):
        ids[b, :, : w.ids.shape[1]] = w.ids
        lp[b, :, : w.ids.shape[1]] = w.logprobs
    return torch.from_numpy(ids), torch.from_numpy(lp)


def _row_mask(windows: list):
    import torch

    return torch.from_numpy(np.stack([~np.isnan(w.target_logprob) for w in windows]))


def students(teacher_dir: Path, plain: list, seed: int = 0) -> dict:
    """Two fixed students of the teacher's shape: untrained, and half-trained: distilled
    (bucket sparse KL, AdamW) on the plain cache's windows until its loss is half the untrained
    one's (at most ``STUDENT_STEPS`` steps). A student that matched the teacher would make the
    relative error meaningless: its loss would be the size of the rounding itself."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from longkd import sparse_kl_loss

    torch.manual_seed(seed + 1)
    untrained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher_dir)).float()
    trained = copy.deepcopy(untrained)
    ids, pos = _batch(plain)
    t_ids, t_lp = _padded(plain)
    mask = _row_mask(plain)
    opt = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    first = None
    for _ in range(STUDENT_STEPS):
        logits = trained(input_ids=ids, position_ids=pos).logits
        loss = sparse_kl_loss(logits, t_ids, t_lp, mask=mask, mode="bucket")
        value = loss.item()
        first = value if first is None else first
        if value <= first / 2:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"untrained": untrained.eval(), "half-trained": trained.eval()}


def bucket_losses(models: dict, windows: list) -> dict[str, float]:
    """The bucket sparse KL of each student against ``windows``' rows (mean over real rows)."""
    import torch

    from longkd import sparse_kl_loss

    ids, pos = _batch(windows)
    t_ids, t_lp = _padded(windows)
    mask = _row_mask(windows)
    out = {}
    with torch.no_grad():
        for name, model in models.items():
            logits = model(input_ids=ids, position_ids=pos).logits.float()
            out[name] = float(sparse_kl_loss(logits, t_ids, t_lp, mask=mask, mode="bucket"))
    return out


def decode_speed(cache: Path, repeats: int = 5) -> float:
    """Tokens/s on one thread: the reader end to end (Arrow read, zstd, checks, decode, dense
    view), fastest of ``repeats`` passes over every window."""
    from longkd.cache.reader import CacheReader

    _, tokens = cache_bytes(cache)
    best = float("inf")
    for _ in range(repeats):
        with CacheReader(str(cache)) as reader:
            start = time.perf_counter()
            for _ in reader.iter_windows():
                pass
            best = min(best, time.perf_counter() - start)
    return tokens / best


def codec_decode_speed(cache: Path, repeats: int = 5) -> float:
    """Tokens/s on one thread of the column decoding alone: every window's record batch already
    read and decompressed, then ``read_columns`` (the codecs) and the dense [W, K] view;
    fastest of ``repeats`` passes."""
    import pyarrow as pa

    from longkd.cache.column_codecs import ColumnCodecs
    from longkd.cache.rows import dense_rows, read_columns

    manifest = json.loads((cache / "manifest.json").read_text())
    codecs, mode = ColumnCodecs.of(manifest), manifest["selection"]["mode"]
    batches = []
    for shard in manifest["shards"]:
        with pa.memory_map(str(cache / shard["path"])) as source:
            file = pa.ipc.open_file(source)
            batches += [file.get_batch(i) for i in range(file.num_record_batches)]
    _, tokens = cache_bytes(cache)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            for row in range(batch.num_rows):
                dense_rows(read_columns(batch, row, mode, codecs), manifest["window"], manifest["selection"])
        best = min(best, time.perf_counter() - start)
    return tokens / best


def codec_encode_speed(plain: Path, compact: Path, repeats: int = 3) -> float:
    """Tokens/s on one thread of the compact column encoding (what the writer does to each
    window before Arrow and zstd, :func:`snap_to_grid` included) of the plain top-k cache's
    windows, with the compact cache's encodings; fastest of ``repeats`` passes."""
    from longkd.cache.column_codecs import ColumnCodecs

    codecs = ColumnCodecs.of(json.loads((compact / "manifest.json").read_text()))
    windows = _windows(plain)
    values = [_top_k_columns([w], codecs.window) for w in windows]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for v, w in zip(values, windows, strict=True):
            codecs.encode(codecs.order_entries(v, None), w.length)
        best = min(best, time.perf_counter() - start)
    return len(values) * codecs.window / best


def _top_k_columns(group: list, w: int) -> dict[str, np.ndarray]:
    """The list columns of consecutive top-k windows of W = ``w`` (CachedWindow), concatenated
    as one window's flat arrays (segment starts shifted to their place in it)."""
    return {
        fmt.INPUT_IDS: np.concatenate([g.input_ids for g in group]),
        fmt.SEGMENT_STARTS: np.concatenate([g.segment_starts + j * w for j, g in enumerate(group)]),
        fmt.IDS: np.concatenate([g.ids.reshape(-1) for g in group]),
        fmt.LOGPROBS: np.concatenate([g.logprobs.reshape(-1) for g in group]),
        fmt.TARGET_LOGPROB: np.concatenate([g.target_logprob for g in group]),
    }


def long_windows(cache: Path, window: int, encodings: dict | None = None) -> tuple:
    """A top-k cache's windows, in order, re-encoded ``window // W`` at a time as windows of
    ``window`` tokens (their rows concatenated, with ``encodings``: default the cache's).

    Returns:
        ``(codecs, batches)``: the ColumnCodecs of the long windows and one record batch per
        long window (its encoded columns and ``length``).
    """
    import pyarrow as pa

    from longkd.cache.column_codecs import ColumnCodecs

    manifest = json.loads((cache / "manifest.json").read_text())
    windows, w = _windows(cache), int(manifest["window"])
    per = window // w
    if per < 1 or len(windows) < per:
        raise LongkdError(f"{cache} holds {len(windows)} windows of {w}: too few for windows of {window}")
    codecs = ColumnCodecs(
        "topk", manifest["selection"]["k"], per * w, manifest["vocab"]["embedding_size"],
        encodings or manifest["encoding"]["columns"],
    )  # fmt: skip
    batches = []
    for i in range(0, len(windows) - per + 1, per):
        values = _top_k_columns(windows[i : i + per], w)
        arrays = codecs.encode(codecs.order_entries(values, None), per * w)
        batches.append(pa.RecordBatch.from_pydict({**arrays, fmt.LENGTH: pa.array([per * w], pa.int32())}))
    return codecs, batches


def long_window_decode_speed(cache: Path, window: int = 4096, repeats: int = 5) -> float:
    """Tokens/s on one thread of the column decoding (as :func:`codec_decode_speed`, without
    the dense view) of :func:`long_windows`. At W = 512 a window's fixed costs (a numpy call per
    section, however short) are a large part of decoding; a real cache's windows are longer."""
    return _decode_speeds({"long": long_windows(cache, window)}, repeats)["long"]


def _decode_speeds(sets: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Tokens/s on one thread of decoding each ``(codecs, batches)`` of ``sets``
    (:func:`long_windows`), fastest of ``repeats`` passes, the sets timed in alternating passes."""
    best = dict.fromkeys(sets, float("inf"))
    for _ in range(repeats):
        for name, (codecs, batches) in sets.items():
            start = time.perf_counter()
            for batch in batches:
                codecs.decode(batch, 0, codecs.window)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(batches) * codecs.window / best[name] for name, (codecs, batches) in sets.items()}


def entropy(teacher_dir: Path, windows: list, temperature: float = 1.0) -> float:
    """Mean entropy (nats) of the teacher's full next-token distributions at ``temperature``
    on ``windows``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).float().eval()
    ids, pos = _batch(windows)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, position_ids=pos).logits.double() / temperature, -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


EARLIER_COMPACT = {fmt.LOGPROBS: "grid-min"}  # compact's log-probs before grid-shift


def earlier(columns: dict) -> dict:
    """A manifest's ``encoding.columns`` with EARLIER_COMPACT's ids and log-probs."""
    return {column: EARLIER_COMPACT.get(column, name) for column, name in columns.items()}


def earlier_decode_speeds(cache: Path, repeats: int = 7) -> dict[str, float]:
    """Tokens/s on one thread of the column decoding of a compact top-k cache's windows
    (W as built) with its encodings and with the earlier compact ones (EARLIER_COMPACT), both
    re-encoded in memory and timed in alternating passes (fastest of ``repeats`` each), so the
    ratio holds on a machine whose speed drifts between runs."""
    manifest = json.loads((cache / "manifest.json").read_text())
    w, columns = int(manifest["window"]), manifest["encoding"]["columns"]
    sets = {"current": long_windows(cache, w, columns), "earlier": long_windows(cache, w, earlier(columns))}
    return _decode_speeds(sets, repeats)


def measure_teacher(teacher: Path, data: Path, work: Path, args, temperature: float = 1.0) -> dict:
    """Every cache of one teacher (stored at ``temperature``) and its numbers (the JSON's keys
    for that teacher)."""
    adaptive_flags = ("--top-k", "64", "--min-mass", str(args.min_mass), "--encoding", "compact")
    builds = {
        "plain_topk64": ("--top-k", "64", "--encoding", "plain"),
        "compact_topk64": ("--top-k", "64", "--encoding", "compact"),
        "compact_topk64_zstd1": ("--top-k", "64", "--encoding", "compact", "--compression-level", "1"),
        "adaptive": adaptive_flags,
        "adaptive_min_prob": (*adaptive_flags, "--min-prob", str(args.min_prob)),
        "plain_sampled64": ("--sample-draws", "64", "--encoding", "plain"),
        "sampled64": ("--sample-draws", "64", "--encoding", "compact"),
    }
    caches = {}
    for name, flags in builds.items():
        start = time.perf_counter()
        caches[name] = _build(teacher, data, work / name, args, "--temperature", str(temperature), *flags)
        print(f"  built {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    result: dict = {"bytes_per_token": {}, "columns": {}}
    for name, cache in caches.items():
        size, tokens = cache_bytes(cache)
        result["bytes_per_token"][name] = size / tokens
        result["columns"][name] = {col: b / tokens for col, b in column_bytes(cache).items()}
    plain = _windows(caches["plain_topk64"])
    compact, adaptive = _windows(caches["compact_topk64"]), _windows(caches["adaptive"])
    adaptive_min_prob, sampled = _windows(caches["adaptive_min_prob"]), _windows(caches["sampled64"])
    errors = logprob_errors(plain, compact)
    adaptive_errors = logprob_errors(plain, adaptive)
    models = students(teacher, plain)
    ref = bucket_losses(models, plain)
    rel = {}
    for name, windows in (
        ("compact_topk64", compact), ("adaptive", adaptive), ("adaptive_min_prob", adaptive_min_prob)
    ):  # fmt: skip
        got = bucket_losses(models, windows)
        rel[name] = {s: abs(got[s] - ref[s]) / abs(ref[s]) for s in ref}

    def mean_entries(windows: list) -> float:
        return sum(int((w.ids >= 0).sum()) for w in windows) / sum(w.ids.shape[0] for w in windows)

    bpt = result["bytes_per_token"]
    long = min(4096, args.windows * args.window)  # windows re-encoded this long for decoding
    vocab = json.loads((caches["plain_topk64"] / "manifest.json").read_text())["vocab"]["embedding_size"]
    result.update(
        {
            "teacher_entropy": entropy(teacher, plain, temperature),
            "temperature": temperature,
            "plain_topk64_bpt": bpt["plain_topk64"],
            "compact_topk64_bpt": bpt["compact_topk64"],
            "compact_topk64_zstd1_bpt": bpt["compact_topk64_zstd1"],
            "adaptive_bpt": bpt["adaptive"],
            "adaptive_mean_entries": mean_entries(adaptive),
            "adaptive_min_prob_bpt": bpt["adaptive_min_prob"],
            "adaptive_min_prob_mean_entries": mean_entries(adaptive_min_prob),
            "adaptive_min_prob_bucket_loss_rel_error": max(rel["adaptive_min_prob"].values()),
            "sampled64_mean_entries": mean_entries(sampled),
            "sampled64_bpt": bpt["sampled64"],
            "plain_sampled64_bpt": bpt["plain_sampled64"],
            "max_logprob_error": errors["max_logprob_error"],
            "max_logprob_error_all": errors["max_logprob_error_all"],
            "max_target_logprob_error": errors["max_target_error"],
            "adaptive_max_logprob_error": adaptive_errors["max_logprob_error"],
            "bucket_loss_rel_error": max(max(rel[name].values()) for name in ("compact_topk64", "adaptive")),
            "curve_fit": curve_fit_errors(plain),
            "id_alternatives": id_alternatives(plain, vocab),
            "logprob_alternatives": logprob_alternatives(plain, vocab),
            "bucket_loss_rel_errors": rel,
            "bucket_losses_plain": ref,
            "decode_tokens_per_s_one_core": codec_decode_speed(caches["compact_topk64"]),
            "plain_decode_tokens_per_s_one_core": codec_decode_speed(caches["plain_topk64"]),
            f"decode_tokens_per_s_one_core_w{long}": long_window_decode_speed(caches["compact_topk64"], long),
            "decode_speeds_current_vs_earlier": earlier_decode_speeds(caches["compact_topk64"]),
            "encode_tokens_per_s_one_core": codec_encode_speed(
                caches["plain_topk64"], caches["compact_topk64"]
            ),
            "reader_tokens_per_s_one_core": decode_speed(caches["compact_topk64"]),
            "plain_reader_tokens_per_s_one_core": decode_speed(caches["plain_topk64"]),
        }
    )
    return result


def table(result: dict) -> str:
    """The headline numbers of both teachers as a markdown table, then the per-column bytes."""
    teachers = ("text", "text_sharp", "random")
    keys = [k for k, v in result["text"].items() if isinstance(v, float)]
    lines = ["| measure | " + " | ".join(teachers) + " |", "|---|" + "---:|" * len(teachers)]
    lines += [f"| {k} | " + " | ".join(f"{result[t][k]:.4g}" for t in teachers) + " |" for k in keys]
    for teacher in teachers:
        lines += ["", f"Bytes/token per column, {teacher} teacher:", ""]
        caches = result[teacher]["columns"]
        names = sorted({c for cols in caches.values() for c in cols})
        lines += ["| column | " + " | ".join(caches) + " |", "|---|" + "---:|" * len(caches)]
        for col in names:
            row = [f"{caches[c][col]:.2f}" if col in caches[c] else "" for c in caches]
            lines.append(f"| {col} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def default_teacher() -> Path:
    """The text teacher of the default settings, if trained (``python -m longkd.tools.text_teacher``)."""
    from longkd.tools import text_teacher as tt

    return tt.cached_dir(tt.TextTeacherSpec(), "~/.cache/longkd/text-teacher")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m longkd.tools.bench_encoding",
        description="Build plain, compact, adaptive and sampled caches of a text teacher and of a "
        "random teacher of the same shape with `longkd cache build`, and print bytes per token, "
        "per-column bytes, log-prob and bucket-loss errors, and decoding speed.",
    )
    p.add_argument(
        "--teacher",
        help="a trained text teacher's directory (default: the one "
        "`python -m longkd.tools.text_teacher` trains under ~/.cache/longkd/text-teacher)",
    )
    p.add_argument("--windows", type=int, default=16, help="windows per cache (default: 16)")
    p.add_argument("--window", type=int, default=512, help="W (default: 512, the teacher's context)")
    p.add_argument("--min-mass", type=float, default=0.999, help="adaptive rows' covered mass (0.999)")
    p.add_argument(
        "--min-prob",
        type=float,
        default=1e-3,
        help="a second adaptive cache also stops a row at the first entry below this probability "
        "(default: 1e-3)",
    )
    p.add_argument(
        "--sharp-temperature",
        type=float,
        default=0.5,
        help="also cache the text teacher at this temperature: peaked rows like a better-trained "
        "teacher's (default: 0.5)",
    )
    p.add_argument(
        "--zstd-level",
        type=int,
        default=fmt.DEFAULT_COMPRESSION_LEVEL,
        help=f"the caches' zstd level (default: {fmt.DEFAULT_COMPRESSION_LEVEL}, longkd's)",
    )
    p.add_argument("--work", help="keep the caches here (default: a temporary directory, removed)")
    p.add_argument("--json", help="also write every number here")
    args = p.parse_args(argv)
    teacher = Path(args.teacher).expanduser() if args.teacher else default_teacher()
    if not (teacher / "metrics.json").is_file():
        raise SystemExit(
            f"error: no trained text teacher at {teacher}; "
            "train it with `python -m longkd.tools.text_teacher`"
        )
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="longkd-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = heldout_dataset(teacher, work / "heldout.jsonl")
        result = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "work")}}
        result["settings"]["teacher"] = str(teacher)
        print("text teacher:", file=sys.stderr)
        result["text"] = measure_teacher(teacher, data, work / "text", args)
        print(f"text teacher at T = {args.sharp_temperature}:", file=sys.stderr)
        sharp = args.sharp_temperature
        result["text_sharp"] = measure_teacher(teacher, data, work / "text-sharp", args, sharp)
        print("random teacher:", file=sys.stderr)
        rand = random_teacher(teacher, work / "random-teacher")
        result["random"] = measure_teacher(rand, data, work / "random", args)
    headline = {k: v for k, v in result["text"].items() if not isinstance(v, dict)}
    for name in ("text_sharp", "random"):
        headline[f"{name}_teacher"] = {k: v for k, v in result[name].items() if not isinstance(v, dict)}
    result = {**headline, **result}
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
