"""``longkd demo``: the project's central claim, end to end, on a toy world that fits a CPU.

The claim (README.md, docs/demo.md): a student trained only on short documents packed into a
long window, with forward-KL distillation from a long-context teacher, gains retrieval beyond
its own context, because the teacher's logits carry long-range positional information that
next-token labels on the same packed data do not. This module runs the real pipeline to
test that at toy scale, and every number it reports comes from an evaluation it ran:

1. get-or-train a tiny long-context teacher (window W) and a short-context student (context
   S) from ``tools/toy_models.py``, and measure both with ``longkd eval --task toy``: the
   teacher must retrieve at every distance up to W, the student only within S;
2. write short toy documents (<= S tokens) and build caches with ``longkd cache build``:
   the main cache (packed into W-token windows, continuous positions), a control cache with
   ``--position-mode reset`` (positions restart, and attention is cut, at every packed
   sample, so the teacher's long-range channel is gone) and a held-out cache of other
   documents for the KL evaluation;
3. ``longkd train`` from the main cache, three students in one run: KD with phase-wise RoPE
   scaling, KD with static scaling, cross-entropy only on the same windows and schedule;
   a second run distils the control from the reset cache; the untrained student is kept;
4. ``longkd eval --task toy`` (retrieval by distance) and ``--task cache-kl`` (KL to the
   teacher by position on the held-out cache) for every student, ``longkd cache inspect``;
5. OUT/results.md, OUT/results.json, OUT/retrieval.png, read back from the eval outputs.

Stages 2-4 repeat per seed (new documents, new training order, new probes), so the headline
comparison carries a spread. The subcommands run in this process through
:func:`longkd.cli.main` (one import of torch and transformers instead of dozens).

    longkd demo --quick                    # 1 seed, W = 256 (timings in docs/demo.md)
    longkd demo --out demo-out             # the full demo: 3 seeds, more steps and documents

Its command line (flags, presets applied) is ``register_demo`` in tools/cli.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from longkd.errors import LongkdError
from longkd.tools.demo_report import accuracy_by_distance

log = logging.getLogger(__name__)

MARKER = ".longkd-demo"  # names a directory as the demo's own, so a rerun may clear it
STAGES = ("data", "caches", "train", "eval")  # sub-folders of OUT rebuilt on every run

# The demo is bitwise repeatable on one machine, but each trained model is a chaotic function
# of every rounding: a kernel that sums in another order (another instruction set, another
# MKL code path, another thread count) gives other models and other numbers, about as far
# apart as another seed (docs/demo.md, "How much the numbers move"). These settings put every
# x86 CPU with AVX2 on the same code paths (ATen's vectorised kernels, MKL's and oneDNN's
# matmuls), so that a machine with AVX-512 computes what one with AVX2 does. They act only
# when set before torch is imported (``longkd demo`` does so first); a value already in the
# environment wins.
CPU_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass
class DemoSettings:
    """Sizes of one demo run (``--quick`` and full presets in :data:`PRESETS`, flags override).

    Attributes:
        recipe: ``tools/toy_models.RECIPES`` key of the teacher/student recipe.
        seeds: repetitions of data, training and probes for the headline spread.
        steps: optimizer steps of every trained student.
        batch_size: windows per step.
        lr: peak learning rate of the students.
        train_docs: short documents per seed in the main (and reset) cache.
        heldout_docs: short documents in the held-out cache (other documents, never trained on).
        top_k: teacher entries stored per position.
        per_distance: retrieval probes per distance.
        encoding: the caches' column encoding (``longkd cache build --encoding``): plain, so
            that the tables in README.md and docs/demo.md stay those of a plain-cache run
            (a compact run is reported beside them in docs/demo.md), or compact.
    """

    recipe: str = "w256"
    seeds: int = 1
    steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3
    train_docs: int = 1200
    heldout_docs: int = 160
    top_k: int = 32
    per_distance: int = 64
    encoding: str = "plain"


PRESETS = {
    "quick": DemoSettings(),
    # Both presets use the W = 256 models: the W = 512 recipe's teacher alone pre-trains for
    # about 4 minutes and misses its precondition at the window's edge (docs/toy.md);
    # --recipe w512 selects it.
    "full": DemoSettings(seeds=3, steps=240, train_docs=3000, heldout_docs=240),
}


@dataclass
class Demo:
    """Paths and the running record of one demo invocation."""

    out: Path
    models_dir: Path
    device: str
    settings: DemoSettings
    checks: bool = True
    timings: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)


# ----------------------------------------------------------------------------- CPU numerics


def pin_cpu_numerics() -> None:
    """Put :data:`CPU_NUMERICS` into the environment (x86 only; values already set win).

    Call before torch is imported: ATen and MKL read these once, at their first use. The
    child process that pre-trains the student inherits them.
    """
    if platform.machine().lower() in ("x86_64", "amd64"):
        for name, value in CPU_NUMERICS.items():
            os.environ.setdefault(name, value)


def numerics() -> dict:
    """What decides the demo's numbers bit for bit: library versions, CPU code paths, threads.

    Returns:
        ``torch``, ``transformers``, ``numpy`` versions, ``cpu_capability`` (the ATen kernels
        in use), ``threads`` (torch's intra-op threads), ``machine``, and the value of each
        :data:`CPU_NUMERICS` variable (None when unset).
    """
    import numpy
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **{name: os.environ.get(name) for name in CPU_NUMERICS},
    }


# ----------------------------------------------------------------------------- running commands


def run_cli(argv: list[str], log_file: Path) -> str:
    """Run one ``longkd`` subcommand in this process; its output goes to ``log_file``.

    Args:
        argv: the arguments after ``longkd``.
        log_file: stdout and stderr of the command are appended here.

    Returns:
        What the command printed to stdout.

    Raises:
        LongkdError: the command exited non-zero (its last error line is quoted).
    """
    from longkd.cli import main

    log_file.parent.mkdir(parents=True, exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    # The subcommands' log records go to the log file, not the terminal, so the demo's own
    # stage lines stay readable; with a handler in place main()'s basicConfig is a no-op.
    root = logging.getLogger()
    saved, handler = root.handlers[:], logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers = [handler]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        root.handlers = saved
        handler.close()
    with open(log_file, "a") as f:
        f.write(f"$ longkd {' '.join(argv)}\n{out.getvalue()}{err.getvalue()}\n")
    if rc != 0:
        last = [line for line in err.getvalue().splitlines() if line.strip()]
        raise LongkdError(
            f"`longkd {' '.join(argv[:3])} ...` failed: {last[-1] if last else f'exit {rc}'} "
            f"(full output in {log_file})"
        )
    return out.getvalue()


def _stage(demo: Demo, name: str, message: str):
    """Print which stage runs and time it into ``demo.timings[name]``."""

    @contextlib.contextmanager
    def timer():
        print(f"[demo] {message}", flush=True)
        t0 = time.perf_counter()
        yield
        demo.timings[name] = round(demo.timings.get(name, 0.0) + time.perf_counter() - t0, 1)

    return timer()


# ----------------------------------------------------------------------------- stage 1: models


def _toy_eval(demo: Demo, model: str | Path, name: str, seed: int) -> dict:
    """``longkd eval MODEL --task toy`` at the recipe's distances; returns its results.json."""
    from longkd.tools.toy_models import RECIPES

    recipe = RECIPES[demo.settings.recipe]
    out = demo.path("eval", f"s{seed}", name, "toy")
    argv = ["eval", str(model), "--task", "toy", "--out", str(out), "--device", demo.device,
            "--distances", ",".join(map(str, recipe.distances())), "--per-distance",
            str(demo.settings.per_distance), "--seed", str(seed), "--toy-world",
            str(demo.path("toy_world.json"))]  # fmt: skip
    run_cli(argv, demo.path("logs", "eval.log"))
    return json.loads((out / "results.json").read_text())


def stage_models(demo: Demo) -> tuple[Path, Path]:
    """Get or train the teacher and student, then measure and check both (stage 1)."""
    from longkd.tools.toy_models import (
        KINDS,
        RECIPES,
        check_precondition,
        get_or_train_both,
        is_trained,
        load_metrics,
    )

    recipe = RECIPES[demo.settings.recipe]
    demo.path("toy_world.json").write_text(json.dumps(recipe.world.to_dict()) + "\n")
    cached = {k: is_trained(k, recipe, demo.models_dir) for k in KINDS}
    verb = "loading" if all(cached.values()) else "training (cached for later runs)"
    with _stage(
        demo, "pretrain", f"1/5 {verb} the toy teacher (context {recipe.window}) and student "
        f"(context {recipe.short}) in {demo.models_dir}"
    ):
        dirs = get_or_train_both(recipe, demo.models_dir, progress=sys.stderr.isatty(), device=demo.device)
    for kind in KINDS:
        metrics = load_metrics(dirs[kind])
        demo.record.setdefault("pretrain", {})[kind] = {
            "dir": str(dirs[kind]),
            "cached": cached[kind],
            "steps": metrics["steps"],
            "train_seconds": metrics["train_seconds"],
            "retrieval_at_pretraining": metrics["retrieval"],
        }
    with _stage(demo, "eval", "1/5 measuring teacher and student retrieval (longkd eval --task toy)"):
        teacher = accuracy_by_distance(_toy_eval(demo, dirs["teacher"], "teacher", 0))
        student = accuracy_by_distance(_toy_eval(demo, dirs["student"], "untrained", 0))
    try:
        check_precondition("teacher", recipe, teacher)
        check_precondition("student", recipe, student)
    except LongkdError as err:
        if demo.checks:
            raise
        # --no-checks: go on (to exercise the pipeline), but say so loudly and in the results.
        print(f"[demo] WARNING: precondition failed, continuing (--no-checks): {err}", flush=True)
        demo.record["precondition_error"] = str(err)
    return dirs["teacher"], dirs["student"]


# ----------------------------------------------------------------------------- stage 2: caches


def _build(demo: Demo, teacher: Path, data: Path, out: Path, mode: str, seed: int) -> None:
    from longkd.tools.toy_models import RECIPES

    recipe = RECIPES[demo.settings.recipe]
    # --no-eos: the teacher never saw an EOS token; packed documents then read like one of its
    # long documents (continuous mode), so its logits are in distribution.
    argv = ["cache", "build", "--teacher", str(teacher), "--data", str(data), "--window", str(recipe.window),
            "--position-mode", mode, "--no-eos", "--top-k", str(demo.settings.top_k), "--batch-size", "8",
            "--device", demo.device, "--seed", str(seed), "--encoding", demo.settings.encoding,
            "--out", str(out)]  # fmt: skip
    run_cli(argv, demo.path("logs", "cache.log"))


def stage_caches(demo: Demo, teacher: Path, seed: int) -> dict[str, Path]:
    """Write short documents and build the main, reset-positions and held-out caches (stage 2)."""
    from longkd.tools.toy_models import RECIPES
    from longkd.tools.toy_world import save_documents, short_documents

    recipe, st = RECIPES[demo.settings.recipe], demo.settings
    caches = {
        "main": demo.path("caches", f"main-s{seed}"),
        "reset": demo.path("caches", f"reset-s{seed}"),
        "heldout": demo.path("caches", "heldout"),
    }
    with _stage(
        demo, "data", f"2/5 seed {seed}: writing {st.train_docs} short documents (<= S={recipe.short} tokens)"
    ):
        train = save_documents(
            short_documents(recipe.world, st.train_docs, recipe.short, seed=1000 + seed),
            demo.path("data", f"train-s{seed}.jsonl"),
        )
        held = demo.path("data", "heldout.jsonl")
        if not held.exists():  # other documents (another seed range), shared by every seed
            save_documents(short_documents(recipe.world, st.heldout_docs, recipe.short, seed=999_999), held)
    with _stage(
        demo,
        "caches",
        f"2/5 seed {seed}: longkd cache build: main (continuous positions), "
        f"control (--position-mode reset), held-out; W={recipe.window}",
    ):
        _build(demo, teacher, train, caches["main"], "continuous", seed)
        _build(demo, teacher, train, caches["reset"], "reset", seed)
        if not (caches["heldout"] / "manifest.json").is_file():
            _build(demo, teacher, held, caches["heldout"], "continuous", 0)
    return caches


# ----------------------------------------------------------------------------- stage 3: training


def train_config(demo: Demo, student: Path, cache: Path, out: Path, names: list[str], seed: int) -> dict:
    """The ``longkd train`` config for the named students (see ``demo_report.DESCRIPTIONS``).

    Every student shares the schedule's windows S, 2S, ... W (prefixes of the cache window),
    each phase a fair share of the steps; ``phasewise`` scales RoPE by window / S in each
    phase, ``static`` by W / S from step 0 (yarn, through transformers' rope init).
    """
    from longkd.tools.toy_models import RECIPES

    recipe, st = RECIPES[demo.settings.recipe], demo.settings
    windows = [recipe.short]
    while windows[-1] * 2 < recipe.window:
        windows.append(windows[-1] * 2)
    windows.append(recipe.window)
    until = [round(st.steps * (i + 1) / len(windows)) for i in range(len(windows))]

    def schedule(preset: str) -> dict:
        return dict(preset=preset, windows=windows, until=until, rope_type="yarn",
                    original_window=recipe.short)  # fmt: skip

    optimizer = dict(lr=st.lr, warmup_steps=max(1, st.steps // 20), lr_schedule="cosine", min_lr_ratio=0.1)
    kd = {"mode": "bucket", "kd_weight": 1.0, "ce_weight": 0.0}
    specs = {
        "kd-phasewise": (schedule("phasewise"), kd),
        "kd-static": (schedule("static"), kd),
        "ce-phasewise": (schedule("phasewise"), {"mode": "bucket", "kd_weight": 0.0, "ce_weight": 1.0}),
        "kd-reset-control": (schedule("phasewise"), kd),
    }
    students = [dict(name=n, init=str(student), schedule=specs[n][0], loss=specs[n][1], optimizer=optimizer)
                for n in names]  # fmt: skip
    return dict(cache=str(cache), out=str(out), seed=seed, steps=st.steps, batch_size=st.batch_size,
                log_every=10, checkpoint_every=st.steps, keep_checkpoints=1, device=demo.device,
                loader={"num_workers": 0, "shuffle": True}, students=students)  # fmt: skip


def _latest_checkpoint(run_out: Path, name: str) -> Path:
    root = run_out / name / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        raise LongkdError(f"longkd train wrote no checkpoint for {name} under {root}")
    return root / latest.read_text().strip()


def stage_train(demo: Demo, student: Path, caches: dict[str, Path], seed: int) -> dict[str, Path]:
    """One ``longkd train`` run of three students on the main cache, one of the control (stage 3)."""
    import yaml

    st = demo.settings
    checkpoints = {}
    runs = (("main", ["kd-phasewise", "kd-static", "ce-phasewise"]), ("reset", ["kd-reset-control"]))
    for cache, names in runs:
        run_out = demo.path("train", f"s{seed}", cache)
        cfg = train_config(demo, student, caches[cache], run_out, names, seed)
        path = demo.path("train", f"s{seed}", f"{cache}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        with _stage(
            demo,
            "train",
            f"3/5 seed {seed}: longkd train {path.name}: {', '.join(names)} "
            f"({st.steps} steps x {st.batch_size} windows)",
        ):
            run_cli(["train", str(path), "--no-progress"], demo.path("logs", "train.log"))
        for n in names:
            checkpoints[n] = _latest_checkpoint(run_out, n)
    return checkpoints


# ----------------------------------------------------------------------------- stage 4: evaluation


def stage_eval(demo: Demo, models: dict[str, Path], caches: dict[str, Path], seed: int) -> dict:
    """Toy retrieval and held-out KL of every model, read back from the eval outputs (stage 4)."""
    from longkd.tools.toy_models import RECIPES

    recipe = RECIPES[demo.settings.recipe]
    buckets = max(2, min(8, recipe.window // recipe.short))  # a bucket edge falls on S
    held = caches["heldout"]
    windows = _num_windows(held)
    out: dict = {}
    with _stage(
        demo, "eval", f"4/5 seed {seed}: longkd eval --task toy and --task cache-kl for {len(models)} models"
    ):
        for name, path in models.items():
            toy_dir = demo.path("eval", f"s{seed}", name, "toy")
            done = (toy_dir / "results.json").is_file()  # stage 1 measured seed 0 already
            toy = (
                json.loads((toy_dir / "results.json").read_text())
                if done
                else _toy_eval(demo, path, name, seed)
            )
            entry = {
                "model": str(path),
                "toy": accuracy_by_distance(toy),
                "toy_results": str(toy_dir / "results.json"),
            }
            if name != "teacher":
                kl_dir = demo.path("eval", f"s{seed}", name, "kl")
                argv = ["eval", str(path), "--task", "cache-kl", "--cache", str(held), "--windows",
                        str(windows), "--buckets", str(buckets), "--device", demo.device,
                        "--out", str(kl_dir)]  # fmt: skip
                run_cli(argv, demo.path("logs", "eval.log"))
                entry["kl"] = json.loads((kl_dir / "results.json").read_text())
                entry["kl_results"] = str(kl_dir / "results.json")
            out[name] = entry
    return out


def _num_windows(cache: Path) -> int:
    from longkd.cache.reader import CacheReader

    reader = CacheReader(str(cache))
    try:
        return reader.num_windows
    finally:
        reader.close()


def stage_inspect(demo: Demo, caches: dict[str, Path]) -> dict:
    """``longkd cache inspect --json`` of the main and the reset-positions caches."""
    found = {}
    for name in ("main", "reset"):
        text = run_cli(
            ["cache", "inspect", str(caches[name]), "--json", "--windows", "32"],
            demo.path("logs", "inspect.log"),
        )
        report = json.loads(text)
        demo.path(f"inspect-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        found[name] = report
    return found


# ----------------------------------------------------------------------------- the whole run


def prepare_out(out: Path) -> None:
    """Create OUT, or clear the stage folders of a previous demo run there (models are kept).

    Raises:
        LongkdError: OUT exists, is not empty and was not made by the demo.
    """
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise LongkdError(
            f"--out {out} exists and was not made by longkd demo; choose an empty or new directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by longkd demo; the stage folders here are rebuilt on every run\n")
    for name in (*STAGES, "logs"):
        shutil.rmtree(out / name, ignore_errors=True)


def run_demo(
    out: str | Path,
    *,
    settings: DemoSettings,
    device: str = "cpu",
    models_dir: str | Path | None = None,
    checks: bool = True,
) -> dict:
    """Run every stage and write OUT/results.{md,json} and OUT/retrieval.png.

    Args:
        out: the output directory (created; its stage folders are rebuilt).
        settings: sizes (see :data:`PRESETS`).
        device: ``cpu`` or ``cuda`` for every command.
        models_dir: where the pre-trained teacher and student are kept (default OUT/models).
        checks: stop when the teacher or student misses its precondition; False goes on and
            marks the results (for exercising the pipeline with weak models).

    Returns:
        The results (as written to OUT/results.json).

    Raises:
        LongkdError: a precondition that fails (teacher or student) or a failed subcommand.
    """
    from transformers.utils import logging as hf_logging

    from longkd.tools.toy_models import RECIPES

    if settings.recipe not in RECIPES:
        raise LongkdError(f"demo recipe {settings.recipe!r} is unknown; use one of {', '.join(RECIPES)}")
    if settings.seeds < 1 or settings.steps < 1:
        raise LongkdError(
            f"--seeds and --steps must be at least 1, got {settings.seeds} and {settings.steps}"
        )
    out = Path(out)
    prepare_out(out)
    demo = Demo(out=out, models_dir=Path(models_dir) if models_dir else out / "models", device=device,
                settings=settings, checks=checks)  # fmt: skip
    # The demo prints its own stage lines; transformers' per-save "Writing model shards" bars
    # would interleave with them (the child process that trains the student turns its own off).
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_stages(demo)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run_stages(demo: Demo) -> dict:
    from longkd.tools import demo_report
    from longkd.tools.toy_models import RECIPES

    settings, device, out = demo.settings, demo.device, demo.out
    t0 = time.perf_counter()
    demo.record["numerics"] = numerics()
    teacher, student = stage_models(demo)
    evals = {}
    for seed in range(settings.seeds):
        caches = stage_caches(demo, teacher, seed)
        if seed == 0:
            demo.record["inspect"] = stage_inspect(demo, caches)
        checkpoints = stage_train(demo, student, caches, seed)
        models = {"teacher": teacher, **checkpoints, "untrained": student}
        evals[seed] = stage_eval(demo, models, caches, seed)
    demo.timings["total"] = round(time.perf_counter() - t0, 1)
    print("[demo] 5/5 writing results.md, results.json, retrieval.png", flush=True)
    recipe = RECIPES[settings.recipe]
    results = demo_report.summarize(
        evals,
        recipe=recipe,
        settings=asdict(settings),
        timings=demo.timings,
        record=demo.record,
        device=device,
    )
    demo_report.write(results, out)
    print(demo_report.markdown(results), flush=True)
    check_claims(results, out, demo.checks)
    return results


def check_claims(results: dict, out: Path, checks: bool = True) -> None:
    """Stop when a claim of ``demo_report.CLAIMS`` failed in some seed (results are written).

    Args:
        results: the demo's results (``results["claims"]`` from ``demo_report.summarize``).
        out: where they were written (named in the message).
        checks: False (``--no-checks``) only prints the failures.

    Raises:
        LongkdError: naming each failed claim, its lowest value and its bound.
    """
    failed = [
        f"{c['claim']} ({c['measures']}: {100 * min(c['per_seed'].values()):.1f} < {100 * c['bound']:.0f})"
        for c in results["claims"]
        if not c["ok"]
    ]
    if not failed:
        return
    message = f"the demo's claims failed: {'; '.join(failed)} (every number in {out / 'results.md'})"
    if checks:
        raise LongkdError(message)
    print(f"[demo] WARNING: {message}", flush=True)
