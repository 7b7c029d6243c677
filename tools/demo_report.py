"""The tables and the plot of ``longkd demo``, computed only from the eval outputs it read back.

``tools/demo.py`` runs the pipeline and collects, per seed and model, the parsed
``results.json`` of ``longkd eval --task toy`` and ``--task cache-kl``; this module reduces
them (retrieval within and beyond the student's context S, KL to the teacher before and after
position S, mean and spread over seeds) and writes OUT/results.json, OUT/results.md and
OUT/retrieval.png. Nothing here is a constant result: every number traces to an eval file,
whose path is kept next to it in results.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from longkd.tools import report

ORDER = ("teacher", "kd-phasewise", "kd-static", "ce-phasewise", "kd-reset-control", "untrained")
DESCRIPTIONS = {
    "teacher": "long-context teacher (context W)",
    "kd-phasewise": "KD, phase-wise RoPE scaling (window and factor grow S -> W)",
    "kd-static": "KD, static RoPE scaling (final factor W/S from step 0)",
    "ce-phasewise": "cross-entropy only, same packed windows and schedule as kd-phasewise",
    "kd-reset-control": "KD, phase-wise, from the reset-positions cache (control)",
    "untrained": "the short-context student as pre-trained (context S)",
}


# The claims the README states, as the demo checks them in every seed: (name, statement,
# minuend, subtrahend or None, distances, bound). The value checked is the minuend's mean
# retrieval over the distances, less the subtrahend's, per seed; the claim holds when every
# seed's value is >= the bound. Distances are "beyond" (S < d) or "far" (2S < d <= W - S:
# past twice the student's context, short of the window's edge, where no student retrieves
# and a difference is noise). The bounds sit below the lowest value measured over seeds,
# presets and CPU configurations by a margin (docs/demo.md, "How much the numbers move"), so
# that a run on another machine passes them and a pipeline that lost the effect does not.
CLAIMS = (
    ("kd_beyond_S", "KD (phase-wise) retrieves beyond S", "kd-phasewise", None, "beyond", 0.70),
    ("kd_over_ce", "KD beats cross-entropy on the same windows beyond S", "kd-phasewise", "ce-phasewise",
     "beyond", 0.15),
    ("phasewise_vs_static", "phase-wise scaling is level with static scaling or ahead", "kd-phasewise",
     "kd-static", "beyond", -0.05),
    ("kd_over_control", "KD beats the reset-positions control past 2S", "kd-phasewise", "kd-reset-control",
     "far", 0.15),
)  # fmt: skip


def claim_distances(where: str, short: int, window: int) -> tuple[int, int]:
    """The distances ``(low, high]`` a claim of :data:`CLAIMS` averages over."""
    return {"beyond": (short, window), "far": (2 * short, window - short)}[where]


def accuracy_by_distance(result: dict) -> dict[int, float]:
    """``{distance: accuracy in [0, 1]}`` from a ``longkd eval --task toy`` results.json."""
    return {int(r["distance"]): float(r["score"]) / 100.0 for r in result["by_distance"]}


def aggregate(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "sd": sd, "min": min(values), "max": max(values), "n": n, "values": values}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def kl_split(kl: dict, short: int) -> tuple[float | None, float | None]:
    """Row-weighted mean KL of the buckets that start before S and of those at or after S."""

    def weighted(entries):
        rows = sum(e["rows"] for e in entries if e["rows"])
        return sum(e["kl"] * e["rows"] for e in entries if e["rows"]) / rows if rows else None

    parts = kl["by_position"]
    return weighted([e for e in parts if e["start"] < short]), weighted(
        [e for e in parts if e["start"] >= short]
    )


def claim_checks(models: dict, short: int, window: int) -> list[dict]:
    """Test each of :data:`CLAIMS` on every seed of ``models`` (``summarize``'s models).

    Args:
        models: ``{name: {"per_seed": {seed: {"by_distance": {distance: accuracy}}}}}``.
        short: the student's context S.
        window: the teacher's window W.

    Returns:
        One dict per claim: ``name``, ``claim`` (the statement), ``measures`` (what is
        compared), ``bound``, ``per_seed`` (seed -> value, accuracy in [0, 1]), ``ok``;
        a claim whose models are missing is left out.
    """

    def mean_in(row: dict, low: int, high: int) -> float:
        return _mean(a for d, a in row["by_distance"].items() if low < int(d) <= high)

    checks = []
    for name, claim, minuend, subtrahend, where, bound in CLAIMS:
        if minuend not in models or (subtrahend and subtrahend not in models):
            continue
        low, high = claim_distances(where, short, window)
        per_seed = {}
        for seed, row in models[minuend]["per_seed"].items():
            value = mean_in(row, low, high)
            if subtrahend:
                value -= mean_in(models[subtrahend]["per_seed"][seed], low, high)
            per_seed[seed] = value
        span = f"distances {low} < d <= {high}"
        measures = f"{minuend} - {subtrahend}, {span}" if subtrahend else f"{minuend}, {span}"
        checks.append(dict(name=name, claim=claim, measures=measures, bound=bound, per_seed=per_seed,
                           ok=min(per_seed.values()) >= bound))  # fmt: skip
    return checks


def summarize(evals: dict, *, recipe, settings: dict, timings: dict, record: dict, device: str) -> dict:
    """Reduce the per-seed eval outputs to the demo's results.

    Args:
        evals: ``{seed: {model: {"toy": {distance: accuracy}, "toy_results": path,
            "kl": cache-kl result (students only), "kl_results": path}}}``.
        recipe: the toy recipe (``window`` W, ``short`` S, ``world``).
        settings, timings, record, device: carried into the results as they are.

    Returns:
        The JSON-ready results (see OUT/results.json); accuracies in [0, 1], KL in nats.
    """
    short, window = recipe.short, recipe.window
    inside = recipe.short_max_distance()
    seeds = sorted(evals)
    models = {}
    for name in ORDER:
        per_seed = {}
        for seed in seeds:
            e = evals[seed].get(name)
            if e is None:
                continue
            acc = e["toy"]
            row = {
                "within": _mean(a for d, a in acc.items() if d <= inside),
                "beyond": _mean(a for d, a in acc.items() if d > short),
                "by_distance": {str(d): a for d, a in sorted(acc.items())},
                "toy_results": e["toy_results"],
            }
            if "kl" in e:
                below, after = kl_split(e["kl"], short)
                row.update(
                    kl_below_S=below,
                    kl_from_S=after,
                    kl_overall=e["kl"]["overall"]["kl"],
                    kl_results=e["kl_results"],
                )
            per_seed[str(seed)] = row
        if not per_seed:
            continue
        rows = list(per_seed.values())
        summary = {
            k: aggregate([r[k] for r in rows])
            for k in ("within", "beyond", "kl_below_S", "kl_from_S")
            if all(r.get(k) is not None for r in rows)
        }
        distances = rows[0]["by_distance"].keys()
        models[name] = {
            "description": DESCRIPTIONS[name],
            "per_seed": per_seed,
            "summary": summary,
            "by_distance_mean": {d: _mean(r["by_distance"][d] for r in rows) for d in distances},
        }
    from longkd.tools import toy_models  # torch: not at `longkd --help`

    chance = recipe.world.chance
    teacher = models["teacher"]["per_seed"].values()
    student = models["untrained"]["per_seed"].values()

    def misses(kind, rows):
        return [m for r in rows for m in toy_models.precondition_failures(
            kind, recipe, {int(d): a for d, a in r["by_distance"].items()})]

    beyond = [a for r in student for d, a in r["by_distance"].items() if int(d) > short]
    preconditions = {
        "teacher_min_accuracy": min(min(r["by_distance"].values()) for r in teacher),
        "teacher_ok": not misses("teacher", teacher),
        "student_within_S": min(r["within"] for r in student),
        "student_max_beyond_S": max(beyond) if beyond else None,
        "student_ok": not misses("student", student),
        # the rule's bounds, so the report states what was checked
        "teacher_floor": toy_models.TEACHER_FLOOR,
        "student_floor": toy_models.STUDENT_FLOOR,
        "student_ceiling_chances": toy_models.STUDENT_CEILING_CHANCES,
    }
    inspect = {}
    for cache, rep in record.get("inspect", {}).items():
        s = rep["summary"]
        inspect[cache] = {
            k: s.get(k) for k in ("window", "windows", "bytes_per_token_disk", "compression_ratio")
        }
        inspect[cache]["overall"] = rep["overall"]
        inspect[cache]["by_position"] = rep["by_position"]
    return {
        "recipe": {
            "name": recipe.name,
            "window": window,
            "short": short,
            "chance": chance,
            "within_S_max_distance": inside,
            "world": recipe.world.to_dict(),
        },
        "settings": settings,
        "device": device,
        "seeds": [int(s) for s in seeds],
        "models": models,
        "preconditions": preconditions,
        "inspect": inspect,
        "claims": claim_checks(models, short, window),
        "numerics": record.get("numerics", {}),
        "pretrain": record.get("pretrain", {}),
        "precondition_error": record.get("precondition_error"),
        "timings_s": timings,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pm(agg: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if agg is None:
        return "-"
    text = f"{scale * agg['mean']:.{digits}f}"
    return text + (f" ± {scale * agg['sd']:.{digits}f}" if agg["n"] > 1 else "")


def _claim_value(claim: dict, value: float, digits: int = 1) -> str:
    """A claim's value in %, signed when it is a difference of two models."""
    return f"{100 * value:{'+' if ' - ' in claim['measures'] else ''}.{digits}f}"


def markdown(results: dict) -> str:
    """OUT/results.md: headline, retrieval by distance, KL, cache summary, checks, timings."""
    r = results["recipe"]
    S, W, n = r["short"], r["window"], len(results["seeds"])
    st = results["settings"]
    lines = [
        "# longkd demo: results",
        "",
        f"Teacher context W = {W}, student context S = {S}, recipe `{r['name']}`; {st['steps']} steps x "
        f"{st['batch_size']} windows per student; {n} seed(s); device {results['device']}; "
        f"chance {100 * r['chance']:.1f}%. Retrieval in % of probes (greedy next token after `QUERY key`); "
        f"'within S' = distances <= {r['within_S_max_distance']} (the probe fits in S), 'beyond S' = "
        f"distances > {S}. KL: nats per token to the cached teacher on held-out windows, positions < {S} "
        f"and >= {S}. Mean ± sample sd over seeds.",
        "",
        *(
            [f"**WARNING: the models missed their precondition ({results['precondition_error']}); "
             "the run went on under --no-checks and its comparison means nothing.**", ""]
            if results.get("precondition_error") else []
        ),  # fmt: skip
        "## Headline",
        "",
        "| model | what | within S | beyond S | beyond S per seed | KL pos < S | KL pos >= S |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        s = m["summary"]
        per = ", ".join(_pct(v["beyond"]) for v in m["per_seed"].values())
        lines.append(
            f"| {name} | {m['description']} | {_pm(s.get('within'))} | {_pm(s.get('beyond'))} | {per} | "
            f"{_pm(s.get('kl_below_S'), 1.0, 3)} | {_pm(s.get('kl_from_S'), 1.0, 3)} |"
        )
    distances = list(next(iter(results["models"].values()))["by_distance_mean"])
    head = [f"{d}{'*' if int(d) > S else ''}" for d in distances]
    lines += [
        "",
        f"## Retrieval by fact-query distance (%, mean over seeds; * = beyond S = {S})",
        "",
        "| model | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(head),
    ]
    for name, m in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(m["by_distance_mean"][d]) for d in distances) + " |")
    if results["inspect"]:
        lines += [
            "",
            "## The caches (`longkd cache inspect`)",
            "",
            "| cache | windows | bytes/token on disk | teacher entropy | top-1 prob | covered mass |",
            "|---|---|---|---|---|---|",
        ]
        for cache, c in results["inspect"].items():
            o = c["overall"]
            lines.append(
                f"| {cache} | {c['windows']} | {report.format_value(c['bytes_per_token_disk'])} | "
                f"{report.format_value(o.get('entropy'))} | {report.format_value(o.get('top1'))} | "
                f"{report.format_value(o.get('covered'))} |"
            )
    p = results["preconditions"]
    lines += [
        "",
        "## Preconditions (measured in this run)",
        "",
        f"- teacher: lowest retrieval over all distances {_pct(p['teacher_min_accuracy'])}% "
        f"(needs >= {100 * p['teacher_floor']:.0f}): {'ok' if p['teacher_ok'] else 'FAILED'}",
        f"- student: lowest within S {_pct(p['student_within_S'])}% "
        f"(needs >= {100 * p['student_floor']:.0f}), highest beyond S {_pct(p['student_max_beyond_S'])}% "
        f"(needs <= {p['student_ceiling_chances']:g} x chance = "
        f"{100 * p['student_ceiling_chances'] * r['chance']:.1f}%): "
        f"{'ok' if p['student_ok'] else 'FAILED'}",
        "",
        "## Claims (checked in every seed)",
        "",
        "| claim | measured (retrieval, %) | needs | per seed | |",
        "|---|---|---|---|---|",
        *(
            f"| {c['claim']} | {c['measures']} | >= {_claim_value(c, c['bound'], 0)} | "
            f"{', '.join(_claim_value(c, v) for v in c['per_seed'].values())} | "
            f"{'ok' if c['ok'] else 'FAILED'} |"
            for c in results["claims"]
        ),
        *(
            ["", "Computed with " + ", ".join(f"{k} {v}" for k, v in results["numerics"].items()) + "."]
            if results["numerics"] else []
        ),
        "",
        "## Timings (s)",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in results["timings_s"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> Path:
    """OUT/retrieval.png: accuracy against distance, one line per model, S marked."""
    r = results["recipe"]
    S, n = r["short"], len(results["seeds"])
    fig, ax = report.subplots(1, 1, width=9.0, height=4.6)
    styles = {
        "teacher": dict(color="black", ls="--"),
        "kd-phasewise": dict(color="tab:blue"),
        "kd-static": dict(color="tab:orange"),
        "ce-phasewise": dict(color="tab:green"),
        "kd-reset-control": dict(color="tab:purple"),
        "untrained": dict(color="0.5", ls=":"),
    }
    for name, m in results["models"].items():
        ds = [int(d) for d in m["by_distance_mean"]]
        mean = [100 * v for v in m["by_distance_mean"].values()]
        (line,) = ax.plot(ds, mean, marker="o", ms=3.5, label=name, **styles.get(name, {}))
        if n > 1:
            per = [[100 * s["by_distance"][str(d)] for s in m["per_seed"].values()] for d in ds]
            ax.fill_between(
                ds, [min(v) for v in per], [max(v) for v in per], color=line.get_color(), alpha=0.12
            )
    ax.axvline(S, color="tab:red", lw=1)
    ax.axvspan(S, r["window"], color="tab:red", alpha=0.05)
    ax.text(
        S * 1.05, 50, f"beyond student context S={S}", color="tab:red", fontsize=8, rotation=90, va="center"
    )
    ax.axhline(100 * r["chance"], color="0.6", lw=0.8, ls="-.")
    ax.text(3.2, 100 * r["chance"] + 1.5, "chance", color="0.4", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(3, r["window"])
    ticks: list[int] = []
    for d in sorted(int(d) for d in next(iter(results["models"].values()))["by_distance_mean"]):
        if not ticks or d >= 1.15 * ticks[-1]:  # labels of close distances would overlap
            ticks.append(d)
    ax.set_xticks(ticks, [str(d) for d in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel("fact-to-query distance (tokens, log scale)")
    ax.set_ylabel("retrieval accuracy (% of probes)")
    spread = f"mean of {n} seeds, band = min-max" if n > 1 else "1 seed"
    title = f"Toy retrieval by distance: teacher W={r['window']}, student S={S} ({spread})"
    if results.get("precondition_error"):
        title += "\nPRECONDITIONS NOT MET (run with --no-checks): this comparison is no evidence either way"
    ax.set_title(title, fontsize=10, color="tab:red" if results.get("precondition_error") else "black")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return report.save_figure(fig, path)


def write(results: dict, out: str | Path) -> dict[str, Path]:
    """Write OUT/results.json, OUT/results.md and OUT/retrieval.png."""
    out = Path(out)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "retrieval.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths
