"""Benchmark `longkd cache build` against the teacher forward it is supposed to hide under.

The producer's floor is the teacher forward: log-softmax, selection, Arrow encoding, zstd
and disk writes should add little on top of it. This script builds a tiny-but-not-trivial
Llama (random weights, vocabulary 32000 by default), packs random text into W-token windows,
times a forward-only pass (body + LM head logits) over those windows, then builds a cache of
the same windows for each selection and prints tokens/s of both, their ratio and the bytes
per token on disk.

    python -m longkd.tools.bench_build --windows 8 --window 1024 --threads 1
    python -m longkd.tools.bench_build --device cuda --windows 64 --window 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _make_data(path: Path, tokens: int, vocab: int, seed: int) -> None:
    """JSONL of random word-token samples (50..500 tokens) holding at least ``tokens`` tokens."""
    from longkd.tools.random_models import ids_to_text

    rng = np.random.default_rng(seed)
    written = 0
    with path.open("w") as f:
        while written < tokens:
            n = int(rng.integers(50, 500))
            f.write(json.dumps({"text": ids_to_text(rng.integers(4, vocab, size=n))}) + "\n")
            written += n


def _forward_only(teacher_dir: Path, data: Path, args) -> tuple[float, int]:
    """Seconds and tokens of the plain teacher forward (full logits) over the build's windows."""
    from longkd.cache.data import load_samples
    from longkd.cache.packing import Packer, PackingConfig, position_ids_for
    from longkd.cache.teacher import Teacher

    teacher = Teacher.load(str(teacher_dir), dtype=args.dtype, device=args.device)
    tok = teacher.tokenizer
    packer = Packer(PackingConfig(window=args.window, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id))
    windows = []
    for window in packer.pack(load_samples(str(data), tokenizer=tok)):
        if window.window_id >= args.windows:
            break
        windows.append(window)
    device = torch.device(args.device)

    def run(batch):
        ids = torch.from_numpy(np.stack([w.input_ids for w in batch]).astype(np.int64)).to(device)
        pos = np.stack([position_ids_for(args.window, w.segment_starts, "continuous") for w in batch])
        with torch.inference_mode():
            logits = teacher.model(input_ids=ids, position_ids=torch.from_numpy(pos).long().to(device)).logits
            return float(logits[:, -1, 0].float().sum())  # forces the work (and a device sync)

    run(windows[:1])  # warm-up: allocator, kernels
    start = time.perf_counter()
    for i in range(0, len(windows), args.batch_size):
        run(windows[i : i + args.batch_size])
    return time.perf_counter() - start, sum(int(w.length) for w in windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument("--windows", type=int, default=8, help="windows per build")
    parser.add_argument("--window", type=int, default=1024, help="W, tokens per window")
    parser.add_argument("--vocab", type=int, default=32000, help="teacher vocabulary")
    parser.add_argument("--hidden", type=int, default=256, help="teacher hidden size")
    parser.add_argument("--layers", type=int, default=4, help="teacher layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per teacher forward")
    parser.add_argument("--dtype", default="float32", help="teacher forward dtype")
    parser.add_argument("--top-k", type=int, nargs="+", default=[16, 64, 256], help="top-k settings to build")
    parser.add_argument("--draws", type=int, nargs="*", default=[64], help="sampled settings to build")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", default=None, help="keep the model, data and caches here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from longkd.cache.build import build_cache
    from longkd.cache.build_settings import resolve_settings
    from longkd.tools.random_models import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher_dir = save_tiny_model(
            work / "teacher",
            arch="llama",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_layers=args.layers,
            num_heads=args.heads,
            max_position_embeddings=args.window,
        )
        data = work / "data.jsonl"
        _make_data(data, int(args.windows * args.window * 1.2), args.vocab, seed=0)
        # Warm-up build (not reported): first-call costs of the head, the writer and zstd.
        warm = {
            "teacher": str(teacher_dir),
            "data": str(data),
            "window": args.window,
            "max_windows": 1,
            "out": str(work / "cache-warmup"),
            "dtype": args.dtype,
            "device": args.device,
        }
        build_cache(resolve_settings(warm), progress=False, echo=lambda *_: None)
        rows = []
        selections = [("top_k", k, f"top-k {k}") for k in args.top_k]
        selections += [("sample_draws", n, f"sampled {n}") for n in args.draws]
        for key, value, label in selections:
            # The forward-only floor is timed right before each build, so both see the same
            # machine load (a shared CPU drifts a lot between minutes).
            fwd_s, fwd_tokens = _forward_only(teacher_dir, data, args)
            settings = resolve_settings(
                {
                    "teacher": str(teacher_dir),
                    "data": str(data),
                    "window": args.window,
                    "out": str(work / f"cache-{label.replace(' ', '')}"),
                    key: value,
                    "max_windows": args.windows,
                    "batch_size": args.batch_size,
                    "dtype": args.dtype,
                    "device": args.device,
                }
            )
            result = build_cache(settings, progress=False, echo=lambda *_: None)
            totals = result.manifest["totals"]
            rows.append((label, result, fwd_tokens / fwd_s, totals["bytes"] / totals["tokens"]))

    device = args.device if args.device != "cpu" else f"CPU ({platform.processor() or platform.machine()})"
    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name(0)
    print(
        f"# cache build vs teacher forward, {_dt.date.today().isoformat()}, device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"# teacher: llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
        f"W={args.window}, batch {args.batch_size}, dtype {args.dtype}"
    )
    print(
        "| selection | windows | build tokens/s | forward-only tokens/s | build / forward "
        "| in Teacher.run | bytes/token |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, result, fwd_rate, bpt in rows:
        rate = result.tokens_per_second
        share = result.teacher_seconds / result.seconds if result.seconds else float("nan")
        print(
            f"| {label} | {result.windows} | {rate:,.0f} | {fwd_rate:,.0f} | {rate / fwd_rate:.2f} "
            f"| {100 * share:.0f}% | {bpt:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
