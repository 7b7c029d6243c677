"""Measure a tensor-parallel cache build against a one-process build of the same windows.

    python -m longkd.tools.bench_tensor_parallel --ranks 2 --windows 8 --window 512
    python -m longkd.tools.bench_tensor_parallel --ranks 4 --vocab 32000 --device cuda

Saves a random Llama (vocabulary ``--vocab``, deliberately not a multiple of the ranks, so
the shards are uneven), builds a top-k cache in one process and the same cache under
``torchrun --nproc-per-node RANKS ... --tensor-parallel RANKS`` (one group), and reports what
docs/distributed.md quotes: the largest log-prob and target differences, the fraction of
top-k ids that differ and how many of those are ties (the id taken instead has the same
log-prob within 1e-6 in the one-process teacher), and seconds per window of each build (the
builds' own clocks, loading excluded). On a CPU every rank runs one thread.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _build(argv: list[str], ranks: int, threads: int) -> tuple[float, float]:
    """Run ``longkd cache build`` (under torchrun when ranks > 1): (tokens/s of the run, wall s)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "longkd", *argv]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            *cmd[1:],
        ]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"build failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    rate = re.search(r"([\d,.]+) tokens/s this run", done.stdout)
    return float(rate.group(1).replace(",", "")), wall


def _exact(teacher: Path, reader, device: str) -> list[torch.Tensor]:
    """Every window's full log-probs from the one-process teacher."""
    from longkd.cache.teacher import Teacher

    model = Teacher.load(str(teacher), device=device).model
    out = []
    with torch.inference_mode():
        for window in reader.iter_windows():
            ids = torch.from_numpy(window.input_ids.astype(np.int64))[None].to(device)
            pos = torch.from_numpy(window.position_ids)[None].to(device)
            out.append(torch.log_softmax(model(input_ids=ids, position_ids=pos).logits[0].float(), -1).cpu())
    return out


def compare(cache: Path, reference: Path, teacher: Path, device: str = "cpu") -> dict:
    """The differences between a cache and the one-process reference, window by window."""
    from longkd.cache.reader import CacheReader

    a, b = CacheReader(cache), CacheReader(reference)
    exact = _exact(teacher, b, device)
    stats = {"max_logprob_diff": 0.0, "max_target_diff": 0.0, "ids_differing": 0, "ties": 0, "entries": 0}
    for x, y in zip(a.iter_windows(), b.iter_windows(), strict=True):
        assert x.window_id == y.window_id and np.array_equal(x.input_ids, y.input_ids)
        stats["max_logprob_diff"] = max(
            stats["max_logprob_diff"], float(np.abs(x.logprobs - y.logprobs).max())
        )
        target = np.abs(x.target_logprob - y.target_logprob)[:-1]
        stats["max_target_diff"] = max(stats["max_target_diff"], float(target.max()))
        rows, cols = np.nonzero(x.ids != y.ids)
        theirs = exact[x.window_id][rows, x.ids[rows, cols]].numpy()
        stats["ids_differing"] += int(rows.size)
        stats["ties"] += int((np.abs(theirs - y.logprobs[rows, cols]) <= 1e-6).sum())
        stats["entries"] += x.ids.size
    stats["fraction_ids_differing"] = stats["ids_differing"] / max(stats["entries"], 1)
    return stats


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes, all in one tensor-parallel group")
    p.add_argument("--vocab", type=int, default=8191)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = p.parse_args(argv)

    from longkd.tools.random_models import ids_to_text, save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = save_tiny_model(
            root / "teacher", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=8, max_position_embeddings=max(args.window, 1024), seed=0,
        )  # fmt: skip
        rng = np.random.default_rng(0)
        with (root / "data.jsonl").open("w") as f:
            written = 0
            while written < 1.2 * args.windows * args.window:  # enough samples for every window
                n = int(rng.integers(20, 200))
                f.write(json.dumps({"text": ids_to_text(rng.integers(4, args.vocab, size=n))}) + "\n")
                written += n + 1
        common = [
            "cache", "build", "--teacher", str(teacher), "--data", str(root / "data.jsonl"),
            "--window", str(args.window), "--top-k", str(args.top_k), "--max-windows", str(args.windows),
            "--device", args.device,
        ]  # fmt: skip
        one_rate, one_wall = _build([*common, "--out", str(root / "one")], 1, 1)
        one2_rate, _ = _build([*common, "--out", str(root / "one-2threads")], 1, args.ranks)
        tp_rate, tp_wall = _build(
            [*common, "--out", str(root / "tp"), "--tensor-parallel", str(args.ranks)], args.ranks, 1
        )
        stats = compare(root / "tp", root / "one", teacher, args.device)
    result = {
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "device": args.device,
        "model": f"llama {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}",
        "window": args.window,
        "windows": args.windows,
        "top_k": args.top_k,
        "ranks": args.ranks,
        **stats,
        "s_per_window_one_process_1_thread": args.window / one_rate,
        f"s_per_window_one_process_{args.ranks}_threads": args.window / one2_rate,
        f"s_per_window_tensor_parallel_{args.ranks}": args.window / tp_rate,
        "wall_s_one_process": one_wall,
        "wall_s_tensor_parallel": tp_wall,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:40s} {value:.3g}" if isinstance(value, float) else f"{key:40s} {value}")
    return result


if __name__ == "__main__":
    main()
