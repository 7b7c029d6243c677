"""The training loop: one window stream decoded once, fed to every student in turn.

Reading and decoding the cache is the same for every student, so a run opens one
``WindowStream`` and hands each batch to all students. Each student cuts the batch to its
active phase's window (``WindowBatch.prefix``), puts the phase's rope in force when the phase
starts, and takes a step of AdamW on

    loss = kd_weight * sparse_kl(student || teacher top-k) + ce_weight * cross_entropy

over the batch's loss mask. Students share nothing else: each has its own optimizer, LR
schedule, phase state and RNG state (trainer/students.py), so a student trained with others
ends bitwise equal (on CPU) to the same student trained alone.

    from longkd.trainer.config import load_config
    from longkd.trainer.loop import train
    result = train(load_config("examples/train.yaml"))

``--resume`` continues exactly the run that was started: the settings that define it (data,
students, losses, optimizers, schedules, steps, batch) are saved with every committed step
and a resumed run that differs in one of them is refused, naming it. Only the settings in
:data:`RESUME_MAY_CHANGE` may differ (a line says so): they change where the run goes, how
fast, and how often it saves and logs, never what is trained.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longkd.devices import resolve_device
from longkd.errors import LongkdError, one_line
from longkd.fileio import check_out_dir, write_text_atomic
from longkd.kernels.temperature import Temperatures
from longkd.trainer import checkpoint as ckpt
from longkd.trainer.config import RunConfig, StudentConfig, to_dict
from longkd.trainer.losses import temperatures_in_force
from longkd.trainer.student_init import build_model, load_tokenizer
from longkd.trainer.students import StepMetrics, Student, train_step

log = logging.getLogger(__name__)

# Run settings a resumed run may change, as dotted keys of run_settings (``*`` stands for a
# student's name). They decide where the run goes and how it is computed and recorded, not
# what is trained: the device, the process layout and the loss kernel may change the
# rounding, nothing else.
RESUME_MAY_CHANGE = (
    "device", "distributed", "log_every", "checkpoint_every", "keep_checkpoints",
    "loader.num_workers", "loader.pin_memory", "loader.prefetch_factor",
    "students.*.tokenizer", "students.*.compile", "students.*.activation_checkpointing",
    "students.*.loss.impl", "students.*.loss.chunk_size", "students.*.loss.fused",
)  # fmt: skip


# ----------------------------------------------------------------------------- setup


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA under ``auto``, none (fp32) on CPU; ``bf16``/``fp32`` forced."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _loss_mode(s: StudentConfig, selection: dict, where: str) -> str:
    sampled = selection.get("mode") == "sampled"
    mode = s.loss.mode or ("sampled" if sampled else "bucket")
    if mode == "sampled" and not sampled:
        raise LongkdError(
            f"{where}.loss.mode: 'sampled' needs a sampled cache, but this one holds "
            f"{selection.get('mode')} rows; use bucket or renorm"
        )
    return mode


@dataclass
class Run:
    """Everything a run holds between setup and the last step."""

    cfg: RunConfig
    out: Path
    device: torch.device
    stream: object
    students: list[Student]
    total_steps: int
    modes: dict[str, str]
    temperatures: dict[str, float]
    amp: torch.dtype | None
    settings: dict = field(default_factory=dict)  # run_settings: saved with every committed step
    step: int = 0
    writers: dict = field(default_factory=dict)
    parallel: object = None  # trainer/distributed.py Parallel under torchrun, else None

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, metrics and TensorBoard (rank 0)."""
        return self.parallel is None or self.parallel.is_main


def prepare(cfg: RunConfig, *, resume: bool = False) -> Run:
    """Open the cache, build and check every student, and restore a checkpoint on ``resume``.

    Every check that can fail runs before the first step, and before anything is written: the
    run directory can be created; the cache opens; each student's tokenizer and vocabulary fit
    the cache (``check_student_compatible``); its schedule is valid, its rope types are
    accepted by its architecture and its windows fit in the cache's; on ``resume``, the run's
    settings and every checkpoint match the config.

    Raises:
        LongkdError: the first problem found, on one line.
    """
    from longkd.trainer.distributed import from_config

    out = Path(cfg.out)
    check_out_dir(out, "out")
    names = [s.name for s in cfg.students]
    if resume:
        step = ckpt.resume_step(out, names)
    else:
        _refuse_existing_run(out)
        step = 0
    parallel = from_config(cfg.distributed, cfg.device)  # None in a single process
    device = parallel.device if parallel is not None else torch.device(resolve_device(cfg.device, check=True))
    stream = _make_stream(cfg, parallel)  # opens every cache and checks they agree, before any model is built
    reader = stream.readers[0]
    students, modes, temps = [], {}, {}
    for i, s in enumerate(cfg.students):
        student, modes[s.name], temps[s.name] = _make_student(cfg, i, reader, device, out)
        students.append(student)
    run = Run(
        cfg=cfg,
        out=out,
        device=device,
        stream=stream,
        students=students,
        total_steps=_total_steps(cfg, students),
        modes=modes,
        temperatures=temps,
        amp=autocast_dtype(cfg.precision, device),
        settings=run_settings(cfg, stream.readers),
        parallel=parallel,
    )
    if resume:
        _restore(run, step)
    if parallel is not None:
        # wrapped after the checkpoint is loaded into the plain model: resume is the same for all modes
        for s in students:
            parallel.wrap(s)
            s.parallel = parallel
    return run


def _refuse_existing_run(out: Path) -> None:
    """A fresh run must not mix its checkpoints into an earlier run's: refuse a directory with a
    committed step (what a kill before the first commit left is cleared when the run starts)."""
    if ckpt.run_state_steps(out) or any((out / "run_state").glob("step-*.pt")):
        raise LongkdError(
            f"out: {out} already holds checkpoints; pass --resume to continue it or choose another --out"
        )


def run_settings(cfg: RunConfig, readers) -> dict:
    """What the run is, as flat dotted keys: every config setting (students by name) but the
    run directory, and the caches by content (teacher weights, data fingerprint, window,
    selection, windows) rather than by path, so a run directory or a cache may move but a cache
    may not change.

    Returns:
        ``{"steps": 20, "students.a.optimizer.lr": 0.003, "cache": [...], ...}`` (JSON values).
    """
    data = json.loads(json.dumps(to_dict(cfg), default=str))
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    for student in data.pop("students"):
        walk(f"students.{student.pop('name')}", student)
    data.pop("cache")
    data.pop("out")  # the run directory itself, which may be moved or copied
    walk("", data)
    flat["cache"] = [
        {
            "teacher": r.manifest.get("teacher", {}).get("weights_sha256"),
            "data": r.manifest.get("dataset", {}).get("fingerprint"),
            "window": r.window,
            "selection": r.selection,
            "temperature": r.temperature,
            "windows": r.num_windows,
        }
        for r in readers
    ]
    return json.loads(json.dumps(flat))


def _may_change(key: str) -> bool:
    parts = key.split(".")
    for allowed in RESUME_MAY_CHANGE:
        pattern = allowed.split(".")
        if len(pattern) == len(parts) and all(a in ("*", b) for a, b in zip(pattern, parts)):
            return True
    return False


def _check_settings(saved: dict, now: dict, step: int) -> None:
    """Refuse a resumed run whose settings differ from the run's, naming the first setting;
    say which allowed settings changed, and which students were dropped.

    Raises:
        LongkdError: a setting outside :data:`RESUME_MAY_CHANGE` differs.
    """
    students_now = {k.split(".")[1] for k in now if k.startswith("students.")}
    dropped = sorted({k.split(".")[1] for k in saved if k.startswith("students.")} - students_now)
    missing = object()
    for key in sorted(set(saved) | set(now)):
        if key.startswith("students.") and key.split(".")[1] in dropped:
            continue
        before, after = saved.get(key, missing), now.get(key, missing)
        if before == after:
            continue
        shown = [json.dumps(v) if v is not missing else "(not set)" for v in (before, after)]
        if key == "cache":
            raise LongkdError(
                "--resume: the cache differs from the one the run started with (teacher, data, window, "
                "selection or size); resume with that cache or start a new run with another --out"
            )
        if not _may_change(key):
            raise LongkdError(
                f"--resume: {key} was {shown[0]} at step {step} and is {shown[1]} now; a resumed run "
                f"continues the run it was, so set {key} back (or start a new run with another --out)"
            )
        log.warning("--resume: %s changed from %s to %s (it does not change what is trained)", key, *shown)
    for name in dropped:
        log.warning(
            "--resume: student %r is no longer in the config; its checkpoints stay at step %d", name, step
        )


def _check_shapes(student: Student, weights: dict, step: int) -> None:
    """Refuse a checkpoint whose tensors do not fit the model the config builds, naming one."""
    expected = student.model.state_dict()
    for key, value in weights.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            raise LongkdError(
                f"--resume: student {student.name!r}'s checkpoint at step {step} holds {key} of shape "
                f"{list(value.shape)}, the model its init builds has {list(expected[key].shape)}; "
                "restore the student's init or start a new run with another --out"
            )


def _make_student(
    cfg: RunConfig, index: int, reader, device: torch.device, out: Path
) -> tuple[Student, str, float]:
    """Build ``cfg.students[index]`` and check it against the cache.

    Returns:
        ``(student, loss_mode, temperature)``.

    Raises:
        LongkdError: a model or tokenizer that does not fit the cache, a bad schedule, or a
            loss mode the cache cannot serve; naming the student.
    """
    from longkd.trainer.rope import build_schedule, check_schedule_against_cache, initial_rope
    from longkd.trainer.stream import check_student_compatible

    s = cfg.students[index]
    where = f"students[{index}] ({s.name})"
    model = build_model(s.init, vocab_size=int(reader.manifest["vocab"]["embedding_size"]))
    tokenizer = load_tokenizer(s)
    try:
        check_student_compatible(reader, model.config, tokenizer)
    except LongkdError as err:
        raise LongkdError(f"{where}: {err}") from err
    spec = s.schedule
    if spec is None:
        if cfg.steps is None:
            raise LongkdError(f"steps: not given and {where} has no schedule to take it from; set steps")
        spec = {"preset": "none", "windows": [reader.window], "until": [cfg.steps]}
    try:
        schedule = build_schedule(spec, base_config=model.config, total_steps=cfg.steps)
        check_schedule_against_cache(schedule, reader.window)
    except LongkdError as err:
        raise LongkdError(f"{where}.schedule: {err}") from err
    mode = _loss_mode(s, reader.selection, where)
    temps = temperatures_in_force(s.loss, mode=mode, cache_temperature=reader.temperature, where=where)
    temperature = temps.student
    student = Student(
        s,
        model=model,
        tokenizer=tokenizer,
        schedule=schedule,
        initial_rope=initial_rope(model.config),
        run_seed=cfg.seed,
        device=device,
        out_dir=out / s.name,
    )
    return student, mode, temperature


def _total_steps(cfg: RunConfig, students: list[Student]) -> int:
    """``cfg.steps``, else the longest schedule's end (every schedule must then count steps)."""
    if cfg.steps is not None:
        return cfg.steps
    ends = []
    for st in students:
        last = st.schedule[-1]
        if last.until_unit != "steps":
            raise LongkdError(f"steps: not given and student {st.name!r}'s schedule counts tokens; set steps")
        ends.append(last.until)
    return max(ends)


def _make_stream(cfg: RunConfig, parallel=None):
    from longkd.trainer.stream import WindowStream

    ld = cfg.loader
    if parallel is not None:
        parallel.check_batch(cfg.batch_size)
    return WindowStream(
        cfg.cache,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        shuffle=ld.shuffle,
        shuffle_buffer=ld.shuffle_buffer,
        num_workers=ld.num_workers,
        pin_memory=ld.pin_memory,
        prefetch_factor=ld.prefetch_factor,
        rank=0 if parallel is None else parallel.rank,
        world=1 if parallel is None else parallel.world,
    )


def _restore(run: Run, step: int) -> None:
    """Load every student's checkpoint at committed ``step``, and the shared reader state.

    Everything is checked (the settings, every file, every tensor's shape) before anything in
    the run directory changes.

    Raises:
        LongkdError: a changed setting, a damaged or mismatched checkpoint, naming it.
    """
    import random

    import numpy as np

    state = ckpt.load_run_state(run.out, step)
    if not isinstance(state["settings"], dict):
        raise LongkdError(
            f"{run.out}/run_state holds no settings for step {step}; the run directory is damaged"
        )
    _check_settings(state["settings"], run.settings, step)
    loaded = []
    for s in run.students:
        path = s.out_dir / "checkpoints" / ckpt.step_name(step)
        weights, optim, saved, reader_state = ckpt.load_student_checkpoint(path)
        if not ckpt.same_state(reader_state, state["reader"]):
            raise LongkdError(
                f"--resume: student {s.name!r}'s checkpoint at step {step} was taken at a different reader "
                "position than the run's; the run directory is inconsistent"
            )
        _check_shapes(s, weights, step)
        loaded.append((s, path, weights, optim, saved))
    run.stream.load_state_dict(state["reader"])
    try:
        for s, path, weights, optim, saved in loaded:
            s.restore_from(path, weights=weights, optimizer_state=optim, trainer_state=saved)
    except (KeyError, ValueError, TypeError, IndexError) as err:  # well-formed files holding the wrong things
        raise LongkdError(
            f"--resume: the checkpoint at step {step} does not fit the run ({one_line(err, 120)}); "
            "the run directory is damaged or from another config"
        ) from err
    random.setstate(state["python_rng"])
    np.random.set_state(state["numpy_rng"])
    run.step = step
    log.info("resumed %s at step %d", run.out, step)


# ----------------------------------------------------------------------------- the run


def _start_writing(run: Run) -> None:
    """The run's first writes: the directory, what killed runs left in it, config.json.

    Raises:
        LongkdError: the run directory cannot be created or written.
    """
    names = [s.name for s in run.students]
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        removed = ckpt.remove_temporaries(run.out, names)
        if run.step:
            ckpt.discard_after(run.out, names, run.step)
        else:
            ckpt.discard_uncommitted(run.out, names)
        for s in run.students:  # a fresh start after a kill before the first commit keeps no line
            ckpt.truncate_metrics(s.out_dir / "metrics.jsonl", run.step)
        write_text_atomic(run.out / "config.json", json.dumps(to_dict(run.cfg), indent=2, default=str) + "\n")
    except OSError as err:
        raise LongkdError(
            f"out: cannot write the run directory {run.out} ({err.strerror or err}); choose a writable --out"
        ) from err
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", len(removed), run.out)


def _open_writers(run: Run) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for s in run.students:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(s.out_dir / "metrics.jsonl", "a")
        tb = SummaryWriter(log_dir=str(s.out_dir / "tb"), purge_step=run.step + 1 if run.step else None)
        run.writers[s.name] = (metrics, tb)


def _log(run: Run, s: Student, m: StepMetrics) -> None:
    metrics, tb = run.writers[s.name]
    metrics.write(json.dumps(m.to_dict()) + "\n")
    metrics.flush()
    for key in ("loss", "kl", "ce", "lr", "grad_norm", "tokens_per_s", "window"):
        tb.add_scalar(f"train/{key}", getattr(m, key), m.step)


def save_checkpoint(run: Run) -> None:
    """Every student's checkpoint at the current step, then the run state that commits it.

    Under torchrun every rank calls this (FSDP gathers full states) and rank 0 writes.
    """
    reader_state = run.stream.state_dict()
    for s in run.students:
        model_state, optimizer_state = run.parallel.full_states(s) if run.parallel else (None, None)
        if not run.is_main:
            continue
        ckpt.save_student_checkpoint(
            s.out_dir / "checkpoints",
            run.step,
            model=s.model,
            tokenizer=s.tokenizer,
            optimizer=s.optimizer,
            counters=s.counters(),
            rng=s.rng_state(),
            reader_state=reader_state,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )
    if run.is_main:
        names = [s.name for s in run.students]
        ckpt.save_run_state(run.out, run.step, reader_state, names, run.settings)
        ckpt.prune(run.out, names, run.cfg.keep_checkpoints)  # only once the new step is committed
    if run.parallel is not None:
        run.parallel.group.barrier()  # the step is committed before any rank goes on


@dataclass
class RunResult:
    """What :func:`train` returns: the trained students (models in memory) and a summary."""

    out: Path
    steps: int
    seconds: float
    students: list[Student]

    def summary(self) -> list[dict]:
        """One row per student: steps, tokens, last loss / KL / CE, tokens per second, checkpoint."""
        rows = []
        for s in self.students:
            m = s.last
            latest = ckpt.checkpoint_steps(s.out_dir / "checkpoints")
            rows.append(
                {
                    "student": s.name,
                    "steps": s.step,
                    "tokens": s.tokens,
                    "loss": None if m is None else m.loss,
                    "kl": None if m is None else m.kl,
                    "ce": None if m is None else m.ce,
                    "tokens_per_s": s.session_tokens_per_s,
                    "checkpoint": str(s.out_dir / "checkpoints" / ckpt.step_name(latest[-1]))
                    if latest
                    else None,
                }
            )
        return rows


def run_loop(run: Run, *, progress: bool | None = None, stop_after: int | None = None) -> RunResult:
    """Train every student of a prepared run to ``run.total_steps`` (or ``stop_after``).

    Args:
        run: from :func:`prepare`.
        progress: show a tqdm bar (None: only on a terminal).
        stop_after: stop (with a checkpoint) after this global step; for tests of resume.

    Returns:
        The :class:`RunResult`.

    Raises:
        LongkdError: a non-finite loss; checkpoints already written are kept.
    """
    from tqdm.auto import tqdm

    cfg = run.cfg
    if run.is_main:
        _start_writing(run)
        _open_writers(run)
        for s in run.students:  # the temperatures in force, one line per student
            temps = Temperatures(run.stream.temperature, run.temperatures[s.name], s.cfg.loss.t2_scaling)
            print(f"{s.name}: {temps.describe()}", flush=True)
    end = run.total_steps if stop_after is None else min(stop_after, run.total_steps)
    start_tokens = {s.name: s.tokens for s in run.students}
    start_time = time.perf_counter()
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        disable=(None if progress is None else not progress) if run.is_main else True,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    batches_it = iter(run.stream)
    try:
        while run.step < end:
            batches = []
            for _ in range(cfg.grad_accum):
                try:
                    batch = next(batches_it)
                except StopIteration:  # a stream that ends per epoch: start the next one
                    batches_it = iter(run.stream)
                    batch = next(batches_it)
                batches.append(batch.to(run.device))
            for s in run.students:
                m = train_step(
                    s,
                    batches,
                    total_steps=run.total_steps,
                    mode=run.modes[s.name],
                    temperature=run.temperatures[s.name],
                    amp=run.amp,
                    cache_temperature=run.stream.temperature,
                )
                if run.is_main:
                    _log(run, s, m)
            run.step += 1
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == end:
                post = {s.name: f"{s.last.loss:.4f}" for s in run.students}
                post["tok/s"] = f"{sum(s.last.tokens_per_s for s in run.students) / len(run.students):.0f}"
                bar.set_postfix(post)
                log.debug("step %d: %s", run.step, post)
            every = cfg.checkpoint_every
            if (every and run.step % every == 0) or run.step == end:
                save_checkpoint(run)
    finally:
        bar.close()
        for metrics, tb in run.writers.values():
            metrics.close()
            tb.close()
        run.writers.clear()
    seconds = time.perf_counter() - start_time
    for s in run.students:
        s.session_tokens_per_s = (s.tokens - start_tokens[s.name]) / max(s.train_seconds, 1e-9)
    return RunResult(out=run.out, steps=run.step, seconds=seconds, students=run.students)


def train(
    cfg: RunConfig, *, resume: bool = False, progress: bool | None = None, stop_after: int | None = None
) -> RunResult:
    """Set up (:func:`prepare`) and run (:func:`run_loop`) a whole training run.

    Args:
        cfg: the validated run config.
        resume: continue from the newest checkpoint every student has.
        progress: tqdm bar (None: only on a terminal).
        stop_after: stop after this many global steps (writes a checkpoint there).

    Returns:
        The :class:`RunResult` with the trained students.

    Raises:
        LongkdError: any setup check, or a non-finite loss during training.
    """
    run = prepare(cfg, resume=resume)
    try:
        return run_loop(run, progress=progress, stop_after=stop_after)
    finally:
        if run.parallel is not None:
            run.parallel.close()
