"""The terminal, PNG and HTML views of ``longkd cache inspect``.

:mod:`longkd.tools.inspect_cache` computes the statistics of a cache and of single positions as
JSON-serialisable dicts; this module only renders those dicts (tables on the terminal, a
2 x 2 figure, a self-contained HTML report), so what is measured and how it is shown can be
read and changed apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longkd.cache.verify import describe_selection
from longkd.tools import report
from longkd.tools.inspect_cache import STATS

HEADERS = ["bucket", "rows", "entropy (nats)", "top-1 p", "covered", "entries", "target NLL", "target stored"]


def format_inspect(result: dict) -> str:
    """The terminal view of :func:`~longkd.tools.inspect_cache.inspect_cache`."""
    s = result["summary"]
    selection = describe_selection(s["selection"])
    stats = s["packing_stats"]
    packing = (
        f"{stats.get('samples', '?')} samples, efficiency {report.format_value(stats.get('efficiency'))}, "
        f"{stats.get('split_samples', '?')} split, {stats.get('dropped_tokens', '?')} tokens dropped"
    )
    raw_note = "" if s["raw_bytes_exact"] else " (estimated from the sample)"
    disk_bpt = report.format_value(s["bytes_per_token_disk"])
    raw_bpt = report.format_value(s["bytes_per_token_raw"])
    pairs = [
        ("cache", s["uri"]), ("teacher", f"{s['teacher']} ({s['model_type']})"),
        ("tokenizer size", f"{s['tokenizer_size']} (embedding {s['embedding_size']})"),
        ("window", s["window"]), ("windows", s["windows"]), ("tokens", s["tokens"]),
        ("selection", f"{selection} ({s['logprobs_encoding']} log-probs)"), ("temperature", s["temperature"]),
        ("position mode", s["position_mode"]),
        ("packing", packing),
        ("bytes on disk", f"{s['bytes_on_disk']:,} ({disk_bpt} B/token)"),
        ("raw bytes", f"{s['raw_bytes']:,}{raw_note} ({raw_bpt} B/token)"),
        ("compression ratio", s["compression_ratio"]),
    ]  # fmt: skip
    o = result["overall"]

    def table(groups):
        return report.text_table(HEADERS, [[g["bucket"], g["rows"], *(g[k] for k in STATS)] for g in groups])

    return "\n".join([
        report.key_value_table(pairs), "",
        f"statistics over {len(result['sample']['windows'])} windows, {o['rows']:,} rows "
        f"(row t predicts token t+1; rows t >= length-1 masked)",
        f"  {result['definitions']['entropy']}", "",
        table([{"bucket": "all", **o}]), "",
        "by position in the window (row index t)", table(result["by_position"]), "",
        "by offset from the start of the packed segment", table(result["by_segment_offset"]),
    ])  # fmt: skip


def format_position(result: dict) -> str:
    """The terminal view of :func:`~longkd.tools.inspect_cache.show_position`."""
    ctx = result["context"]
    shown = ctx["text"] if ctx["text"] is not None else " ".join(map(str, ctx["ids"]))
    lines = [
        f"window {result['window']}, row {result['at']} (position id {result['position_id']}, "
        f"offset {result['segment_offset']} in its segment; length {result['length']})",
        f"tokens: {result['tokenizer']}",
        f"context [{ctx['start']}..{result['at']}]: {shown}",
    ]
    nxt = result["next"]
    if nxt is None:
        lines.append("true next token: none (row beyond the window's real tokens; not trained on)")
    else:
        rank = f"rank {nxt['rank']}" if nxt["rank"] else "not among the stored ids"
        name = nxt["token"] if nxt["token"] is not None else nxt["id"]
        lines.append(f"true next token: {name!r} (id {nxt['id']}), p = {nxt['prob']:.4g}, {rank}")
    if result["tail_mass"] is not None:
        lines.append(f"tail mass outside the stored ids: {result['tail_mass']:.4g}")
    sampled = result["selection"] == "sampled"
    headers = ["rank", "id", "token", "prob", "logprob"] + (["count"] if sampled else [])
    rows = [[c["rank"], c["id"], c["token"] if c["token"] is not None else "-", c["prob"], c["logprob"],
             *([c["count"]] if "count" in c else [])] for c in result["candidates"]]  # fmt: skip
    return "\n".join([*lines, "", report.text_table(headers, rows)])


def plot_inspect(result: dict, path) -> Path:
    """PNG: covered mass and entropy against position, histograms of top-1 and entropy."""
    s = result["summary"]
    fig, axes = report.subplots(2, 2, width=5.2, height=3.6)
    groups = [g for g in result["by_position"] if g["rows"]]
    mid = [(g["start"] + g["end"] - 1) / 2 for g in groups]
    sel = s["selection"]
    kind = {
        "topk": f"top-{sel.get('k')}",
        "adaptive": f"adaptive top-{sel.get('k')}",
        "sampled": f"sampled ({sel.get('draws')} draws; 1 by definition)",
    }[sel["mode"]]
    for ax, key, label, title in (
        (axes[0, 0], "covered", "covered probability mass (fraction)", f"Covered mass by position, {kind}"),
        (axes[0, 1], "entropy", "mean entropy (nats)", "Entropy of the cached rows by position"),
    ):
        ax.plot(mid, [g[key] for g in groups], marker="o")
        ax.set_xlabel("position in window (tokens, bucket centre)")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, s["window"])
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(min([0.0] + [g["covered"] for g in groups]) - 0.02, 1.02)
    for ax, key, xlabel, title in (
        (axes[1, 0], "top1", "top-1 probability", "Histogram of the top-1 probability"),
        (axes[1, 1], "entropy", "entropy (nats)", "Histogram of the row entropy"),
    ):
        h = result["histograms"][key]
        edges = np.asarray(h["edges"])
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", edgecolor="white")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows (count)")
        ax.set_title(title, fontsize=10)
    sample = result["sample"]
    fig.suptitle(f"{Path(str(s['teacher'])).name}: {sample['rows']:,} rows from {len(sample['windows'])} "
                 f"windows (W={s['window']})", fontsize=11)  # fmt: skip
    return report.save_figure(fig, path)


def html_inspect(result: dict, path, png=None) -> Path:
    """A self-contained HTML report: summary, statistics tables and the plot embedded (base64).

    Args:
        result: from :func:`~longkd.tools.inspect_cache.inspect_cache`.
        path: the HTML file to write.
        png: an existing PNG of :func:`plot_inspect`; drawn to a temporary file when None.
    """
    import tempfile

    s = result["summary"]
    if png is None:
        with tempfile.TemporaryDirectory() as tmp:
            data = plot_inspect(result, Path(tmp) / "inspect.png").read_bytes()
    else:
        data = Path(png).read_bytes()
    summary = [(k, v) for k, v in s.items() if k not in ("packing", "packing_stats")]

    def table(groups):
        return report.html_table(HEADERS, [[g["bucket"], g["rows"], *(g[k] for k in STATS)] for g in groups])

    defs = result["definitions"]
    packing = list(s["packing"].items()) + list(s["packing_stats"].items())
    sections = [
        report.html_section("Summary", report.html_key_values(summary)),
        report.html_section("Packing", report.html_key_values(packing)),
        report.html_section("Overall", report.html_note(f"{defs['rows']}. {defs['entropy']}."),
                            table([{"bucket": "all", **result["overall"]}])),
        report.html_section("By position in the window", report.html_note(defs["by_position"]),
                            table(result["by_position"])),
        report.html_section("By offset from the packed segment start",
                            report.html_note(defs["by_segment_offset"]), table(result["by_segment_offset"])),
        report.html_section("Plots", report.html_image(data, "coverage, entropy and histograms")),
    ]  # fmt: skip
    return report.write_html(path, f"longkd cache inspect: {s['uri']}", sections)
