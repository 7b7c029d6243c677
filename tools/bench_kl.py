"""Benchmark the sparse-KL kernel (fused forward + backward) against torch, on a CUDA device.

Why it exists: the loss is memory bound, so its yardstick is bandwidth. For each shape this
measures the CuPy kernel's forward + backward time, the bytes it must move (logits read
twice, gradient written once, plus the small per-row inputs), and that over the device-to-
device copy bandwidth measured in the same run; beside it the eager torch reference and a
torch.compile'd dense version; and for the fused LM head path its peak extra memory against
materialising the logits, and its time against its own matmuls plus the kernel.

    python -m longkd.tools.bench_kl                  # full grid, markdown table on stdout
    python -m longkd.tools.bench_kl --quick --json out.json

Exits with status 2 and a one-line message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

GRID_N = (4096, 16384)
GRID_V = (32000, 152064)
GRID_K = (16, 64, 256)


def bench(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` with CUDA events (triton.testing.do_bench if present)."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception:  # triton missing or too old for return_mode: our own events loop
        pass
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_targets(N, V, K, g):
    """Random cache-like targets: distinct ids per row (duplicates padded), P_K = e^-0.3."""
    ids = torch.randint(0, V, (N, K), device="cuda", generator=g).sort(dim=1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    ids = torch.where(dup, torch.full_like(ids, -1), ids)
    tlp = torch.log_softmax(torch.randn(N, K, device="cuda", generator=g), -1) - 0.3
    tlp = torch.where(ids >= 0, tlp, torch.full_like(tlp, float("-inf")))
    return ids, tlp


def make_inputs(N, V, K, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(N, V, device="cuda", dtype=dtype, generator=g) * 3
    return (logits, *make_targets(N, V, K, g))


def kernel_bytes(N, V, K, elem) -> int:
    """Bytes the two-pass kernel must move: logits read twice, grad written once, inputs twice."""
    return 3 * N * V * elem + 2 * N * K * (8 + 4) + 2 * N * 3 * 4


def dense_bucket(logits, ids, tlp):
    """Dense bucket loss on the full vocabulary (the torch.compile contender)."""
    logq = torch.log_softmax(logits.float(), -1)
    valid = ids >= 0
    t = torch.where(valid, tlp, torch.zeros_like(tlp))
    p = torch.where(valid, t.exp(), torch.zeros_like(t))
    logq_k = logq.gather(1, ids.clamp_min(0))
    Q = torch.where(valid, logq_k.exp(), torch.zeros_like(logq_k)).sum(1)
    r = (1 - p.sum(1)).clamp_min(0)
    rows = (p * (t - logq_k)).sum(1) + torch.xlogy(r, r) - r * torch.log1p(-Q.clamp(max=1 - 1e-7))
    return rows.mean()


def _peak_extra(fn) -> tuple[float, float]:
    """(median ms, peak memory above the starting allocation in GB) of fn()."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return bench(fn, reps=5), peak


def _try(fn, what: str):
    """fn(), or None (shown as "-") when it runs out of memory or fails to compile."""
    try:
        return fn()
    except Exception as exc:  # a contender failing must not lose the kernel's numbers
        print(f"bench_kl: {what} failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        torch.cuda.empty_cache()
        return None


def bench_loss(N, V, K, bw, quick):
    logits, ids, tlp = make_inputs(N, V, K)
    ms_kernel = _kernel_ms(logits, ids, tlp)
    moved = kernel_bytes(N, V, K, logits.element_size())
    row = {
        "N": N,
        "V": V,
        "k": K,
        "kernel_ms": ms_kernel,
        "GB_moved": moved / 1e9,
        "kernel_GBps": moved / (ms_kernel * 1e-3) / 1e9,
    }
    row["pct_of_copy_bw"] = 100 * row["kernel_GBps"] / bw
    if not quick:
        try:
            from longkd.kernels.reference import sparse_kl_reference
        except ImportError:
            sparse_kl_reference = None

        def eager():
            leaf = logits.detach().requires_grad_(True)
            sparse_kl_reference(leaf, ids, tlp, mode="bucket").backward()

        compiled = torch.compile(dense_bucket)

        def dense():
            leaf = logits.detach().requires_grad_(True)
            compiled(leaf, ids, tlp).backward()

        row["eager_ref_ms"] = (
            _try(lambda: bench(eager, reps=5), f"eager reference N={N} V={V} k={K}")
            if sparse_kl_reference
            else None
        )
        row["compiled_dense_ms"] = _try(
            lambda: bench(dense, reps=5), f"torch.compile dense N={N} V={V} k={K}"
        )
    return row


def _kernel_ms(logits, ids, tlp) -> float:
    """Kernel forward + backward alone on given logits (fresh gradient buffer)."""
    from longkd.kernels import cupy_kl

    grad = torch.empty_like(logits)
    scale = torch.full((1,), 1.0 / logits.shape[0], device="cuda")

    def kernel():
        _, stats = cupy_kl.launch_forward(logits, ids, tlp, None, mode="bucket", temperature=1.0)
        cupy_kl.launch_backward(logits, ids, tlp, None, stats, grad, scale, temperature=1.0)

    return bench(kernel)


def bench_fused_linear(N, V, d, K):
    from longkd.kernels import cupy_kl
    from longkd.kernels.fused_linear import fused_linear_sparse_kl

    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    weight = (torch.randn(V, d, device="cuda", dtype=torch.bfloat16, generator=g) / d**0.5).requires_grad_(
        True
    )
    ids, tlp = make_targets(N, V, K, g)

    def fused():
        hidden.grad = weight.grad = None
        fused_linear_sparse_kl(hidden, weight, ids, tlp).backward()

    def materialised():
        hidden.grad = weight.grad = None
        cupy_kl.sparse_kl_cupy(hidden @ weight.t(), ids, tlp).backward()

    def matmuls_only():
        z = hidden.detach() @ weight.detach().t()
        _ = z @ weight.detach()
        _ = z.t() @ hidden.detach()

    ms_parts = bench(matmuls_only, reps=5) + _kernel_ms(hidden.detach() @ weight.detach().t(), ids, tlp)
    torch.cuda.empty_cache()  # the logits above are gone before the peak-memory runs
    ms_fused, mem_fused = _peak_extra(fused)
    res = _try(lambda: _peak_extra(materialised), f"materialised logits N={N} V={V}")
    ms_mat, mem_mat = res if res is not None else (None, None)
    return {
        "N": N,
        "V": V,
        "d": d,
        "k": K,
        "fused_ms": ms_fused,
        "matmuls+kernel_ms": ms_parts,
        "materialised_ms": ms_mat,
        "fused_peak_GB": mem_fused,
        "materialised_peak_GB": mem_mat,
    }


def markdown(rows) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [
            ("-" if r.get(k) is None else f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]))
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="kernel only, N=4096, no torch contenders")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--hidden", type=int, default=2048, help="d for the fused-linear rows")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kl: no CUDA device here; run it on a GPU machine (see docs/kernels.md)", file=sys.stderr)
        return 2
    from longkd.kernels import cupy_kl

    if not cupy_kl.is_available():
        print(f"bench_kl: CuPy kernel unavailable: {cupy_kl.unavailable_reason()}", file=sys.stderr)
        return 2
    cupy_kl.warmup((torch.bfloat16,))
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  measured copy bandwidth: {bw:.0f} GB/s\n")
    grid_n = GRID_N[:1] if args.quick else GRID_N
    loss_rows = [bench_loss(N, V, K, bw, args.quick) for N in grid_n for V in GRID_V for K in GRID_K]
    print("### sparse KL, bf16, forward + backward\n")
    print(markdown(loss_rows) + "\n")
    fused_rows = []
    if not args.quick:
        fused_rows = [bench_fused_linear(N, V, args.hidden, 64) for N in GRID_N for V in GRID_V]
        print(f"### fused LM head + sparse KL, bf16, d={args.hidden}, k=64\n")
        print(markdown(fused_rows) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_GBps": bw, "loss": loss_rows, "fused_linear": fused_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
