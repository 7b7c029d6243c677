"""CPU benchmark of the chunked torch sparse-KL loss against a dense eager implementation.

Why it exists: the reference's promise is memory, not speed: it never builds an fp32 [N, V]
tensor. This measures both on CPU, each variant in a fresh subprocess so the peak resident
memory (ru_maxrss) above the inputs is the variant's own: forward + backward of the bucket
loss on bf16 logits.

    python -m longkd.tools.bench_loss_cpu                      # N=1024, V=32000, K=64
    python -m longkd.tools.bench_loss_cpu --n 2048 --v 50000 --chunk 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _inputs(n, v, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * 3).bfloat16()
    # Top-k of a random teacher, built in row blocks so the builder itself stays small.
    ids, tlp = [], []
    for s in range(0, n, 128):
        lp = torch.log_softmax(torch.randn(min(128, n - s), v, generator=gen) * 2, -1)
        t, i = lp.topk(k, -1)
        ids.append(i)
        tlp.append(t)
    return logits, torch.cat(ids), torch.cat(tlp)


def dense_bucket(logits, ids, tlp):
    """The bucket loss written densely: fp32 log_softmax over the whole [N, V] at once."""
    logq = torch.log_softmax(logits.float(), -1)
    lq = logq.gather(1, ids)
    p = tlp.exp()
    r = (1 - p.sum(1)).clamp_min(0)
    tail = torch.log1p(-lq.exp().sum(1).clamp_max(1 - 1e-7))
    rows = (p * (tlp - lq)).sum(1) + torch.xlogy(r, r) - r * tail
    return rows.mean()


def _maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_one(variant, n, v, k, chunk, reps):
    """Time and peak memory of one variant in this process; prints one JSON line."""
    torch.set_num_threads(1)
    from longkd.kernels.reference import sparse_kl_reference

    logits, ids, tlp = _inputs(n, v, k)
    base = _maxrss_mb()

    def step():
        leaf = logits.detach().requires_grad_(True)
        if variant == "reference":
            loss = sparse_kl_reference(leaf, ids, tlp, mode="bucket", chunk_size=chunk)
        else:
            loss = dense_bucket(leaf, ids, tlp)
        loss.backward()
        return loss.item()

    loss = step()  # warm-up (and the peak: later steps reuse freed memory)
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    ms = (time.perf_counter() - t0) / reps * 1e3
    row = dict(variant=variant, N=n, V=v, K=k, chunk=chunk, ms=round(ms, 1), loss=round(loss, 6))
    row["peak_extra_MB"] = round(_maxrss_mb() - base, 1)
    row["logits_bf16_MB"] = round(n * v * 2 / 2**20, 1)
    print(json.dumps(row))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--one", choices=["reference", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(args.one, args.n, args.v, args.k, args.chunk, args.reps)
        return 0
    for variant in ("reference", "dense"):
        cmd = [sys.executable, "-m", "longkd.tools.bench_loss_cpu", "--one", variant]
        cmd += ["--n", str(args.n), "--v", str(args.v), "--k", str(args.k)]
        cmd += ["--chunk", str(args.chunk), "--reps", str(args.reps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
