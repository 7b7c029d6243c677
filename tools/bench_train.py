"""Benchmark a training step distilling from the cache against plain next-token cross-entropy,
and the fused LM-head loss against materialised logits.

The questions: how much does learning from cached teacher top-k cost per step over ordinary
language-model training of the same student on the same tokens, and what does computing the
losses through the LM head in chunks (``loss.fused: true``) save over materialising the
[N, V] logits? This script builds a tiny teacher and a cache (or takes ``--cache``), takes ONE
batch from the trainer's window stream, and times full optimizer steps (forward, loss,
backward, clip, AdamW) of one student on that batch under these losses, interleaved round
by round so machine load hits all alike:

- ``ce``: next-token cross-entropy through the fused head (plain LM training);
- ``kd``: the trainer's loss (trainer/losses.py) with ``kd_weight`` 1: sparse KL (bucket) on
  the cached top-k, fused, the CE computed for the log only;
- ``kd+ce``: the same with ``ce_weight`` 1;
- ``kd-materialised``: ``kd`` with ``loss.fused: false`` (full logits, then the chunked loss);
- ``ce-materialised``: ``F.cross_entropy`` on the full logits (the usual LM step).

Peak memory of a step is measured per path: on CPU each path runs in its own subprocess
(one warm-up step allocates the AdamW state, the RSS high-water mark is reset through
/proc/self/clear_refs, then one step is measured); on CUDA with ``max_memory_allocated``.
"step peak" is the peak above the memory held before the step (weights, AdamW state), over
the whole step and over its forward and backward alone (the optimizer's own temporaries,
the same for every loss, come after: CPU AdamW allocates two of each parameter's size);
"process peak" is the absolute one. On CPU the time ratios come from the process's CPU time
(with one torch thread, the step's own work: other jobs on a shared machine do not inflate
it); wall times are reported beside them. It also times decoding a batch from the cache (the
reader's share, paid once per step for all students).

    python -m longkd.tools.bench_train --threads 1
    python -m longkd.tools.bench_train --threads 1 --vocab 128256 --hidden 512 --heads 8 \\
        --window 8192 --batch-size 1 --windows 1 --steps 2 --warmup 1 --json big.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("ce", "kd", "kd+ce", "kd-materialised", "ce-materialised")
PEAK_PATHS = ("kd", "kd-materialised")  # the fused / materialised comparison


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
    cmd = ["cache", "build", "--teacher", str(teacher), "--data", str(data), "--window", str(args.window)]
    cmd += ["--out", str(root / "cache"), "--top-k", str(args.top_k), "--max-windows", str(args.windows)]
    cmd += ["--batch-size", "1", "--device", args.device, "--chunk-size", "256"]
    with contextlib.redirect_stdout(io.StringIO()):
        if main(cmd) != 0:
            raise SystemExit("cache build failed")
    return root / "cache"


def _student(args, vocab: int):
    """The benchmarked student: Llama with SDPA attention (eager attention at long windows would
    hold [P, P] scores per head and layer, and dominate both paths' memory)."""
    from transformers import AutoModelForCausalLM

    from longkd.models import tiny_config

    config = tiny_config(
        "llama",
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_position_embeddings=max(args.window, 256),
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
    return model.float().train()


def _step_fn(
    model, opt, batch, loss_name: str, amp: torch.dtype | None, chunk_size: int | None, after_backward=None
):
    """A closure doing one full optimizer step of ``model`` (optimizer ``opt``) on ``batch``
    with the named loss; ``after_backward()`` is called between the backward and the clip."""
    from longkd.kernels.fused_linear import fused_linear_losses
    from longkd.models import lm_head_logits, logit_postprocess
    from longkd.trainer.config import LossConfig
    from longkd.trainer.losses import LossTerms, body_hidden, head_losses

    body = model.get_decoder()
    device_type = batch.input_ids.device.type
    weights = {"kd": (1.0, 0.0), "kd+ce": (1.0, 1.0), "kd-materialised": (1.0, 0.0)}
    kd_w, ce_w = weights.get(loss_name, (0.0, 1.0))
    cfg = LossConfig(kd_weight=kd_w, ce_weight=ce_w, chunk_size=chunk_size)
    terms = LossTerms.of(
        batch, cfg, mode="bucket", temperature=1.0, amp=amp, fused=loss_name != "kd-materialised"
    )

    def loss_of(hidden):
        if loss_name == "ce":  # plain LM training through the fused head: no teacher at all
            head = model.get_output_embeddings()
            h = hidden.reshape(-1, hidden.shape[-1])
            w = head.weight
            if amp is not None:
                h, w = h.to(amp), w.to(amp)
            with torch.autocast(device_type, enabled=False):
                return fused_linear_losses(
                    h,
                    w,
                    bias=head.bias,
                    targets=terms.targets,
                    kd_weight=0.0,
                    ce_weight=1.0,
                    chunk_size=chunk_size,
                    logit_postprocess=logit_postprocess(model),
                ).loss
        if loss_name == "ce-materialised":
            logits = lm_head_logits(model, hidden).reshape(terms.targets.shape[0], -1)
            return F.cross_entropy(logits.float(), terms.targets, ignore_index=-100)
        return head_losses(model, hidden, terms)[0]

    def step() -> float:
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_of(body_hidden(body, batch.input_ids, batch.position_ids))
        loss.backward()
        if after_backward is not None:
            after_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib() -> tuple[float, float]:
    """(current RSS, high-water mark) of this process in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split()[:2]
                values[key] = int(kib) / 1024
    return values["VmRSS:"], values["VmHWM:"]


def _amp(args, device) -> torch.dtype | None:
    use = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use else None


def _load_batch(cache: Path, args, device):
    """(vocab, batch on device, decode seconds per batch)."""
    from longkd.trainer.stream import WindowStream

    stream = WindowStream([str(cache)], batch_size=args.batch_size, seed=0)
    vocab = int(stream.readers[0].manifest["vocab"]["embedding_size"])
    it = iter(stream)
    decode = []
    for _ in range(args.decode_batches):
        t0 = time.perf_counter()
        batch = next(it)
        decode.append(time.perf_counter() - t0)
    return vocab, batch.to(device), decode


def peak_of(args) -> dict:
    """One path's peaks, measured in this (fresh) process; see the module docstring.

    Returns:
        ``{"path", "step_peak_mib", "fwd_bwd_peak_mib", "process_peak_mib"}``: the peak above
        the memory held before the step over the whole step, and over its forward and backward
        alone (the optimizer's own temporaries, the same for every loss, come after), and the
        process's absolute peak.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab, batch, _ = _load_batch(Path(args.cache), args, device)
    model = _student(args, vocab).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seen = {}
    if device.type == "cuda":

        def peak_now():
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) / 2**20

        def held_now():
            torch.cuda.synchronize(device)
            return torch.cuda.memory_allocated(device) / 2**20

        def reset_peak():
            torch.cuda.reset_peak_memory_stats(device)

    else:

        def peak_now():
            return _rss_mib()[1]

        def held_now():
            return _rss_mib()[0]

        def reset_peak():
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")

    step = _step_fn(
        model, opt, batch, args.peak_of, _amp(args, device), args.chunk_size,
        after_backward=lambda: seen.setdefault("fwd_bwd", peak_now()),
    )  # fmt: skip
    step()  # warm-up: allocates the AdamW state
    seen.clear()
    before = held_now()
    reset_peak()
    step()
    peak = peak_now()
    return {
        "path": args.peak_of,
        "step_peak_mib": peak - before,
        "fwd_bwd_peak_mib": seen["fwd_bwd"] - before,
        "process_peak_mib": peak,
    }


def _peaks_in_subprocesses(args, cache: Path) -> dict:
    """Each path of ``PEAK_PATHS`` in its own process, one after the other."""
    out = {}
    for path in PEAK_PATHS:
        cmd = [sys.executable, "-m", "longkd.tools.bench_train", "--peak-of", path, "--cache", str(cache)]
        for flag in ("device", "precision", "threads", "hidden", "layers", "heads", "batch_size", "attn"):
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        if args.chunk_size is not None:
            cmd += ["--chunk-size", str(args.chunk_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"peak of {path} failed:\n{proc.stderr[-2000:]}")
        out[path] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def run(args) -> dict:
    """Run the benchmark; returns a dict of results (also printed as a Markdown table)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = _amp(args, device)
    losses = args.losses.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else _make_cache(Path(tmp), args)
        vocab, batch, decode = _load_batch(cache, args, device)
        # One student and one AdamW take the steps of every loss in turn: a step's cost does not
        # depend on the weights' values, and one copy of the model and its AdamW state is what
        # lets the large shapes fit next to the materialised logits.
        model = _student(args, vocab).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps = {name: _step_fn(model, opt, batch, name, amp, args.chunk_size) for name in losses}
        times: dict[str, list[float]] = {name: [] for name in losses}
        cpu_times: dict[str, list[float]] = {name: [] for name in losses}
        first_loss = {}
        # One untimed step whatever --warmup says: it allocates the AdamW state, which would
        # otherwise land in the first timed step. Then --warmup rounds of every loss.
        first_loss[losses[0]] = steps[losses[0]]()
        for _ in range(args.warmup):
            for name in losses:  # allocator, first-call costs
                first_loss[name] = steps[name]()
        for _ in range(args.steps):
            for name in losses:  # interleaved, so load changes hit every loss alike
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                steps[name]()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
        del model, opt, steps
        peaks = {}
        if args.peak and all(p in losses for p in PEAK_PATHS):
            if device.type == "cuda":
                for path in PEAK_PATHS:
                    one = argparse.Namespace(**{**vars(args), "peak_of": path, "cache": cache})
                    peaks[path] = peak_of(one)
            else:
                peaks = _peaks_in_subprocesses(args, cache)
    tokens = args.batch_size * args.window
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "date": _dt.date.today().isoformat(),
        "platform": platform.machine(),
        "student": f"llama h{args.hidden} L{args.layers} heads{args.heads} ({args.attn}), V={vocab}",
        "vocab": vocab,
        "tokens": tokens,
        "batch": f"{args.batch_size} x {args.window}",
        "top_k": args.top_k,
        "chunk_size": args.chunk_size,
        "steps": args.steps,
        "decode_ms": 1000 * statistics.median(decode),
        "losses": {},
    }
    # Time ratios and tokens/s: on CPU from the process's CPU time, which other jobs on a
    # shared machine do not inflate (one torch thread: CPU time is the step's work); on CUDA
    # from wall time.
    clock = "step_ms" if device.type == "cuda" else "step_cpu_ms"
    for name in losses:
        result["losses"][name] = {
            "step_ms": 1000 * statistics.median(times[name]),
            "step_cpu_ms": 1000 * statistics.median(cpu_times[name]),
            "step_ms_min": 1000 * min(times[name]),
            "step_ms_max": 1000 * max(times[name]),
            "first_loss": first_loss.get(name),
            **peaks.get(name, {}),
        }
        result["losses"][name]["tokens_per_s"] = tokens / (result["losses"][name][clock] / 1000)

    def ratio(a, b, key):
        if a in result["losses"] and b in result["losses"] and key in result["losses"][b]:
            return result["losses"][a][key] / result["losses"][b][key]
        return None

    result["time_ratios_from"] = "wall time" if device.type == "cuda" else "process CPU time"
    result["kd_over_ce"] = ratio("kd", "ce", clock)
    result["kd_plus_ce_over_ce"] = ratio("kd+ce", "ce", clock)
    result["fused_over_materialized_time"] = ratio("kd", "kd-materialised", clock)
    result["kd_over_ce_wall"] = ratio("kd", "ce", "step_ms")
    result["fused_over_materialized_time_wall"] = ratio("kd", "kd-materialised", "step_ms")
    result["fused_peak_over_materialized_peak"] = ratio("kd", "kd-materialised", "step_peak_mib")
    result["fused_fwd_bwd_peak_over_materialized_fwd_bwd_peak"] = ratio(
        "kd", "kd-materialised", "fwd_bwd_peak_mib"
    )
    result["fused_process_peak_over_materialized_process_peak"] = ratio(
        "kd", "kd-materialised", "process_peak_mib"
    )
    return result


def to_markdown(r: dict) -> str:
    ce = r["losses"].get("ce", {}).get("step_cpu_ms")
    lines = [
        "| loss | wall ms (median) | min-max | CPU ms (median) | tokens/s | CPU vs ce "
        "| step peak (fwd+bwd) | process peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in r["losses"].items():
        vs = f"{m['step_cpu_ms'] / ce:.2f}x" if ce else ""
        step_peak = (
            f"{m['step_peak_mib']:,.0f} MiB ({m['fwd_bwd_peak_mib']:,.0f})" if "step_peak_mib" in m else ""
        )
        proc_peak = f"{m['process_peak_mib']:,.0f} MiB" if "process_peak_mib" in m else ""
        lines.append(
            f"| {name} | {m['step_ms']:,.0f} | {m['step_ms_min']:,.0f}-{m['step_ms_max']:,.0f} "
            f"| {m['step_cpu_ms']:,.0f} | {m['tokens_per_s']:,.0f} | {vs} | {step_peak} | {proc_peak} |"
        )
    lines.append(f"| (cache decode, per batch) | {r['decode_ms']:.1f} | | | | | | |")
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
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="the student's attention")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=None, help="loss.chunk_size (default: automatic)")
    p.add_argument(
        "--losses", default=",".join(LOSSES), help=f"a comma-separated subset of {', '.join(LOSSES)}"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per loss")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds of every loss (after one step)")
    p.add_argument("--decode-batches", type=int, default=3)
    p.add_argument("--no-peak", dest="peak", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--peak-of", choices=LOSSES, help=argparse.SUPPRESS)  # one subprocess's path
    args = p.parse_args(argv)
    unknown = set(args.losses.split(",")) - set(LOSSES)
    if unknown:
        p.error(f"--losses: unknown {', '.join(sorted(unknown))}; choose from {', '.join(LOSSES)}")
    if args.peak_of:
        args.decode_batches = 1
        print(json.dumps(peak_of(args)))
        return 0
    r = run(args)
    print(
        f"{r['device']} ({r['platform']}, {r['threads']} threads), {r['date']}: student {r['student']}, "
        f"batch {r['batch']} tokens, cache top-k {r['top_k']}"
    )
    print(to_markdown(r))
    for key in ("kd_over_ce", "fused_over_materialized_time", "fused_peak_over_materialized_peak"):
        if r.get(key) is not None:
            print(f"{key}: {r[key]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
