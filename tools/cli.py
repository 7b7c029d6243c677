"""Subcommands of `longkd` that live in tools/ (registered by longkd/cli.py).

    longkd eval MODEL --task passkey|needle|toy|cache-kl [--lengths ... --depths ... --out DIR]
    longkd analyze perturb MODEL [--length L --repeats R --deltas 0,1,16,256 --windows N]
    longkd analyze qdrift BEFORE AFTER [--train-length L]
    longkd demo [--quick] [--out DIR] [--models-dir DIR] [--recipe w256|w512] [--device cuda]

Each command has a ``register_*`` function below; :func:`register` calls them all, so a new
command is one more function and one more line there. Heavy imports (torch, transformers)
happen inside the command functions, keeping ``longkd --help`` fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from longkd.devices import resolve_device
from longkd.errors import LongkdError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this folder's subcommands to the top-level parser."""
    register_eval(sub)
    register_analyze(sub)
    register_demo(sub)


# --------------------------------------------------------------------------- parsing helpers


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _print(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- eval


def register_eval(sub: argparse._SubParsersAction) -> None:
    """``longkd eval``: long-context retrieval scores of a model."""
    from longkd.tools.eval_prompts import NEEDLE_TYPES, NEEDLE_VARIANTS
    from longkd.tools.evals import TASKS

    p = sub.add_parser(
        "eval",
        help="long-context retrieval evals (passkey, needle, toy probe, KL on cached windows)",
        description="Score a causal LM on retrieval over context lengths x needle depths; writes "
        "results.json, results.md and a heatmap PNG to --out. Lengths beyond the model's position "
        "limit are run and marked 'extrapolation'.",
    )
    p.add_argument("model", metavar="MODEL", help="Hugging Face model directory (or hub id when online)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--out", metavar="DIR", help="output directory (default: ./longkd-out/eval-TASK)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto (default), float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0, help="seed of keys, values and probes (default: 0)")
    g = p.add_argument_group("passkey and needle")
    g.add_argument("--lengths", type=_int_list, metavar="N,N,...",
                   help="context lengths in tokens (default: 1/4, 1/2, 1 x the position limit)")  # fmt: skip
    g.add_argument("--depths", type=_float_list, default=[0, 25, 50, 75, 100], metavar="D,D,...",
                   help="needle depths in percent (default: 0,25,50,75,100)")  # fmt: skip
    g.add_argument("--samples", type=int, default=1, help="prompts per cell (default: 1)")
    g.add_argument(
        "--max-new-tokens", type=int, help="greedy tokens per answer (default: 12 passkey, 32/value)"
    )
    g.add_argument(
        "--needle-variant", default="single", help=f"{', '.join(NEEDLE_VARIANTS)} (default: single)"
    )
    g.add_argument(
        "--key-type", default="word", help=f"needle keys: {', '.join(NEEDLE_TYPES)} (default: word)"
    )
    g.add_argument("--value-type", default="number",
                   help=f"needle values: {', '.join(NEEDLE_TYPES)} (default: number)")  # fmt: skip
    g.add_argument("--needle-keys", type=int, default=4, help="needles in a multikey prompt (default: 4)")
    g.add_argument("--needle-values", type=int, default=4, help="values in a multivalue prompt (default: 4)")
    g = p.add_argument_group("toy")
    g.add_argument("--distances", type=_int_list, metavar="D,D,...",
                   help="fact-query distances (default: 8, 16, ... up to 2x the position limit)")  # fmt: skip
    g.add_argument("--per-distance", type=int, default=64, help="probes per distance (default: 64)")
    g.add_argument("--toy-world", metavar="JSON",
                   help="the toy world (vocab_size, num_keys, num_values) as a JSON file or string; "
                   "default: toy_world.json or the world in MODEL/metrics.json, "
                   "else the defaults")  # fmt: skip
    g = p.add_argument_group("cache-kl")
    g.add_argument("--cache", metavar="DIR", help="teacher-logit cache to compare against")
    g.add_argument("--windows", type=int, help="held-out cached windows to evaluate")
    g.add_argument("--buckets", type=int, help="position buckets")
    g.add_argument("--skip-damaged", action="store_true", help="leave damaged cached windows out (counted)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from longkd.tools import eval_prompts, evals

    if args.task not in evals.TASKS:
        raise LongkdError(f"--task {args.task!r} is unknown; use one of {', '.join(evals.TASKS)}")
    device = resolve_device(args.device)
    out = Path(args.out or f"longkd-out/eval-{args.task}")
    if args.task == "cache-kl":
        if not args.cache:
            raise LongkdError("--task cache-kl needs --cache DIR (a teacher-logit cache)")
        from longkd.tools import eval_cache

        dtype = evals.resolve_dtype(args.dtype, device)
        result = eval_cache.run_cache_kl(args.model, args.cache, windows=args.windows, buckets=args.buckets,
                                         device=device, dtype=dtype,
                                         skip_damaged=args.skip_damaged or None)  # fmt: skip
        skipped = result.get("damaged")
        if skipped:
            print(f"longkd: skipped {len(skipped)} damaged windows: {skipped[:20]}", file=sys.stderr)
        paths = eval_cache.write_cache_kl(result, out)
        _print(json.dumps(result, indent=2, default=str) if args.json else paths["table"])
        return 0

    model, tokenizer = evals.load_model(args.model, device=device, dtype=args.dtype,
                                        tokenizer=args.task != "toy")  # fmt: skip
    limit = evals.position_limit(model.config)
    name = str(args.model)
    if args.task == "toy":
        from longkd.tools import eval_toy

        world = _toy_world(args.toy_world, Path(args.model), model.config.get_text_config().vocab_size)
        result = eval_toy.run_toy(model, world, max_positions=limit, distances=args.distances,
                                  per_distance=args.per_distance, seed=args.seed)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"model": name, **result}, indent=2) + "\n")
        table = eval_toy.toy_markdown(result)
        (out / "results.md").write_text(f"# toy retrieval: {name}\n\n{table}\n")
        eval_toy.plot_toy(result, out / "accuracy.png", f"toy retrieval: {Path(name).name}")
        _print(
            json.dumps(result, indent=2) if args.json else f"{table}\n\nmean score {result['mean_score']:.1f}"
        )
        log.info("wrote %s", out)
        return 0

    lengths = args.lengths
    if lengths is None:
        if limit is None:
            raise LongkdError("the model config has no max_position_embeddings; pass --lengths")
        lengths = sorted({max(limit // 4, 1), max(limit // 2, 1), limit})
    needle = eval_prompts.NeedleConfig(args.needle_variant, args.key_type, args.value_type,
                                       args.needle_keys, args.needle_values)  # fmt: skip
    result = evals.run_retrieval(
        model, tokenizer, args.task, lengths, args.depths, samples=args.samples, seed=args.seed,
        max_new_tokens=args.max_new_tokens, needle=needle, max_positions=limit, progress=True,
    )  # fmt: skip
    paths = evals.write_outputs(result, out, model_name=name)
    if args.json:
        _print(json.dumps({"model": name, **result.to_dict()}, indent=2))
    else:
        where = paths["heatmap"].parent
        _print(f"{evals.markdown_table(result)}\n\nmean score {result.mean:.1f}  (wrote {where})")
    return 0


def _toy_world(spec: str | None, model_dir: Path, vocab_size: int):
    """The toy world from --toy-world, from files beside the model, or the defaults at the model's vocab."""
    from longkd.tools.toy_world import ToyWorld

    data = None
    if spec:
        path = Path(spec)
        try:
            data = json.loads(path.read_text() if path.is_file() else spec)
        except json.JSONDecodeError as exc:
            raise LongkdError(f"--toy-world is neither a JSON file nor JSON text: {exc}") from None
    else:
        for name in ("toy_world.json", "metrics.json"):
            path = model_dir / name
            if path.is_file():
                try:
                    found = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue
                if isinstance(found, dict):
                    # toy_models.py writes the world under recipe.world in metrics.json.
                    recipe = found.get("recipe") if isinstance(found.get("recipe"), dict) else {}
                    data = (
                        found.get("world")
                        or recipe.get("world")
                        or (found if name == "toy_world.json" else None)
                    )
                if data:
                    break
    data = data or {"vocab_size": vocab_size}
    if not isinstance(data, dict):
        raise LongkdError("--toy-world must be a JSON object with vocab_size, num_keys, num_values")
    # Every ToyWorld field is taken, not only the vocabulary: the probes' distractors and
    # filler follow num_keys / filler_prob, so they must match the training world.
    allowed = {f.name: f.default for f in dataclasses.fields(ToyWorld)}
    try:
        kwargs = {}
        for k, v in data.items():
            if k in allowed:
                kwargs[k] = type(allowed[k])(v)
    except (TypeError, ValueError) as err:
        raise LongkdError(f"--toy-world has a value of the wrong type: {err}") from None
    try:
        return ToyWorld(**kwargs)
    except LongkdError as err:
        raise LongkdError(f"{err} (or pass --toy-world with the world {model_dir} was trained on)") from None


# --------------------------------------------------------------------------- analyze


def register_analyze(sub: argparse._SubParsersAction) -> None:
    """``longkd analyze perturb | qdrift``: how a model uses its rotary positions."""
    p = sub.add_parser("analyze", help="probe how a model uses RoPE (position perturbation, q/k drift)")
    asub = p.add_subparsers(dest="analyze_command", metavar="SUBCOMMAND")
    asub.required = True

    pert = asub.add_parser(
        "perturb",
        help="shift the rotary positions of q, k or both and trace the effect through the layers",
        description="On windows of a random span repeated, shift the positions of the queries only, the "
        "keys only, or both by each delta; report the per-layer relative change of the residual stream "
        "and the KL of the output. Llama-family models (llama, mistral, qwen2, qwen3, phi3, gemma2).",
    )
    pert.add_argument("model", metavar="MODEL", help="Hugging Face model directory")
    pert.add_argument("--length", type=int, default=256, help="tokens per window (default: 256)")
    pert.add_argument(
        "--repeats", type=int, default=2, help="copies of the random span per window (default: 2)"
    )
    pert.add_argument(
        "--deltas", type=_int_list, default=[0, 1, 16, 256], help="shifts (default: 0,1,16,256)"
    )
    pert.add_argument("--windows", type=int, default=4, help="windows per measurement (default: 4)")
    pert.add_argument("--seed", type=int, default=0, help="window draw (default: 0)")
    _analyze_common(pert, "longkd-out/analyze-perturb")
    pert.set_defaults(func=_cmd_perturb)

    qd = asub.add_parser(
        "qdrift",
        help="per layer and RoPE frequency pair, how far the q/k projections moved between two checkpoints",
        description="Relative change ||W_after - W_before|| / ||W_before|| of the q_proj and k_proj rows "
        "feeding each RoPE frequency pair (dims i and i + r/2 per head), averaged over heads.",
    )
    qd.add_argument("before", metavar="BEFORE", help="model directory before training")
    qd.add_argument("after", metavar="AFTER", help="model directory after training")
    qd.add_argument("--train-length", type=int,
                    help="mark the pair of this wavelength (default: AFTER's max positions)")  # fmt: skip
    _analyze_common(qd, "longkd-out/analyze-qdrift")
    qd.set_defaults(func=_cmd_qdrift)


def _analyze_common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--out", metavar="DIR", default=default_out, help=f"output directory (default: ./{default_out})"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")


def _cmd_perturb(args) -> int:
    from longkd.tools import analyze, evals

    device = resolve_device(args.device)
    model, _ = evals.load_model(args.model, device=device, dtype=args.dtype, tokenizer=False)
    vocab = model.config.get_text_config().vocab_size
    tokenizer = _optional_tokenizer(args.model)
    if tokenizer is not None:
        # Random tokens from the tokenizer's ids, special tokens left out: a window of BOS/PAD
        # ids is not text any model was trained on.
        special = set(tokenizer.all_special_ids)
        vocab = [i for i in range(min(len(tokenizer), vocab)) if i not in special]
    report = analyze.perturb(model, length=args.length, repeats=args.repeats, deltas=args.deltas,
                             windows=args.windows, vocab=vocab, seed=args.seed)  # fmt: skip
    report = {"model": str(args.model), **report}
    table = analyze.perturb_table(report)
    title = f"RoPE perturbation: {Path(args.model).name} (length {args.length}, {args.windows} windows)"
    analyze.write_report(report, args.out, "perturb", table,
                         lambda r, path: analyze.plot_perturb(r, path, title))  # fmt: skip
    summary = f"baseline copy accuracy {report['baseline_accuracy']:.3f}  (wrote {args.out})"
    _print(json.dumps(report, indent=2) if args.json else f"{table}\n\n{summary}")
    return 0


def _optional_tokenizer(path: str):
    """The model's tokenizer when it has one (it only narrows the random-token pool), else None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).exists())
    except Exception:  # no tokenizer files: draw from the whole embedding instead
        log.info("no tokenizer in %s; drawing random tokens from every embedding id", path)
        return None


def _cmd_qdrift(args) -> int:
    from longkd.tools import analyze, evals

    device = resolve_device(args.device)
    before, _ = evals.load_model(args.before, device=device, dtype=args.dtype, tokenizer=False)
    after, _ = evals.load_model(args.after, device=device, dtype=args.dtype, tokenizer=False)
    report = analyze.qdrift(before, after, train_length=args.train_length)
    report = {"before": str(args.before), "after": str(args.after), **report}
    table = analyze.qdrift_table(report)
    title = f"q/k drift per RoPE pair: {Path(args.before).name} -> {Path(args.after).name}"
    analyze.write_report(
        report, args.out, "qdrift", table, lambda r, path: analyze.plot_qdrift(r, path, title)
    )
    _print(json.dumps(report, indent=2) if args.json else f"{table}\n\n(wrote {args.out})")
    return 0


# --------------------------------------------------------------------------- demo



def register_demo(sub: argparse._SubParsersAction) -> None:
    """``longkd demo``: the whole pipeline on the toy world (tools/demo.py)."""
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on a toy world (CPU, no downloads): does KD give a student long context?",
        description="Pre-train (or reuse) a tiny long-context teacher and a short-context student, build "
        "teacher-logit caches from short packed documents, distil students under phase-wise and static RoPE "
        "scaling, train a cross-entropy baseline and a reset-positions control, and evaluate retrieval by "
        "distance and KL by position. Writes OUT/results.md, OUT/results.json and OUT/retrieval.png.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the small preset: 1 seed, 150 steps, 1,200 documents (about 2.5 minutes cold on 2 CPU "
        "cores; the default is the full demo: 3 seeds, about 5 minutes)",
    )
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output directory (default: ./demo-out)")
    p.add_argument("--device", default="cpu", help="torch device for every stage: cpu (default) or cuda")
    p.add_argument("--seeds", type=int, help="repetitions for the headline spread (default: 3 full, 1 quick)")
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        help="where the pre-trained teacher and student are kept and reused (default: OUT/models)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--no-checks", action="store_true",
                   help="go on when the teacher or student misses its precondition (results marked FAILED)")
    g = p.add_argument_group("sizes (override the preset)")
    g.add_argument("--recipe", help="toy model recipe: w256 (default, W=256) or w512 (W=512: a longer "
                   "window, about 3 minutes more pre-training; docs/toy.md)")
    g.add_argument("--steps", type=int, help="optimizer steps per student")
    g.add_argument("--batch-size", type=int, help="windows per step")
    g.add_argument("--lr", type=float, help="students' peak learning rate")
    g.add_argument("--train-docs", type=int, help="short documents per seed in the main cache")
    g.add_argument("--heldout-docs", type=int, help="short documents in the held-out cache")
    g.add_argument("--top-k", type=int, help="teacher entries stored per position")
    g.add_argument("--per-distance", type=int, help="retrieval probes per distance")
    g.add_argument("--encoding", choices=("plain", "compact"),
                   help="the caches' column encoding (default: plain, the README's tables)")  # fmt: skip
    p.set_defaults(func=_cmd_demo)


def demo_settings_from_args(args):
    """The demo preset of ``--quick`` (or the full one) with every size flag given applied."""
    from longkd.tools.demo import PRESETS, DemoSettings

    base = dataclasses.asdict(PRESETS["quick" if args.quick else "full"])
    for key in base:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    for key in ("steps", "batch_size", "train_docs", "heldout_docs", "top_k", "per_distance", "seeds"):
        if base[key] < 1:
            raise LongkdError(f"--{key.replace('_', '-')} must be at least 1, got {base[key]}")
    return DemoSettings(**base)


def _cmd_demo(args) -> int:
    from longkd.tools.demo import pin_cpu_numerics, run_demo

    pin_cpu_numerics()  # before torch is imported (docs/demo.md, "How much the numbers move")
    settings = demo_settings_from_args(args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise LongkdError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    else:
        import torch

        # Tiny models gain nothing from a second thread, and a busy 2-core machine loses a lot
        # to oversubscription (docs/toy.md measures 6x).
        torch.set_num_threads(args.threads)
    run_demo(args.out, settings=settings, device=args.device, models_dir=args.models_dir,
             checks=not args.no_checks)  # fmt: skip
    return 0
