"""Teacher-free evaluation on held-out cached windows: KL(teacher || student) and perplexity by position.

The cache already holds the teacher's view of every position, so a student can be scored
against its teacher without loading the teacher: run the student on cached windows it was not
trained on, and measure per position bucket the same divergence the training loss minimises
(:func:`longkd.kernels.sparse_kl.sparse_kl`, ``reduction="none"``) and the student's
perplexity on the true next tokens. A student that learned to use long context shows a KL that
stays low (or falls) with position; one that did not shows it rising beyond its trained window.

    from longkd.tools.eval_cache import kl_by_position
    result = kl_by_position("runs/student/checkpoint-1000", "runs/cache", windows=32)

    longkd eval MODEL --task cache-kl --cache DIR       # run_cache_kl + write_cache_kl

Held-out windows: by default the LAST ``windows`` windows of the cache (window ids
``num_windows - windows .. num_windows - 1``). A trainer that holds out the tail of the cache
(or a separate cache) therefore evaluates on data it never saw; pass ``indices`` for another
split. Rows t >= length - 1 are masked (row W-1 predicts a token the cache does not hold).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from longkd.errors import LongkdError, one_line

# One definition of a model's position limit and of the one-line error text for all the evals
# (evals.py does not import this module, so there is no cycle).
from longkd.tools.evals import position_limit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_student(path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM directory (a trainer checkpoint or any Hugging Face model) for evaluation.

    The config is loaded as saved, so a checkpoint's scaled RoPE (``rope_parameters``) and its
    ``max_position_embeddings`` are in force.

    Args:
        path: model directory or hub id (hub ids load only from the local Hugging Face cache).
        device: torch device.
        dtype: ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        The model in eval mode, gradients off.

    Raises:
        LongkdError: not a model directory, not a causal LM, or loading fails.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = str(path)
    if dtype not in DTYPES:
        raise LongkdError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise LongkdError(
            f"{name} is not a model directory (no config.json); pass a Hugging Face model directory"
        )
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for unloadable configs
        raise LongkdError(f"cannot load a model config from {name}: {one_line(exc)}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LongkdError(
            f"{name} is a {config.model_type!r} model, not a causal LM; pass a decoder-only model"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, config=config, dtype=DTYPES[dtype], local_files_only=True
        )
    except Exception as exc:
        raise LongkdError(f"cannot load the model from {name}: {one_line(exc)}") from exc
    return model.to(device).eval().requires_grad_(False)


def _logits_size(model) -> int:
    head = model.get_output_embeddings()
    if getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _loss():
    """The training loss's per-row sparse KL (the public entry, which picks the kernel)."""
    try:
        from longkd.kernels.sparse_kl import sparse_kl
    except ImportError as exc:
        raise LongkdError(f"longkd.kernels.sparse_kl cannot be imported ({exc}); reinstall longkd") from exc
    return sparse_kl


def _edges(window: int, buckets: int) -> np.ndarray:
    if buckets < 1:
        raise LongkdError(f"buckets must be at least 1, got {buckets}")
    return np.unique(np.linspace(0, window, min(buckets, window) + 1).round().astype(np.int64))


@torch.inference_mode()
def _score_batch(model, batch, *, prefix, mode, temperature, chunk_size, sparse_kl) -> dict[str, np.ndarray]:
    """Per-row KL and CE of the student on a batch of cached windows (valid rows only).

    Args:
        batch: B :class:`~longkd.cache.reader.CachedWindow` (ids/logprobs [W, K]).
        prefix: P, rows 0..P-1 are scored (the model sees input_ids[:, :P]).

    Returns:
        Arrays over the R valid rows: ``row``, ``position_id``, ``kl``, ``ce``, ``teacher_nll``.
    """
    from longkd.models import lm_head_logits

    device = next(model.parameters()).device
    ids = torch.from_numpy(np.stack([w.input_ids[:prefix] for w in batch]).astype(np.int64)).to(device)
    pos = torch.from_numpy(np.stack([w.position_ids[:prefix] for w in batch])).to(device)
    out = model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, P, d]
    # Sampled caches: each window's K differs; pad to the batch's largest (id -1, log-prob -inf).
    k = max(w.ids.shape[1] for w in batch)
    tids = np.full((len(batch), prefix, k), -1, dtype=np.int64)
    tlps = np.full((len(batch), prefix, k), -np.inf, dtype=np.float32)
    for b, w in enumerate(batch):
        tids[b, :, : w.ids.shape[1]] = w.ids[:prefix]
        tlps[b, :, : w.ids.shape[1]] = w.logprobs[:prefix]
    rows = np.arange(prefix)
    lengths = np.array([w.length for w in batch])
    valid = rows[None, :] < lengths[:, None] - 1  # [B, P]; row t needs input_ids[t+1]
    nxt = np.stack([np.append(w.input_ids[1 : prefix + 1], 0)[:prefix] for w in batch]).astype(np.int64)
    kl = np.zeros((len(batch), prefix))
    ce = np.zeros((len(batch), prefix))
    for s in range(0, prefix, chunk_size):
        e = min(prefix, s + chunk_size)
        logits = lm_head_logits(model, hidden[:, s:e], float32=True)  # [B, c, V] fp32
        logits = logits.reshape(len(batch) * (e - s), -1)  # [B*c, V]
        mask = torch.from_numpy(valid[:, s:e].reshape(-1)).to(device)
        kl_rows = sparse_kl(logits, torch.from_numpy(tids[:, s:e].reshape(-1, k)).to(device),
                            torch.from_numpy(tlps[:, s:e].reshape(-1, k)).to(device),
                            mode=mode, temperature=temperature, mask=mask, reduction="none")  # fmt: skip
        target = torch.from_numpy(nxt[:, s:e].reshape(-1, 1)).to(device)
        ce_rows = torch.logsumexp(logits, dim=-1) - logits.gather(-1, target).squeeze(-1)  # at T = 1
        kl[:, s:e] = kl_rows.double().cpu().numpy().reshape(len(batch), e - s)
        ce[:, s:e] = ce_rows.double().cpu().numpy().reshape(len(batch), e - s)
    teacher = -np.stack([w.target_logprob[:prefix] for w in batch]).astype(np.float64)
    pos_np = pos.cpu().numpy()
    return {
        "row": np.broadcast_to(rows, valid.shape)[valid],
        "position_id": pos_np[valid],
        "kl": kl[valid],
        "ce": ce[valid],
        "teacher_nll": teacher[valid],
    }


def kl_by_position(
    model,
    uri,
    *,
    windows: int = 16,
    buckets: int = 8,
    batch_size: int = 4,
    device: str = "cpu",
    mode: str = "bucket",
    window: int | None = None,
    indices=None,
    dtype: str = "float32",
    chunk_size: int = 1024,
    skip_damaged: bool = False,
) -> dict:
    """KL(teacher || student) and the student's perplexity by position on held-out cached windows.

    Args:
        model: a loaded causal LM (used on its own device) or a model directory / hub id
            (loaded with :func:`load_student` on ``device`` in ``dtype``).
        uri: the cache directory or URI.
        windows: how many windows: the last ``windows`` of the cache (all if it has fewer).
        buckets: equal-width buckets of the row index over the evaluated prefix.
        batch_size: windows per forward.
        device: torch device when ``model`` is a path.
        mode: the loss mode, as in training: ``bucket`` (default; top-k and adaptive caches,
            whose rows of 1..K entries are padded), ``renorm`` or ``sampled``.
        window: evaluate the first P = ``window`` rows of each cached window (prefix validity:
            a causal teacher's first P rows are its distribution on the P-token prefix); default
            the cache window W.
        indices: explicit window indices instead of the last ``windows``.
        dtype: when ``model`` is a path.
        chunk_size: positions per LM-head chunk (bounds the [B, c, V] fp32 logits).
        skip_damaged: leave damaged windows out (listed under ``damaged``) instead of stopping.

    Returns:
        JSON-serialisable dict: ``model``, ``cache``, ``windows`` (indices), ``window`` (P),
        ``cache_window`` (W), ``mode``, ``temperature`` (the cache's T; the KL uses student
        logits / T as in training), ``max_positions`` (the model's limit, see
        :func:`position_limit`), ``rows``, ``overall`` and ``by_position`` (one entry per
        bucket: ``bucket``, ``start``, ``end`` (exclusive), ``rows``, ``kl`` (mean nats per
        row), ``ce`` (mean student cross-entropy at T = 1 on the true next tokens),
        ``perplexity`` = exp(ce), ``teacher_nll`` (mean -target_logprob, at the cache's T),
        ``max_position_id``, ``extrapolation`` (a row's position id >= ``max_positions``)),
        ``extrapolation`` (any bucket), and ``damaged`` (window ids skipped with
        ``skip_damaged``; ``windows`` lists those evaluated).

    Raises:
        LongkdError: not a cache, a model that cannot load, a student vocabulary smaller than
            the teacher's ids, bad arguments, or (without ``skip_damaged``) a damaged window.
    """
    from longkd.cache.reader import CacheReader

    reader = CacheReader(uri, skip_damaged=skip_damaged)
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model = load_student(model, device=device, dtype=dtype)
    else:
        name = getattr(model, "name_or_path", None) or type(model).__name__
    teacher_vocab = int(reader.manifest["vocab"]["embedding_size"])
    if _logits_size(model) < teacher_vocab:
        raise LongkdError(
            f"the model has {_logits_size(model)} logits but the cache's teacher has {teacher_vocab}; "
            "evaluate a student with the teacher's vocabulary"
        )
    prefix = reader.window if window is None else int(window)
    if not 2 <= prefix <= reader.window:
        raise LongkdError(f"window {prefix} must be between 2 and the cache window {reader.window}")
    if batch_size < 1 or chunk_size < 1:
        raise LongkdError(f"batch_size and chunk_size must be positive, got {batch_size} and {chunk_size}")
    if indices is None:
        if windows < 1:
            raise LongkdError(f"windows must be at least 1, got {windows}")
        indices = list(range(max(0, reader.num_windows - windows), reader.num_windows))
    else:
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < reader.num_windows]
        if bad:
            raise LongkdError(f"window indices {bad[:5]} are outside the cache's 0..{reader.num_windows - 1}")
    edges = _edges(prefix, buckets)
    limit = position_limit(model.config)
    sparse_kl = _loss()
    parts: dict[str, list[np.ndarray]] = {}
    windows_read = reader.iter_windows(indices)
    evaluated = []
    while batch := list(itertools.islice(windows_read, batch_size)):
        evaluated.extend(w.window_id for w in batch)
        scored = _score_batch(model, batch, prefix=prefix, mode=mode, temperature=reader.temperature,
                              chunk_size=chunk_size, sparse_kl=sparse_kl)  # fmt: skip
        for key, values in scored.items():
            parts.setdefault(key, []).append(values)
    reader.close()
    if not evaluated:
        raise LongkdError(
            f"all {len(indices)} selected windows of {reader.location.uri} are damaged; rebuild the cache"
        )
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    group = np.searchsorted(edges, rows["row"], side="right") - 1
    by_position = []
    for b in range(len(edges) - 1):
        sel = group == b
        entry = {"bucket": f"{edges[b]}-{edges[b + 1] - 1}", "start": int(edges[b]), "end": int(edges[b + 1])}
        entry.update(_means(rows, sel))
        top = int(rows["position_id"][sel].max()) if sel.any() else None
        entry["max_position_id"] = top
        entry["extrapolation"] = bool(limit is not None and top is not None and top >= limit)
        by_position.append(entry)
    return {
        "model": name,
        "cache": reader.location.uri,
        "windows": evaluated,
        "damaged": reader.damaged,
        "window": prefix,
        "cache_window": reader.window,
        "selection": dict(reader.selection),
        "mode": mode,
        "temperature": reader.temperature,
        "max_positions": limit,
        "rows": int(rows["row"].size),
        "overall": _means(rows, np.ones(rows["row"].size, dtype=bool)),
        "by_position": by_position,
        "extrapolation": any(e["extrapolation"] for e in by_position),
    }


def _means(rows: dict[str, np.ndarray], sel: np.ndarray) -> dict:
    n = int(sel.sum())
    if n == 0:
        return {"rows": 0, "kl": None, "ce": None, "perplexity": None, "teacher_nll": None}
    ce = float(rows["ce"][sel].mean())
    return {
        "rows": n,
        "kl": float(rows["kl"][sel].mean()),
        "ce": ce,
        "perplexity": math.exp(ce) if ce < 700 else math.inf,
        "teacher_nll": float(rows["teacher_nll"][sel].mean()),
    }


def format_kl(result: dict) -> str:
    """A terminal table of :func:`kl_by_position`."""
    from longkd.tools import report

    head = (
        f"{result['model']} on {result['cache']}: {len(result['windows'])} held-out windows, "
        f"{result['rows']:,} rows, prefix {result['window']} of {result['cache_window']}, "
        f"KL mode {result['mode']} at T={result['temperature']:g}, position limit {result['max_positions']}"
    )
    headers = ["positions", "rows", "KL (nats)", "student ppl", "teacher NLL", "extrapolation"]
    table = [[e["bucket"], e["rows"], e["kl"], e["perplexity"], e["teacher_nll"], e["extrapolation"]]
             for e in result["by_position"]]  # fmt: skip
    o = result["overall"]
    table.append(["all", o["rows"], o["kl"], o["perplexity"], o["teacher_nll"], result["extrapolation"]])
    return head + "\n" + report.text_table(headers, table)


def plot_kl(result: dict, path) -> Path:
    """PNG: KL and student perplexity against position, positions beyond the limit shaded."""
    from longkd.tools import report

    groups = [e for e in result["by_position"] if e["rows"]]
    mid = [(e["start"] + e["end"] - 1) / 2 for e in groups]
    fig, axes = report.subplots(1, 2, width=5.2, height=3.6)
    for ax, key, label in ((axes[0], "kl", "KL(teacher || student) (nats per token)"),
                           (axes[1], "perplexity", "student perplexity (true next token)")):  # fmt: skip
        ax.plot(mid, [e[key] for e in groups], marker="o")
        shaded = [e for e in groups if e["extrapolation"]]
        if shaded:
            start = min(e["start"] for e in shaded)
            ax.axvspan(start, result["window"], color="0.88", label="beyond position limit")
            ax.legend(fontsize=8)
        ax.set_xlabel("position in window (tokens, bucket centre)")
        ax.set_ylabel(label)
        ax.set_xlim(0, result["window"])
        ax.grid(alpha=0.3)
    axes[0].set_title("KL to the cached teacher by position", fontsize=10)
    axes[1].set_title("Student perplexity by position", fontsize=10)
    return report.save_figure(fig, path)


# --------------------------------------------------------------------------- longkd eval --task cache-kl


def run_cache_kl(model_path: str, cache: str, **kwargs) -> dict:
    """KL(teacher || model) and perplexity by position on cached windows (``longkd eval``).

    Args:
        model_path: the model directory or hub id.
        cache: the cache directory or URI.
        **kwargs: :func:`kl_by_position` keyword arguments; ``None`` values are left to its
            defaults (the CLI passes unset options as ``None``).

    Returns:
        The :func:`kl_by_position` result.
    """
    return kl_by_position(model_path, cache, **{k: v for k, v in kwargs.items() if v is not None})


def write_cache_kl(result: dict, out_dir: str | Path) -> dict:
    """Write ``results.json``, ``results.md`` and ``kl.png`` for a cache-kl result.

    Args:
        result: from :func:`run_cache_kl` / :func:`kl_by_position`.
        out_dir: output directory (created).

    Returns:
        The paths (``json``, ``markdown``, ``plot``), and under ``table`` the terminal table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_kl(result)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "results.md").write_text(f"# KL to the teacher by position\n\n```\n{table}\n```\n")
    png = plot_kl(result, out / "kl.png")
    return {"json": out / "results.json", "markdown": out / "results.md", "plot": png, "table": table}
