"""A study of the demo's training recipe: one factor at a time, several seeds, CPU cost per run.

``longkd demo`` trains its students with one recipe (tools/demo.py). This tool varies one
setting of that recipe over a few levels (the factor), trains a student per level, seed and
arm with the real ``longkd train`` and measures it with ``longkd eval --task toy``, so that
the question "what closes the retrieval gap at the window's edge?" gets an answer with a
spread and a price (docs/demo.md, "What closes the gap at the window's edge").

What it reuses, so that a study fits a busy 2-core machine:

- the pre-trained toy teacher and student (``--models-dir``, trained once, as the demo does);
- the caches: a cache depends only on seed, documents, top-k and position mode, so it is
  built once under OUT/caches and shared by every level and arm that needs it;
- finished runs: each run is kept under OUT/runs/ID (ID: a hash of arm, recipe and seed), so
  the base level of every factor is trained once, and an interrupted study resumes.

Every run is one child process with one torch thread (the demo's CPU settings pinned); its
cost is the process CPU time of training (robust to other jobs on the machine) and the wall
time. The study of a factor writes OUT/FACTOR.json (every run and the summary) and
OUT/FACTOR.md (one table: mean ± sd over seeds; ``--name`` chooses another file name).

    python -m longkd.tools.demo_study --factor steps --levels 240,480,960 --seeds 0,1,2
    python -m longkd.tools.demo_study --factor temperature --levels none,2,4 --set mode=renorm
    python -m longkd.tools.demo_study --factor phases --levels 64:1,128:1,256:1 256:1 \\
        --arms kd-phasewise,kd-reset-control --out study-out --models-dir demo-out/models
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from longkd.errors import LongkdError

# arm -> the position mode of the cache it trains on: the demo's students that the study can
# train (ce-phasewise: cross-entropy only, the recipe's KD settings unused), and the untrained
# student with the RoPE the schedule ends with (no cache, no training): what scaling alone gives.
ARMS = {
    "kd-phasewise": "continuous",
    "kd-reset-control": "reset",
    "ce-phasewise": "continuous",
    "untrained-scaled": None,
}


@dataclass(frozen=True)
class StudyRecipe:
    """The settings a study varies; the defaults are the full demo's (``longkd demo``).

    Attributes:
        steps: optimizer steps.
        batch_size: windows per step.
        lr: peak learning rate (warmup steps // 20, cosine to 0.1 x, as the demo).
        phases: the schedule, ``"WINDOW:SHARE,..."`` (e.g. ``"64:1,128:1,256:2"``: windows
            grow 64 -> 256, the last phase half the steps); None: the demo's S, 2S, ..., W
            in equal shares.
        rope_type: RoPE scaling of every phase whose window exceeds S (yarn, linear, dynamic...).
        rope_headroom: multiplies each phase's factor window / S (1: the demo's phase-wise
            scaling; 1.25: a phase of window W runs with the rope of 1.25 W).
        mode: sparse-KL tail mode (bucket or renorm; trainer/losses.py).
        temperature: KD temperature (None: the cache's; other values need mode renorm).
        ce_weight: weight of next-token cross-entropy beside the KL (KD arms).
        top_k: teacher entries per position in the caches.
        train_docs: short training documents per seed.
        doc_tokens: ``"MIN-MAX"`` tokens per training document (the demo: S/2 to S); shorter
            documents pack more of them into each window.
    """

    steps: int = 240
    batch_size: int = 8
    lr: float = 1e-3
    phases: str | None = None
    rope_type: str = "yarn"
    rope_headroom: float = 1.0
    mode: str = "bucket"
    temperature: float | None = None
    ce_weight: float = 0.0
    top_k: int = 32
    train_docs: int = 3000
    doc_tokens: str | None = None


FACTORS = tuple(f.name for f in dataclasses.fields(StudyRecipe))


def parse_level(factor: str, text: str):
    """The value of ``factor`` that ``text`` names (``none`` for None where allowed).

    Raises:
        LongkdError: an unknown factor or a value of the wrong type.
    """
    if factor not in FACTORS:
        raise LongkdError(f"unknown study factor {factor!r}; use one of {', '.join(FACTORS)}")
    default = getattr(StudyRecipe(), factor)
    kind = {f.name: f.type for f in dataclasses.fields(StudyRecipe)}[factor]
    if text.lower() == "none":
        if "None" not in str(kind):
            raise LongkdError(f"study factor {factor} cannot be none; give a value like {default!r}")
        return None
    try:
        if "int" in str(kind):
            return int(text)
        if "float" in str(kind):
            return float(text)
    except ValueError:
        raise LongkdError(f"study factor {factor}: {text!r} is not a number") from None
    return text


def with_setting(recipe: StudyRecipe, factor: str, text: str) -> StudyRecipe:
    """``recipe`` with ``factor`` set to the level ``text`` names."""
    return dataclasses.replace(recipe, **{factor: parse_level(factor, text)})


# ----------------------------------------------------------------------------- the recipe, spelled out


def phase_list(recipe: StudyRecipe, short: int, window: int) -> list[tuple[int, float]]:
    """``[(window, share)]`` of the schedule (the demo's S, 2S, ..., W in equal shares when unset).

    Raises:
        LongkdError: a malformed ``phases`` string or a window outside S..W.
    """
    if recipe.phases is None:
        windows = [short]
        while windows[-1] * 2 < window:
            windows.append(windows[-1] * 2)
        return [(w, 1.0) for w in [*windows, window]]
    phases = []
    for part in recipe.phases.split(","):
        try:
            w, share = part.split(":")
            phases.append((int(w), float(share)))
        except ValueError:
            raise LongkdError(
                f"study phases {recipe.phases!r}: write WINDOW:SHARE,... (e.g. 64:1,128:1,256:2)"
            ) from None
    if any(not short <= w <= window or s <= 0 for w, s in phases):
        raise LongkdError(
            f"study phases {recipe.phases!r}: windows must lie in {short}..{window}, shares be > 0"
        )
    return phases


def schedule(recipe: StudyRecipe, short: int, window: int) -> list[dict]:
    """The ``longkd train`` schedule (a phase list, trainer/rope.py) of ``recipe``.

    With the defaults it equals the demo's ``phasewise`` preset: phase i ends at
    round(steps * (i + 1) / n), its rope is ``rope_type`` with factor window / S (none at S).
    """
    phases = phase_list(recipe, short, window)
    total = sum(s for _, s in phases)
    out, done = [], 0.0
    for i, (w, share) in enumerate(phases):
        done += share
        factor = recipe.rope_headroom * w / short
        rope = None
        if factor > 1.0:
            # S, the original window, is the student's max_position_embeddings (trainer/rope.py)
            rope = {"rope_type": recipe.rope_type, "factor": factor}
        out.append({"name": f"phase{i + 1}-w{w}", "until": round(recipe.steps * done / total), "window": w,
                    "rope": rope})  # fmt: skip
    return out


def train_config(recipe: StudyRecipe, arm: str, *, student: Path, cache: Path, out: Path, seed: int,
                 short: int, window: int) -> dict:  # fmt: skip
    """The ``longkd train`` config of one arm (as ``tools/demo.train_config`` writes the demo's)."""
    if not ARMS.get(arm):
        trained = [a for a, mode in ARMS.items() if mode]
        raise LongkdError(f"no training for study arm {arm!r}; trained arms: {', '.join(trained)}")
    if arm == "ce-phasewise":
        loss = {"mode": recipe.mode, "kd_weight": 0.0, "ce_weight": 1.0}
    else:
        loss = {"mode": recipe.mode, "kd_weight": 1.0, "ce_weight": recipe.ce_weight}
        if recipe.temperature is not None:
            loss["temperature"] = recipe.temperature
    optimizer = dict(lr=recipe.lr, warmup_steps=max(1, recipe.steps // 20), lr_schedule="cosine",
                     min_lr_ratio=0.1)  # fmt: skip
    st = dict(name=arm, init=str(student), schedule=schedule(recipe, short, window), loss=loss,
              optimizer=optimizer)  # fmt: skip
    return dict(cache=str(cache), out=str(out), seed=seed, steps=recipe.steps, batch_size=recipe.batch_size,
                log_every=10, checkpoint_every=recipe.steps, keep_checkpoints=1, device="cpu",
                loader={"num_workers": 0, "shuffle": True}, students=[st])  # fmt: skip


def doc_range(recipe: StudyRecipe, short: int) -> tuple[int, int]:
    """``(min, max)`` tokens of a training document (the demo: S // 2 to S).

    Raises:
        LongkdError: a malformed ``doc_tokens`` or one longer than S.
    """
    if recipe.doc_tokens is None:
        return short // 2, short
    try:
        lo, hi = (int(x) for x in recipe.doc_tokens.split("-"))
    except ValueError:
        raise LongkdError(f"study doc_tokens {recipe.doc_tokens!r}: write MIN-MAX (e.g. 16-32)") from None
    if not 0 < lo <= hi <= short:
        raise LongkdError(f"study doc_tokens {recipe.doc_tokens!r}: need 0 < MIN <= MAX <= S={short}")
    return lo, hi


def cache_key(recipe: StudyRecipe, arm: str, seed: int) -> str:
    """The name of the cache an arm trains on: what the cache depends on, and nothing else."""
    docs = "" if recipe.doc_tokens is None else f"-d{recipe.doc_tokens}"
    return f"{ARMS[arm]}-s{seed}-n{recipe.train_docs}-k{recipe.top_k}{docs}"


def run_id(recipe: StudyRecipe, arm: str, seed: int) -> str:
    """A short stable name of one run (arm, every recipe setting, seed)."""
    text = json.dumps({"arm": arm, "seed": seed, **asdict(recipe)}, sort_keys=True)
    return f"{arm}-s{seed}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


# ----------------------------------------------------------------------------- jobs (child processes)


def _job_cache(job: dict) -> dict:
    """Write the seed's documents and build one cache (``longkd cache build``, as the demo)."""
    from longkd.tools.demo import run_cli
    from longkd.tools.toy_models import RECIPES
    from longkd.tools.toy_world import save_documents, short_documents

    recipe, toy = StudyRecipe(**job["recipe"]), RECIPES[job["toy_recipe"]]
    out, seed = Path(job["out"]), job["seed"]
    lo, hi = doc_range(recipe, toy.short)
    data = save_documents(
        short_documents(toy.world, recipe.train_docs, hi, seed=1000 + seed, min_length=lo),
        out.with_suffix(".jsonl"),
    )
    argv = ["cache", "build", "--teacher", job["teacher"], "--data", str(data), "--window", str(toy.window),
            "--position-mode", job["mode"], "--no-eos", "--top-k", str(recipe.top_k), "--batch-size", "8",
            "--device", "cpu", "--seed", str(seed), "--out", str(out)]  # fmt: skip
    run_cli(argv, out.parent / "cache.log")
    return {}


def scaled_student(student: Path, recipe: StudyRecipe, out: Path, short: int, window: int) -> Path:
    """Save the untrained student with the RoPE of the schedule's last phase, as training would end.

    Returns:
        ``out``, a model directory (weights as pre-trained, config with the scaled rope).
    """
    import shutil

    from transformers import AutoModelForCausalLM

    from longkd.trainer.rope import apply_rope, build_schedule

    model = AutoModelForCausalLM.from_pretrained(student)
    last = build_schedule(schedule(recipe, short, window), base_config=model.config)[-1]
    if last.rope_parameters is not None:
        apply_rope(model, last.rope_parameters, last.max_position_embeddings)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (student / name).is_file():
            shutil.copy(student / name, out / name)
    return out


def _job_run(job: dict) -> dict:
    """Train one student and measure its retrieval by distance; CPU and wall time of each."""
    import yaml

    from longkd.tools.demo import run_cli
    from longkd.tools.demo_report import accuracy_by_distance
    from longkd.tools.toy_models import RECIPES

    recipe, toy = StudyRecipe(**job["recipe"]), RECIPES[job["toy_recipe"]]
    out = Path(job["out"])
    cpu, wall = time.process_time(), time.perf_counter()
    if ARMS[job["arm"]] is None:
        checkpoint = scaled_student(Path(job["student"]), recipe, out / "model", toy.short, toy.window)
    else:
        cfg = train_config(recipe, job["arm"], student=Path(job["student"]), cache=Path(job["cache"]),
                           out=out / "train", seed=job["seed"], short=toy.short,
                           window=toy.window)  # fmt: skip
        (out / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_cli(["train", str(out / "train.yaml"), "--no-progress"], out / "train.log")
        root = out / "train" / job["arm"] / "checkpoints"
        checkpoint = root / (root / "latest").read_text().strip()
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
    cpu, wall = time.process_time(), time.perf_counter()
    argv = ["eval", str(checkpoint), "--task", "toy", "--out", str(out / "toy"), "--device", "cpu",
            "--distances", ",".join(map(str, toy.distances())), "--per-distance", str(job["per_distance"]),
            "--seed", str(job["seed"]), "--toy-world", job["toy_world"]]  # fmt: skip
    run_cli(argv, out / "eval.log")
    toy_result = json.loads((out / "toy" / "results.json").read_text())
    return {
        "by_distance": {str(d): a for d, a in accuracy_by_distance(toy_result).items()},
        "train_cpu_s": round(train_cpu, 2),
        "train_wall_s": round(train_wall, 2),
        "eval_cpu_s": round(time.process_time() - cpu, 2),
        "eval_wall_s": round(time.perf_counter() - wall, 2),
    }


def run_job(path: Path) -> None:
    """Run the job described in ``path`` (JSON) in this process; write its result beside it."""
    import torch

    torch.set_num_threads(1)
    job = json.loads(path.read_text())
    result = {"cache": _job_cache, "run": _job_run}[job["kind"]](job)
    tmp = path.with_name("result.json.tmp")
    tmp.write_text(json.dumps({**job, **result}, indent=1) + "\n")
    tmp.replace(path.with_name("result.json"))


def _spawn(job: dict, folder: Path) -> dict:
    """Run ``job`` in a child process (one thread, the demo's CPU settings) unless done."""
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "job.json"
    spec.write_text(json.dumps(job, indent=1) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "longkd.tools.demo_study", "--job", str(spec)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if proc.returncode != 0:
        tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        raise LongkdError(f"study job {folder.name} failed: {tail[0]} (job in {spec})")
    return json.loads(done.read_text())


# ----------------------------------------------------------------------------- a study


def run_study(out: Path, models_dir: Path, factor: str, levels: list[str], seeds: list[int],
              arms: list[str], base: StudyRecipe, *, toy_recipe: str = "w256", per_distance: int = 64,
              jobs: int = 1, name: str | None = None) -> dict:  # fmt: skip
    """Train and measure every (level, seed, arm); write OUT/NAME.json and OUT/NAME.md.

    Args:
        out: the study folder (caches, runs and tables; shared by studies of other factors).
        models_dir: the pre-trained toy models (trained here when missing, as the demo does).
        factor: a :class:`StudyRecipe` field; levels: its values, as text.
        seeds: training seeds (documents, order and probes, as the demo's seeds).
        arms: students per level (keys of :data:`ARMS`).
        base: the recipe every level starts from.
        toy_recipe: ``tools/toy_models.RECIPES`` key; per_distance: probes per distance.
        jobs: child processes at a time (one torch thread each).
        name: the tables' file name (default: the factor).

    Returns:
        ``{"factor", "levels", "runs": [...], "summary": [...]}`` (as written to NAME.json).

    Raises:
        LongkdError: an unknown factor, arm or level, or a failed job.
    """
    from longkd.tools.demo import pin_cpu_numerics

    pin_cpu_numerics()  # before torch loads; the child processes inherit it
    from longkd.tools.toy_models import RECIPES, get_or_train_both

    if toy_recipe not in RECIPES:
        raise LongkdError(f"toy recipe {toy_recipe!r} is unknown; use one of {', '.join(RECIPES)}")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise LongkdError(f"study arms {unknown or arms}: use some of {', '.join(ARMS)}")
    toy = RECIPES[toy_recipe]
    recipes = {level: with_setting(base, factor, level) for level in levels}
    for r in recipes.values():  # bad phases or document lengths fail before anything runs
        phase_list(r, toy.short, toy.window)
        doc_range(r, toy.short)
    out.mkdir(parents=True, exist_ok=True)
    dirs = get_or_train_both(toy, models_dir, progress=False)
    toy_world = out / f"toy_world-{toy_recipe}.json"
    toy_world.write_text(json.dumps(toy.world.to_dict()) + "\n")
    common = {"toy_recipe": toy_recipe, "teacher": str(dirs["teacher"]), "student": str(dirs["student"])}

    caches = {}
    for r in recipes.values():
        for seed in seeds:
            for arm in [a for a in arms if ARMS[a]]:
                key = cache_key(r, arm, seed)
                caches[key] = {"kind": "cache", "recipe": asdict(r), "seed": seed, "mode": ARMS[arm],
                               "out": str(out / "caches" / key / "cache"), **common}  # fmt: skip
    runs = [(level, r, seed, arm) for level, r in recipes.items() for seed in seeds for arm in arms]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda item: _spawn(item[1], out / "caches" / item[0]), caches.items()))

        def one(item):
            level, r, seed, arm = item
            job = {"kind": "run", "recipe": asdict(r), "arm": arm, "seed": seed, "per_distance": per_distance,
                   "cache": str(out / "caches" / cache_key(r, arm, seed) / "cache") if ARMS[arm] else None,
                   "toy_world": str(toy_world), **common}  # fmt: skip
            rid = run_id(r, arm, seed)
            job["out"] = str(out / "runs" / rid)
            result = _spawn(job, out / "runs" / rid)
            print(f"[study] {factor}={level} {arm} seed {seed}: {describe(result, toy.short, toy.window)}",
                  flush=True)  # fmt: skip
            return {"level": level, "id": rid, **result}

        results = list(pool.map(one, runs))
    study = {"factor": factor, "levels": levels, "seeds": seeds, "arms": arms, "base": asdict(base),
             "runs": results, "summary": summarize(results, toy.short, toy.window)}  # fmt: skip
    (out / f"{name or factor}.json").write_text(json.dumps(study, indent=1) + "\n")
    (out / f"{name or factor}.md").write_text(markdown(study, toy.short, toy.window))
    return study


# ----------------------------------------------------------------------------- tables


def run_metrics(by_distance: dict, short: int, window: int) -> dict:
    """Within S, beyond S, the two longest distances and the lowest up to W, of one run.

    Within and beyond S are the demo's (tools/demo_report.py): within, the distances whose
    probe fits in S (``ToyRecipe.short_max_distance``); beyond, those past S.

    Args:
        by_distance: ``{distance (str or int): accuracy in [0, 1]}``.
        short, window: S and W.

    Returns:
        Accuracies in [0, 1]: ``within``, ``beyond``, ``at_<d>`` for the two longest
        distances, ``lowest`` (over every distance).
    """
    from longkd.tools.toy_models import PROBE_LEAD

    acc = {int(d): a for d, a in by_distance.items()}
    within = [a for d, a in acc.items() if d + 2 + PROBE_LEAD <= short]
    beyond = [a for d, a in acc.items() if short < d <= window]
    far = sorted(acc)[-2:]
    return {"within": sum(within) / len(within), "beyond": sum(beyond) / len(beyond),
            **{f"at_{d}": acc[d] for d in far}, "lowest": min(acc.values())}  # fmt: skip


def summarize(runs: list[dict], short: int, window: int) -> list[dict]:
    """Mean, sd and per-seed values of :func:`run_metrics` and the cost, per (level, arm)."""
    from longkd.tools.demo_report import aggregate

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["level"], r["arm"]), []).append(r)
    rows = []
    for (level, arm), group in groups.items():
        metrics = [run_metrics(r["by_distance"], short, window) for r in group]
        row = {"level": level, "arm": arm, "seeds": [r["seed"] for r in group]}
        for name in metrics[0]:
            row[name] = aggregate([m[name] for m in metrics])
        for name in ("train_cpu_s", "train_wall_s"):
            row[name] = aggregate([r[name] for r in group])
        rows.append(row)
    return rows


def describe(result: dict, short: int, window: int) -> str:
    """One line: the run's within/beyond S, the two longest distances, and its cost."""
    m = run_metrics(result["by_distance"], short, window)
    far = " ".join(f"{k[3:]}: {100 * v:.1f}" for k, v in m.items() if k.startswith("at_"))
    return (f"within S {100 * m['within']:.1f}, beyond S {100 * m['beyond']:.1f}, {far}; "
            f"train {result['train_cpu_s']:.0f} CPU s, {result['train_wall_s']:.0f} s wall")  # fmt: skip


def markdown(study: dict, short: int, window: int) -> str:
    """The study of one factor as a markdown table (mean ± sd over seeds; %, CPU seconds)."""
    rows = study["summary"]
    far = [k for k in rows[0] if k.startswith("at_")]

    def pct(a: dict) -> str:
        return f"{100 * a['mean']:.1f} ± {100 * a['sd']:.1f}" if a["n"] > 1 else f"{100 * a['mean']:.1f}"

    head = ["level", "arm", "seeds", "within S", "beyond S", *[f"at {k[3:]}" for k in far],
            f"at {far[-1][3:]} per seed", "lowest (any seed)", "train CPU s", "train wall s"]  # fmt: skip
    lines = [f"Study of `{study['factor']}` (S = {short}, W = {window}; %, mean ± sd over seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        cells = [str(r["level"]), r["arm"], str(len(r["seeds"])), pct(r["within"]), pct(r["beyond"]),
                 *[pct(r[k]) for k in far], ", ".join(f"{100 * v:.1f}" for v in r[far[-1]]["values"]),
                 f"{100 * r['lowest']['min']:.1f}", f"{r['train_cpu_s']['mean']:.0f}",
                 f"{r['train_wall_s']['mean']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m longkd.tools.demo_study",
        description="Vary one setting of the demo's training recipe over levels; train and evaluate each "
        "level per seed and arm with longkd train / longkd eval --task toy; write OUT/FACTOR.json and "
        "OUT/FACTOR.md (retrieval within and beyond S, at the longest distances, CPU seconds per run).",
    )
    p.add_argument("--factor", help=f"the setting to vary: {', '.join(FACTORS)}")
    p.add_argument("--levels", nargs="+", metavar="LEVEL",
                   help="its values (comma- or space-separated; 'none' for the default of phases, "
                        "temperature, doc_tokens). phases: WINDOW:SHARE,... per level, "
                        "space-separated")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="change the base recipe (repeatable), e.g. --set steps=480 --set mode=renorm")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default: 0,1)")
    p.add_argument("--arms", default="kd-phasewise", help=f"students per level: {', '.join(ARMS)} "
                   "(comma-separated; default: kd-phasewise)")  # fmt: skip
    p.add_argument("--out", default="study-out",
                   help="study folder, shared across factors (default: study-out)")
    p.add_argument("--models-dir", default="study-out/models", help="pre-trained toy models (default: "
                   "study-out/models; point it at the demo's to reuse them)")  # fmt: skip
    p.add_argument("--toy-recipe", default="w256", help="toy models: w256 (default) or w512")
    p.add_argument("--per-distance", type=int, default=64, help="probes per distance (default: 64)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (default: 1)")
    p.add_argument("--name", help="write OUT/NAME.json and OUT/NAME.md (default: the factor)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # a child process: run this job file
    return p


def split_levels(factor: str, levels: list[str]) -> list[str]:
    """Levels as given: space-separated, and comma-separated too unless the factor is ``phases``."""
    if factor == "phases":
        return levels
    return [x for part in levels for x in part.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.job:
        run_job(Path(args.job))
        return 0
    try:
        if not args.factor or not args.levels:
            raise LongkdError("give --factor and --levels (see --help)")
        base = StudyRecipe()
        for item in args.set:
            name, _, value = item.partition("=")
            base = with_setting(base, name, value)
        seeds = [int(s) for s in args.seeds.split(",") if s]
        levels = split_levels(args.factor, args.levels)
        study = run_study(Path(args.out), Path(args.models_dir), args.factor, levels, seeds,
                          args.arms.split(","), base, toy_recipe=args.toy_recipe,
                          per_distance=args.per_distance, jobs=args.jobs, name=args.name)  # fmt: skip
    except LongkdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from longkd.tools.toy_models import RECIPES

    toy = RECIPES[args.toy_recipe]
    print(markdown(study, toy.short, toy.window), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
