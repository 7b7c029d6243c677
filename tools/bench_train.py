"""Benchmark a training step distilling from the cache against plain next-token cross-entropy.

The question: how much does learning from cached teacher top-k cost per step over ordinary
language-model training of the same student on the same tokens? This script builds a tiny
teacher and a cache (or takes ``--cache``), takes ONE batch from the trainer's window stream,
and times optimizer steps of the same student (same initial weights, same batch, same AdamW)
under three losses, interleaved round by round so machine load hits all alike:

- ``ce``: ``F.cross_entropy`` on the full logits (the plain baseline);
- ``kd``: the trainer's ``sparse_kl`` (bucket) on the cached top-k;
- ``kd+ce``: both, as a run with ``ce_weight`` > 0 trains.

It also times decoding a batch from the cache (the reader's share, paid once per step for all
students). Peak memory is CUDA ``max_memory_allocated`` per loss; on CPU it is reported as n/a
(the process RSS high-water mark cannot be reset between losses).

    python -m longkd.tools.bench_train --threads 1
    python -m longkd.tools.bench_train --device cuda --vocab 32000 --hidden 512 --window 2048 --batch-size 4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("ce", "kd", "kd+ce")


def _make_cache(root: Path, args) -> Path:
    """A tiny teacher (random Llama) and a cache of ``args.windows`` windows, through the real CLI."""
    from longkd.cli import main
    from longkd.tools.random_models import ids_to_text, save_tiny_model

    teacher = save_tiny_model(
        root / "teacher",
        arch="llama",
        vocab_size=args.vocab,
        hidden_size=args.teacher_hidden,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=max(args.window, 256),
        seed=0,
    )
    rng = np.random.default_rng(0)
    data = root / "data.jsonl"
    with data.open("w") as f:
        written = 0
        while written < args.window * (args.windows + 1):
            n = int(rng.integers(20, 400))
            f.write(json.dumps({"text": ids_to_text(rng.integers(4, args.vocab, size=n))}) + "\n")
            written += n
    cmd = [
        "cache",
        "build",
        "--teacher",
        str(teacher),
        "--data",
        str(data),
        "--window",
        str(args.window),
        "--out",
        str(root / "cache"),
        "--top-k",
        str(args.top_k),
        "--max-windows",
        str(args.windows),
        "--batch-size",
        "4",
        "--device",
        args.device,
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        if main(cmd) != 0:
            raise SystemExit("cache build failed")
    return root / "cache"


def _student(args, vocab: int):
    from longkd.models import build_tiny_model, tiny_config

    config = tiny_config(
        "llama",
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_position_embeddings=max(args.window, 256),
    )
    return build_tiny_model(config, seed=1).train()


def _step_fn(model, batch, loss_name: str, amp: torch.dtype | None):
    """A closure doing one full optimizer step of ``model`` on ``batch`` with the named loss."""
    from longkd.kernels.sparse_kl import sparse_kl
    from longkd.models import lm_head_logits

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    body = model.get_decoder()
    b, w = batch.input_ids.shape
    mask = batch.loss_mask().reshape(-1)
    targets = batch.next_tokens().reshape(-1)
    ids = batch.ids.reshape(b * w, -1)
    lps = batch.target_logprobs.reshape(b * w, -1)
    device_type = batch.input_ids.device.type

    def step() -> float:
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)[0]
            logits = lm_head_logits(model, hidden).reshape(b * w, -1)
        loss = logits.new_zeros((), dtype=torch.float32)
        if "kd" in loss_name:
            loss = loss + sparse_kl(logits, ids, lps, mode="bucket", mask=mask)
        if "ce" in loss_name:
            loss = loss + F.cross_entropy(logits.float(), targets, ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    """Run the benchmark; returns a dict of results (also printed as a Markdown table)."""
    from longkd.trainer.stream import WindowStream

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = (
        torch.bfloat16
        if (args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"))
        else None
    )
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else _make_cache(Path(tmp), args)
        stream = WindowStream([str(cache)], batch_size=args.batch_size, seed=0)
        vocab = int(stream.readers[0].manifest["vocab"]["embedding_size"])
        it = iter(stream)
        decode = []
        for _ in range(args.decode_batches):
            t0 = time.perf_counter()
            batch = next(it)
            decode.append(time.perf_counter() - t0)
        batch = batch.to(device)
        base = _student(args, vocab).to(device)
        models = {name: copy.deepcopy(base) for name in LOSSES}
        steps = {name: _step_fn(models[name], batch, name, amp) for name in LOSSES}
        times: dict[str, list[float]] = {name: [] for name in LOSSES}
        peaks: dict[str, int | None] = {name: None for name in LOSSES}
        for name in LOSSES:  # warmup (allocator, first-call costs)
            for _ in range(args.warmup):
                steps[name]()
        for _ in range(args.steps):
            for name in LOSSES:  # interleaved, so load changes hit every loss alike
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                t0 = time.perf_counter()
                steps[name]()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device)
                    peaks[name] = max(peaks[name] or 0, peak)
    tokens = args.batch_size * args.window
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "date": _dt.date.today().isoformat(),
        "platform": platform.machine(),
        "student": f"llama h{args.hidden} L{args.layers}, V={vocab}",
        "batch": f"{args.batch_size} x {args.window}",
        "top_k": args.top_k,
        "decode_ms": 1000 * statistics.median(decode),
        "losses": {},
    }
    ce = statistics.median(times["ce"])
    for name in LOSSES:
        med = statistics.median(times[name])
        result["losses"][name] = {
            "step_ms": 1000 * med,
            "tokens_per_s": tokens / med,
            "ratio_to_ce": med / ce,
            "peak_mib": None if peaks[name] is None else peaks[name] / 2**20,
        }
    return result


def to_markdown(r: dict) -> str:
    lines = [
        "| loss | step ms (median) | tokens/s | vs ce | peak memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in r["losses"].items():
        peak = "n/a" if m["peak_mib"] is None else f"{m['peak_mib']:.0f} MiB"
        lines.append(
            f"| {name} | {m['step_ms']:.1f} | {m['tokens_per_s']:,.0f} | {m['ratio_to_ce']:.2f}x | {peak} |"
        )
    lines.append(f"| (cache decode, per batch) | {r['decode_ms']:.1f} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="use this cache instead of building a tiny one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary of the built teacher")
    p.add_argument("--teacher-hidden", type=int, default=64)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="windows in the built cache")
    p.add_argument("--hidden", type=int, default=128, help="student hidden size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per loss")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-batches", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)
    r = run(args)
    print(
        f"{r['device']} ({r['platform']}, {r['threads']} threads), {r['date']}: student {r['student']}, "
        f"batch {r['batch']} tokens, cache top-k {r['top_k']}"
    )
    print(to_markdown(r))
    if args.json:
        print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
