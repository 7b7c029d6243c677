"""The ``toy`` task of ``longkd eval``: retrieval accuracy by fact-query distance for toy-world models.

Models trained on the toy world (:mod:`longkd.tools.toy_world`, :mod:`longkd.tools.toy_models`) speak
no natural language, so the text tasks of :mod:`longkd.tools.evals` (passkey, needle) cannot
prompt them. This module scores them at the token level instead: a probe holds a fact
``FACT key value`` and, ``d`` tokens later, ``QUERY key``; the model is right when its greedy
next token is ``value``. The probes and their scoring live in :mod:`longkd.tools.toy_world`; here they
are run over a grid of distances, marked where a probe exceeds the model's position limit, and
written out as a table and a plot:

    longkd eval MODEL --task toy [--distances 8,16,32 --per-distance 64 --toy-world JSON]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def toy_distances(max_positions: int | None, lead: int = 16) -> list[int]:
    """Default fact-query distances: 8, 16, 32, ... up to twice the position limit (256 if unknown)."""
    top = 2 * (max_positions or 128)
    out, d = [], 8
    while d + 2 + lead <= top:
        out.append(d)
        d *= 2
    return out or [8]


def run_toy(
    model,
    world,
    *,
    max_positions: int | None,
    distances: Sequence[int] | None = None,
    per_distance: int = 64,
    seed: int = 0,
    lead: int = 16,
) -> dict:
    """The toy world's token-level retrieval probe: accuracy (x100) by fact-query distance.

    Uses :func:`longkd.tools.toy_world.make_probes` and :func:`longkd.tools.toy_world.retrieval_accuracy`,
    so it needs no natural-language tokenizer. A probe at distance d is ``d + 2 + lead``
    tokens long; distances whose probes exceed ``max_positions`` are marked ``extrapolation``.

    Args:
        model: a causal LM trained on ``world``.
        world: the :class:`longkd.tools.toy_world.ToyWorld` the model was trained on.
        max_positions: the model's position limit.
        distances: fact-query distances (default :func:`toy_distances`).
        per_distance: probes per distance.
        seed: probe draw.
        lead: filler tokens before each probe's fact.

    Returns:
        A JSON-ready dict with ``by_distance`` rows ``{distance, length, score, extrapolation}``.
    """
    from longkd.tools.toy_world import make_probes, retrieval_accuracy

    distances = list(distances) if distances else toy_distances(max_positions, lead)
    probes = make_probes(world, distances, per_distance, lead=lead, seed=seed)
    accuracy = retrieval_accuracy(model, probes)
    rows = []
    for d, acc in sorted(accuracy.items()):
        length = int(probes.buckets[d].input_ids.shape[1])
        rows.append({"distance": int(d), "length": length, "score": 100.0 * float(acc),
                     "extrapolation": max_positions is not None and length > max_positions})  # fmt: skip
    return {
        "task": "toy",
        "world": world.to_dict(),
        "per_distance": per_distance,
        "seed": seed,
        "chance": 100.0 * world.chance,
        "max_positions": max_positions,
        "mean_score": sum(r["score"] for r in rows) / len(rows),
        "by_distance": rows,
    }


def toy_markdown(result: dict) -> str:
    """The toy probe's accuracy by distance as a markdown table.

    Args:
        result: from :func:`run_toy`.

    Returns:
        One row per distance: distance, probe length (marked ``(extrapolation)`` beyond the
        position limit) and score.
    """
    rows = ["| fact-query distance | probe length | score (%) |", "|---:|---:|---:|"]
    for r in result["by_distance"]:
        mark = " (extrapolation)" if r["extrapolation"] else ""
        rows.append(f"| {r['distance']} | {r['length']}{mark} | {r['score']:.1f} |")
    return "\n".join(rows)


def plot_toy(result: dict, path: str | Path, title: str) -> Path:
    """Accuracy against fact-query distance; probes longer than the position limit drawn hollow.

    Args:
        result: from :func:`run_toy`.
        path: the PNG to write.
        title: the plot title (the position limit is appended when known).

    Returns:
        The path written.
    """
    from longkd.tools.report import pyplot, save_figure

    plt = pyplot()

    rows = result["by_distance"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r["distance"] for r in rows], [r["score"] for r in rows], color="C0", marker="o",
            label="accuracy")  # fmt: skip
    extra = [r for r in rows if r["extrapolation"]]
    if extra:
        ax.scatter([r["distance"] for r in extra], [r["score"] for r in extra], s=90, facecolors="white",
                   edgecolors="C3", zorder=3, label="probe beyond position limit")  # fmt: skip
    ax.axhline(result["chance"], color="0.5", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("fact-query distance (tokens)")
    ax.set_ylabel("retrieval accuracy (%)")
    limit = f" (position limit {result['max_positions']})" if result["max_positions"] else ""
    ax.set_title(f"{title}{limit}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
