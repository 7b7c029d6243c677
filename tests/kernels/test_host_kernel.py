"""The CUDA sparse-KL kernel executed on the CPU, line by line, through the launcher's own code.

kernels/sparse_kl.cu is compiled by g++ against kernels/host/cuda_host.h (every CUDA thread a
real OS thread, __syncthreads a real barrier, warp shuffles exchanged among a warp's 32 threads,
static and dynamic shared memory per block) and launched by kernels/cupy_kl.py through the CuPy
stand-in kernels/host/cupy_host.py, which packs the arguments as CuPy does and checks them
against the kernel's C signature. Against the torch reference (kernels/reference.py):

- every launch pattern (forward; backward into another buffer and in place; forward writing
  the gradient) for fp32 / bf16 / fp16 logits x bucket / renorm / sampled, with V not a
  multiple of 8, rows that start off a 16-byte boundary (views into a larger buffer whose
  sentinels must survive), padding, ids >= V, masked rows, T != 1 and a per-row grad_output;
- autograd through ``sparse_kl(impl="cupy")`` for mean / sum / none, in place or not;
- every block size the launcher can choose (and the kernel's 32 to 1024), K = 1 and the
  largest K, a student with almost all its mass on K, the fused-linear path;
- the self-check, passing on the real kernel and failing (warning, falling back to the
  reference) on a kernel with one index shifted.

Every concurrent case runs several times with different thread interleavings (one thread per
block lags until the others block; others yield at random); the kernel's reductions are
ordered, so any difference between runs is a race. The host model itself is tested on small
kernels: indices, shuffles, a missing barrier showing as a race, barriers in divergent code,
misaligned vector loads, shared memory overflow, argument packing, and the bf16 / fp16
conversions bit for bit against torch.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from longkd.errors import LongkdError
from longkd.kernels import cupy_kl
from longkd.kernels.host.build import HostKernelError
from longkd.kernels.host.cupy_host import HostExecution, use_host_execution
from longkd.kernels.reference import sparse_kl_reference
from longkd.kernels.sparse_kl import resolve_impl, sparse_kl
from tests.kernels.test_fused_linear import make_case, make_targets, run_both

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the host kernel build needs g++")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("bucket", "renorm", "sampled")
REPEATS = 3
SENTINEL = -77.0  # exact in every logits dtype; must survive around every buffer a kernel writes
# Host-build error bounds per logits dtype, as data: (loss atol, loss rtol, gradient error
# relative to the reference's largest |gradient|). The host computes exp with libm and the
# same fp32 summation order as the GPU, so the loss agrees to a few fp32 ulps; the gradient is
# rounded once to the logits' dtype (unit roundoff 2^-24, 2^-8, 2^-11).
TOLERANCES = {
    torch.float32: (2e-6, 2e-6, 1e-5),
    torch.bfloat16: (2e-6, 2e-6, 4e-3),
    torch.float16: (2e-6, 2e-6, 1e-3),
}


@pytest.fixture(scope="module")
def host():
    with use_host_execution() as h:
        yield h


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def guarded(values: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` copied into a contiguous view that starts ``offset`` elements into a larger
    buffer filled with SENTINEL (so the rows start off 16-byte boundaries for odd offsets)."""
    N, V = values.shape
    arena = torch.full((offset + N * V + 24,), SENTINEL, dtype=values.dtype)
    view = arena[offset : offset + N * V].view(N, V)
    view.copy_(values)
    return view, arena


def assert_sentinels(arena: torch.Tensor, view: torch.Tensor) -> None:
    start = view.storage_offset()
    outside = torch.cat([arena[:start], arena[start + view.numel() :]])
    assert (outside == SENTINEL).all(), "a kernel wrote outside its [N, V] buffer"


def random_problem(N, V, K, mode, dtype, seed, *, big_ids=True, scale=3.0):
    """Logits, targets as a cache gives them (padding included), ids >= V mixed in (the kernel
    treats them as padding), a mask with a False row holding a large logit, a per-row
    grad_output."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=gen) * scale).to(dtype)
    ids, tlp = make_targets(N, V, K, mode, gen)
    if big_ids and mode != "sampled":  # sampled rows must keep summing to 1
        big = (torch.rand(N, K, generator=gen) < 0.15) & (ids >= 0)
        ids = torch.where(big, V + torch.randint(0, 5, (N, K), generator=gen), ids)
    mask = torch.ones(N, dtype=torch.bool)
    mask[N // 2] = False
    logits[N // 2, 1] = 100.0  # a masked row must give zeros, not exp(100 / T) * 0 = NaN
    row_scale = torch.rand(N, generator=gen) + 0.5
    return logits, ids, tlp, mask, row_scale


def reference(logits, ids, tlp, mask, row_scale, *, mode, temperature):
    """Reference per-row loss and gradient of sum(row_scale * rows) on the fp32 logits; ids >= V
    become padding, as the kernel treats them."""
    V = logits.shape[1]
    big = ids >= V
    ids = ids.masked_fill(big, -1)
    tlp = tlp.masked_fill(big, float("-inf"))
    leaf = logits.detach().float().requires_grad_(True)
    rows = sparse_kl_reference(
        leaf, ids, tlp, mode=mode, temperature=temperature, mask=mask, reduction="none"
    )
    rows.backward(row_scale.expand_as(rows))
    return rows.detach(), leaf.grad


def loss_error(got, want) -> float:
    return float((got - want).abs().max())


def grad_error(got, want) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


def assert_matches(dtype, loss, grads, ref_rows, ref_grad, what=""):
    loss_atol, loss_rtol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        loss, ref_rows, atol=loss_atol, rtol=loss_rtol, msg=lambda m: f"{what} loss {m}"
    )
    for name, g in grads.items():
        assert g.dtype == dtype
        err = grad_error(g, ref_grad)
        assert err <= grad_tol, f"{what} {name}: gradient error {err:.2e} > {grad_tol:.0e}"


def run_launches(logits, ids, tlp, mask, row_scale, *, mode, temperature, offset):
    """Every launch pattern once: forward; backward into a buffer of another alignment; backward
    in place over a copy of the logits; forward writing the gradient. Sentinels checked."""
    loss, stats = cupy_kl.launch_forward(logits, ids, tlp, mask, mode=mode, temperature=temperature)
    apart, apart_arena = guarded(torch.zeros_like(logits), offset + 1)  # other alignment
    cupy_kl.launch_backward(logits, ids, tlp, mask, stats, apart, row_scale, temperature=temperature)
    inplace, inplace_arena = guarded(logits, offset)
    cupy_kl.launch_backward(inplace, ids, tlp, mask, stats, inplace, row_scale, temperature=temperature)
    fused, fused_arena = guarded(torch.zeros_like(logits), offset)  # same alignment: 16-byte stores
    loss2, _ = cupy_kl.launch_forward(
        logits, ids, tlp, mask, mode=mode, temperature=temperature, grad=fused, grad_scale=row_scale
    )
    for view, arena in ((apart, apart_arena), (inplace, inplace_arena), (fused, fused_arena)):
        assert_sentinels(arena, view)
    return loss, loss2, stats, {"backward": apart, "backward in place": inplace, "forward with grad": fused}


def assert_repeats_identical(runs):
    first = runs[0]
    for i, run in enumerate(runs[1:], 1):
        for a, b in zip(first, run):
            pairs = zip(a.values(), b.values()) if isinstance(a, dict) else [(a, b)]
            for x, y in pairs:
                assert torch.equal(x, y), f"run {i} differs from run 0: a race in the kernel"


# --------------------------------------------------------------------------------------------
# the kernel against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_launches_match_reference(host, dtype, mode):
    seed = 11 * DTYPES.index(dtype) + MODES.index(mode)
    V = (1003, 301, 97)[seed % 3]  # odd: row starts alternate in alignment; ragged tails
    N, K, T, offset = 4, 7, 0.7, 1 + seed % 3
    logits, ids, tlp, mask, row_scale = random_problem(N, V, K, mode, dtype, seed)
    logits, logits_arena = guarded(logits, offset)
    ref_rows, ref_grad = reference(logits, ids, tlp, mask, row_scale, mode=mode, temperature=T)
    runs = []
    for _ in range(REPEATS):
        loss, loss2, stats, grads = run_launches(
            logits, ids, tlp, mask, row_scale, mode=mode, temperature=T, offset=offset
        )
        assert_matches(dtype, loss, grads, ref_rows, ref_grad, f"{dtype} {mode}")
        assert torch.equal(loss, loss2)
        for g in grads.values():
            assert (g[~mask] == 0).all()
        runs.append((loss, stats, grads))
    assert_repeats_identical(runs)
    assert_sentinels(logits_arena, logits)
    assert (runs[0][0][~mask] == 0).all() and (runs[0][0][mask] > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace", [False, True])
def test_autograd_through_sparse_kl(host, reduction, inplace):
    dtype = DTYPES[(len(reduction) + inplace) % 3]
    N, V, K, T = 5, 257, 6, 1.6
    logits, ids, tlp, mask, _ = random_problem(N, V, K, "bucket", dtype, seed=len(reduction), big_ids=False)
    gen = torch.Generator().manual_seed(3)
    g = torch.rand(N, generator=gen) + 0.5 if reduction == "none" else torch.tensor(0.37)
    launches = host.launches
    results = []
    for _ in range(2):
        x = logits.clone().requires_grad_(True)
        z = x * 1  # a non-leaf, as the LM head's output is
        if inplace:
            out = cupy_kl.sparse_kl_cupy(
                z, ids, tlp, temperature=T, mask=mask, reduction=reduction, inplace_grad=True
            )
        else:
            out = sparse_kl(z, ids, tlp, temperature=T, mask=mask, reduction=reduction, impl="cupy")
        out.backward(g)
        results.append((out.detach(), x.grad))
        if inplace:
            assert torch.equal(z.detach(), x.grad)  # the gradient was written over the logits
    assert host.launches >= launches + 4  # forward and backward ran on the kernel, twice
    leaf = logits.float().requires_grad_(True)
    ref = sparse_kl_reference(leaf, ids, tlp, temperature=T, mask=mask, reduction=reduction)
    ref.backward(g)
    loss_atol, loss_rtol, grad_tol = TOLERANCES[dtype]
    for out, grad in results:
        torch.testing.assert_close(out, ref, atol=loss_atol, rtol=loss_rtol)
        assert grad.dtype == dtype and grad_error(grad, leaf.grad) <= grad_tol
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_launcher_block_sizes():
    assert [cupy_kl._threads(V) for V in (1, 8191, 8192, 65535, 65536, 152064)] == [
        128,
        128,
        256,
        256,
        512,
        512,
    ]


@pytest.mark.parametrize("threads", [32, 128, 256, 512, 1024])
def test_every_block_size(host, monkeypatch, threads):
    """The launcher picks 128, 256 or 512 threads by V; the kernel claims any multiple of 32 up to
    1024. Forced here on a small V, so that every size runs in seconds."""
    monkeypatch.setattr(cupy_kl, "_threads", lambda V: threads)
    dtype = torch.bfloat16 if threads in (128, 512) else torch.float16
    N, V, K, T = 2, 2051, 16, 1.3
    logits, ids, tlp, mask, row_scale = random_problem(N, V, K, "renorm", dtype, seed=threads)
    mask[:] = True
    logits, _ = guarded(logits, 3)
    ref_rows, ref_grad = reference(logits, ids, tlp, mask, row_scale, mode="renorm", temperature=T)
    runs = []
    for _ in range(2):
        grad, _ = guarded(torch.zeros_like(logits), 3)
        loss, _ = cupy_kl.launch_forward(
            logits, ids, tlp, mask, mode="renorm", temperature=T, grad=grad, grad_scale=row_scale
        )
        assert_matches(dtype, loss, {"forward with grad": grad}, ref_rows, ref_grad, f"{threads} threads")
        runs.append((loss, grad))
    assert_repeats_identical(runs)


def test_k_one_and_the_largest_k(host):
    """K = 1, and K = MAX_K, where the forward's dynamic shared memory (4 K bytes) plus its static
    block-reduction scratch fill the 48 KiB a block may use without opting in."""
    for K, V in ((1, 515), (cupy_kl.MAX_K, cupy_kl.MAX_K + 5)):
        logits, ids, tlp, mask, row_scale = random_problem(
            2, V, K, "bucket", torch.float32, seed=K, big_ids=False
        )
        ref_rows, ref_grad = reference(logits, ids, tlp, mask, row_scale, mode="bucket", temperature=1.0)
        loss, stats = cupy_kl.launch_forward(logits, ids, tlp, mask, mode="bucket", temperature=1.0)
        grad = torch.empty_like(logits)
        cupy_kl.launch_backward(logits, ids, tlp, mask, stats, grad, row_scale, temperature=1.0)
        assert_matches(torch.float32, loss, {"backward": grad}, ref_rows, ref_grad, f"K={K}")
    fwd = cupy_kl._function(None, "fwd", torch.float32)
    assert fwd.shared_size_bytes == cupy_kl.FWD_STATIC_SHARED_BYTES  # measured, as ptxas reports it
    assert (
        4 * cupy_kl.MAX_K + fwd.shared_size_bytes
        <= 48 * 1024
        < 4 * (cupy_kl.MAX_K + 1) + fwd.shared_size_bytes
    )


def test_k_over_the_shared_memory_limit_is_refused(host):
    """The 48 KiB limit holds static and dynamic shared memory together: K = 12288 (48 KiB of
    dynamic memory, the launcher's earlier limit) cannot launch, and the launcher refuses it."""
    K = 48 * 1024 // 4
    logits, ids, tlp, _, _ = random_problem(1, K + 1, K, "bucket", torch.float32, seed=5, big_ids=False)
    with pytest.raises(HostKernelError, match="CUDA_ERROR_INVALID_VALUE"):
        cupy_kl.launch_forward(logits, ids, tlp, None, mode="bucket", temperature=1.0)
    with pytest.raises(LongkdError, match="exceeds the kernel's limit"):
        cupy_kl.sparse_kl_cupy(logits, ids, tlp)
    assert resolve_impl("auto", logits, K) == "reference"


def test_student_with_almost_all_mass_on_k(host):
    """The bucket tail needs log(1 - Q). The kernel forms 1 - Q from the fp32 sum of the K student
    probabilities, so it carries an absolute error of a few K * 2^-24, and clamps it at
    LONGKD_ONE_MINUS_Q_FLOOR (1e-7); the reference takes the complement's logsumexp, exact. So:
    with 1 - Q well above that error the two agree; near it the loss error is about
    r * K * 2^-24 / (1 - Q); below it the kernel's tail term is capped (finite, smaller than the
    true one). The K entries' gradient q_i - p_i stays right throughout."""
    N, V, K = 3, 203, 8
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(N, V, generator=gen)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])
    boost = torch.tensor([9.0, 14.0, 40.0])  # 1 - Q: 2.5e-3, 2.9e-5, ~1e-16
    logits.scatter_add_(1, ids, boost[:, None].expand(N, K).contiguous())
    r = 0.2
    tlp = torch.log(torch.full((N, K), (1 - r) / K))  # the teacher leaves r off K
    loss, stats = cupy_kl.launch_forward(logits, ids, tlp, None, mode="bucket", temperature=1.0)
    grad = torch.empty_like(logits)
    cupy_kl.launch_backward(logits, ids, tlp, None, stats, grad, torch.ones(N), temperature=1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.isfinite(stats).all()
    ref_rows, ref_grad = reference(logits, ids, tlp, None, torch.ones(N), mode="bucket", temperature=1.0)
    z = logits.double()
    one_minus_q = 1 - (z.gather(1, ids) - torch.logsumexp(z, 1, keepdim=True)).exp().sum(1)
    assert abs(float(loss[0] - ref_rows[0])) < 2e-5 and grad_error(grad[0], ref_grad[0]) < 1e-5
    assert abs(float(loss[1] - ref_rows[1])) < r * 4 * K * 2.0**-24 / float(one_minus_q[1])
    assert float(loss[2]) < float(ref_rows[2])  # capped: r (log r - log 1e-7) at most in the tail
    torch.testing.assert_close(grad.gather(1, ids), ref_grad.gather(1, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("post", [None, "softcap"])
def test_fused_linear_with_the_kernel_as_chunk_loss(host, post):
    dtype = torch.float32 if post is None else torch.bfloat16
    hidden, weight, bias, ids, tlp, mask = make_case(11, 16, 301, 8, "bucket", seed=4, dtype=dtype)
    fn = None if post is None else (lambda z: 30.0 * torch.tanh(z / 30.0))
    reduction = "mean" if post is None else "none"
    grad_out = (
        torch.tensor(1.7)
        if reduction == "mean"
        else torch.rand(11, generator=torch.Generator().manual_seed(1))
    )
    launches = host.launches
    fused, unfused = run_both(
        hidden, weight, bias, ids, tlp, mode="bucket", temperature=1.3, mask=mask, reduction=reduction,
        grad_out=grad_out, post=fn, loss_impl=cupy_kl.loss_and_grad_chunk, chunk_size=4,
    )  # fmt: skip
    assert host.launches > launches
    # fp32: the kernel's rounding; bf16: logits and dZ rounded to bf16 per chunk
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 3e-2)
    for name, a, b in zip(("loss", "dX", "dW", "db"), fused, unfused):
        scale = b.abs().max().item() if b.dim() else 1.0
        torch.testing.assert_close(
            a.float(), b.float(), atol=atol * scale, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_dispatch_runs_the_kernel_under_host_execution(host):
    logits, ids, tlp, mask, _ = random_problem(3, 130, 5, "renorm", torch.float16, seed=2, big_ids=False)
    assert resolve_impl("auto", logits, 5) == "cupy"
    launches = host.launches
    got = sparse_kl(logits, ids, tlp, mode="renorm", mask=mask)
    assert host.launches == launches + 1
    want = sparse_kl_reference(logits, ids, tlp, mode="renorm", mask=mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    assert resolve_impl("auto", logits.double(), 5) == "reference"
    with pytest.raises(LongkdError, match="float32, bfloat16 or float16"):
        cupy_kl.sparse_kl_cupy(logits.double(), ids, tlp)


# --------------------------------------------------------------------------------------------
# the self-check
# --------------------------------------------------------------------------------------------


def test_self_check_passes_on_the_kernel(host):
    for dtype in DTYPES:
        check = cupy_kl.self_check(dtype)
        assert check.passed, check.describe()
        assert check.loss_error < 1e-5 and check.grad_error < cupy_kl.SELF_CHECK_TOLERANCES[dtype][1] / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cupy_kl.warmup()  # compiles and checks every dtype ahead of time
    launches = host.launches
    for dtype in DTYPES:
        assert cupy_kl.ready_for(torch.zeros(1, 8, dtype=dtype))
    assert host.launches == launches  # each dtype is checked once per process


def test_a_wrong_kernel_fails_its_self_check_and_the_reference_takes_over(tmp_path, monkeypatch):
    """One index shifted in the forward (log q of the previous K entry): the first use warns once,
    naming the error size; the dispatcher and the fused path then use the reference, and asking
    for the kernel explicitly is an error."""
    source = cupy_kl.SOURCE_PATH.read_text()
    assert source.count("const float logq = zK[k] - lse;") == 1
    wrong = tmp_path / "sparse_kl_wrong.cu"
    wrong.write_text(
        source.replace("const float logq = zK[k] - lse;", "const float logq = zK[k > 0 ? k - 1 : 0] - lse;")
    )
    monkeypatch.setattr(cupy_kl, "SOURCE_PATH", wrong)
    logits, ids, tlp, mask, _ = random_problem(3, 97, 4, "bucket", torch.float32, seed=6, big_ids=False)
    want = sparse_kl_reference(logits, ids, tlp, mask=mask)
    with use_host_execution() as host:
        with pytest.warns(
            RuntimeWarning, match=r"failed its self-check .*largest loss error \d\.\d\de[-+]\d\d"
        ) as seen:
            got = sparse_kl(logits, ids, tlp, mask=mask)
        assert len(seen) == 1
        assert torch.equal(got, want)  # the reference ran
        launches = host.launches
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once: no second warning
            assert torch.equal(sparse_kl(logits, ids, tlp, mask=mask), want)
            rows, _ = cupy_kl.loss_and_grad_chunk(
                logits.clone(), ids, tlp, mask, mode="bucket", temperature=1.0
            )
        assert host.launches == launches  # nothing launched after the failed check
        torch.testing.assert_close(rows.sum() / mask.sum(), want)
        with pytest.raises(LongkdError, match="self-check failed"):
            sparse_kl(logits, ids, tlp, mask=mask, impl="cupy")


# --------------------------------------------------------------------------------------------
# argument packing as CuPy does it, checked against the C signature
# --------------------------------------------------------------------------------------------


def test_arguments_must_match_the_signature(host):
    logits, ids, tlp, _, _ = random_problem(2, 33, 3, "bucket", torch.float32, seed=1, big_ids=False)
    loss, stats = torch.empty(2), torch.empty(2, 3)
    fn = cupy_kl._function(None, "fwd", torch.float32)
    good = cupy_kl._row_args(logits, ids, tlp, None, 1.0) + (
        np.int32(0),
        cupy_kl._ptr(loss),
        cupy_kl._ptr(stats),
        cupy_kl._ptr(None),
        cupy_kl._ptr(None),
        np.int64(0),
    )
    fn((2,), (64,), good, shared_mem=12)
    for index, bad, what in (
        (
            4,
            np.int64(33),
            r"argument 4 \(int V\) takes 4 bytes of signed integer, got numpy.int64 \(8 bytes\)",
        ),
        (
            6,
            1.0,
            r"argument 6 \(float inv_T\) takes 4 bytes of floating point, got builtins.float \(8 bytes\)",
        ),
        (12, np.int32(0), r"argument 12 \(long long scale_stride\) takes 8 bytes"),
        (0, np.float64(0), r"argument 0 \(const F32::S\* logits\) takes 8 bytes of pointer"),
    ):
        args = list(good)
        args[index] = bad
        with pytest.raises(TypeError, match=what):
            fn((2,), (64,), tuple(args), shared_mem=12)
    with pytest.raises(TypeError, match="takes 13 arguments, got 12"):
        fn((2,), (64,), good[:-1])
    with pytest.raises(TypeError, match="Unsupported type"):
        fn((2,), (64,), good[:-1] + ("0",))
    with pytest.raises(HostKernelError, match="CUDA_ERROR_INVALID_VALUE"):
        fn((2,), (2048,), good)
    with pytest.raises(HostKernelError, match="CUDA_ERROR_NOT_FOUND"):
        cupy_kl._module(None).get_function("sparse_kl_fwd_f64")


# --------------------------------------------------------------------------------------------
# the host model itself, on small kernels
# --------------------------------------------------------------------------------------------

MODEL_SOURCE = r"""
extern "C" __global__ void indices(int* out) {
    const int n = blockDim.x * blockDim.y * blockDim.z;
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    out[b * n + t] = 1000 * b + t;
}

extern "C" __global__ void shuffles(const float* in, float* out) {
    const int t = threadIdx.x;
    const float v = in[t];
    out[4 * t + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 3);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, 7);
}

extern "C" __global__ void neighbour(int* out, int with_barrier) {
    __shared__ int s[1024];
    s[threadIdx.x] = threadIdx.x;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void divergent_barrier(int* out) {
    if (threadIdx.x < 40) __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void two_barriers(int* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

extern "C" __global__ void half_warp_shuffle(float* out) {
    if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void all_shuffle(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void misaligned(const unsigned char* in, unsigned int* out, int offset) {
    const uint4 v = *reinterpret_cast<const uint4*>(in + offset);
    out[threadIdx.x] = v.x;
}

extern "C" __global__ void dynamic_shared(float* out, int n) {
    LONGKD_DYNAMIC_SHARED(float, buf);
    if (threadIdx.x == 0) buf[n] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = buf[0];
}

extern "C" __global__ void scalars(signed char c, short h, int i, long long q, unsigned int u,
                                   unsigned long long w, float f, double d, const void* p,
                                   unsigned char* out) {
    if (threadIdx.x != 0) return;
    unsigned char* o = out;
    memcpy(o, &c, 1); memcpy(o + 8, &h, 2); memcpy(o + 16, &i, 4); memcpy(o + 24, &q, 8);
    memcpy(o + 32, &u, 4); memcpy(o + 40, &w, 8); memcpy(o + 48, &f, 4); memcpy(o + 56, &d, 8);
    memcpy(o + 64, &p, 8);
}

extern "C" __global__ void convert(const float* x, unsigned short* bf16, unsigned short* f16,
                                   const unsigned short* h, float* widened, int n) {
    for (int i = threadIdx.x + blockIdx.x * blockDim.x; i < n; i += blockDim.x * gridDim.x) {
        bf16[i] = cvt_rn_bf16_f32(x[i]);
        f16[i] = cvt_rn_f16_f32(x[i]);
        widened[i] = cvt_f32_f16(h[i]);
    }
}
"""


@pytest.fixture(scope="module")
def model():
    """The model kernels, launched through the CuPy stand-in (``name(grid, block, *args)``)."""
    execution = HostExecution()
    module = execution.cupy().RawModule(code=MODEL_SOURCE)

    def launch(name, grid, block, *args, shared_mem=0):
        packed = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        module.get_function(name)(grid, block, packed, shared_mem=shared_mem)

    return launch


def test_indices_in_a_3d_grid(model):
    out = torch.full((3 * 2 * 2 * 4 * 3 * 2,), -1, dtype=torch.int32)
    model("indices", (3, 2, 2), (4, 3, 2), out)
    n = 4 * 3 * 2
    assert out.tolist() == [1000 * (i // n) + i % n for i in range(out.numel())]


def test_shuffles(model):
    vals = torch.arange(64, dtype=torch.float32) * 1.5
    out = torch.empty(64, 4)
    model("shuffles", (1,), (64,), vals, out)
    lane = torch.arange(64) % 32
    base = torch.arange(64) - lane
    want = torch.stack(
        [
            vals[base + (lane ^ 5)],
            vals[torch.where(lane + 3 < 32, base + lane + 3, base + lane)],
            vals[torch.where(lane >= 2, base + lane - 2, base + lane)],
            vals[base + 7],
        ],
        1,
    )
    assert torch.equal(out, want)


def test_a_missing_barrier_shows_as_a_race(model):
    """Threads read a neighbour's shared slot: right with the barrier, every time; without it
    some thread reads before its neighbour wrote (uninitialised shared memory is 0xFF bytes)."""
    want = (torch.arange(256, dtype=torch.int32) + 1) % 256
    wrong = 0
    for _ in range(REPEATS):
        out = torch.empty(256, dtype=torch.int32)
        model("neighbour", (2,), (256,), out, np.int32(1))
        assert torch.equal(out, want)
        model("neighbour", (2,), (256,), out, np.int32(0))
        wrong += int((out != want).sum())
    assert wrong > 0


@pytest.mark.parametrize(
    "name, block, match",
    [
        (
            "divergent_barrier",
            (64,),
            "returned from the kernel while 40 threads wait|deadlock at __syncthreads",
        ),
        ("two_barriers", (64,), r"reached __syncthreads at line \d+ while other threads wait at line \d+"),
        (
            "half_warp_shuffle",
            (32,),
            "returned from the kernel while 16 threads wait|deadlock at __shfl_xor_sync",
        ),
        ("all_shuffle", (48,), "in a warp of 16 threads: the host model runs full-warp masks only"),
    ],
)
def test_barrier_misuse_is_reported_not_hung(model, name, block, match):
    out = torch.zeros(64)
    with pytest.raises(HostKernelError, match=match):
        model(name, (2,), block, out)


def test_misaligned_vector_load_and_shared_overflow(model):
    data = torch.arange(64, dtype=torch.uint8)
    out = torch.zeros(32, dtype=torch.int32)
    model("misaligned", (1,), (32,), data, out, np.int32(16 - data.data_ptr() % 16))  # aligned: fine
    with pytest.raises(HostKernelError, match="misaligned 16-byte load"):
        model("misaligned", (1,), (32,), data, out, np.int32(17 - data.data_ptr() % 16))
    buf = torch.zeros(32)
    model("dynamic_shared", (2,), (32,), buf, np.int32(0), shared_mem=64)
    assert (buf == 1.0).all()
    with pytest.raises(HostKernelError, match="wrote past the end of its 64 bytes of dynamic shared memory"):
        model("dynamic_shared", (1,), (32,), buf, np.int32(16), shared_mem=64)


def test_scalar_arguments_arrive_as_cupy_packs_them(model):
    out = torch.zeros(72, dtype=torch.uint8)
    p = torch.zeros(1)
    args = (np.int8(-5), np.int16(-300), np.int32(-70000), -(2**40), np.uint32(3_000_000_000),
            np.uint64(2**63 + 7), np.float32(1.25), 2.5, p)  # fmt: skip
    model("scalars", (1,), (32,), *args, out)
    raw = out.numpy().tobytes()
    got = [
        np.frombuffer(raw, dtype, 1, offset)[0]
        for dtype, offset in (
            (np.int8, 0), (np.int16, 8), (np.int32, 16), (np.int64, 24), (np.uint32, 32), (np.uint64, 40),
            (np.float32, 48), (np.float64, 56), (np.uint64, 64),
        )
    ]  # fmt: skip
    assert got == [-5, -300, -70000, -(2**40), 3_000_000_000, 2**63 + 7, 1.25, 2.5, p.data_ptr()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).long() & (
        0xFFFF if t.element_size() == 2 else 0xFFFFFFFF
    )


def test_bf16_and_fp16_conversions_are_bit_exact(model):
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31, (1 << 18,), generator=gen, dtype=torch.int64).to(torch.int32)
    edges = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, -65520.0, 3.3895314e38, 3.4028235e38,
             float("inf"), float("-inf"), 2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26,
             1e-45, -1e-45, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11,
             2.0**-133]  # fmt: skip
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x00008000, 0x00018000, 0x80408000], dtype=torch.int64).to(
        torch.int32
    )
    x = torch.cat([random_bits.view(torch.float32), torch.tensor(edges), ties.view(torch.float32)])
    nan = torch.tensor([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF], dtype=torch.int64).to(torch.int32)
    x = torch.cat([x, nan.view(torch.float32)])
    n = x.numel()
    halves = torch.arange(n, dtype=torch.int64).remainder(1 << 16).to(torch.int16)  # every fp16 pattern
    bf16 = torch.empty(n, dtype=torch.int16)
    f16 = torch.empty(n, dtype=torch.int16)
    widened = torch.empty(n, dtype=torch.float32)
    model("convert", (4,), (256,), x, bf16, f16, halves, widened, np.int32(n))
    is_nan = torch.isnan(x)
    assert is_nan.sum() >= 4
    want_bf16 = _bits(x.to(torch.bfloat16))
    want_f16 = _bits(x.to(torch.float16))
    # Every non-NaN float rounds as torch rounds it (nearest even, subnormals, overflow to inf);
    # every NaN becomes the canonical NaN 0x7fff (torch keeps sign and some payload).
    assert torch.equal(_bits(bf16)[~is_nan], want_bf16[~is_nan])
    assert torch.equal(_bits(f16)[~is_nan], want_f16[~is_nan])
    assert (_bits(bf16)[is_nan] == 0x7FFF).all() and (_bits(f16)[is_nan] == 0x7FFF).all()
    h = halves.view(torch.float16)
    h_nan = torch.isnan(h)
    assert torch.equal(_bits(widened)[~h_nan], _bits(h.float())[~h_nan])
    assert (_bits(widened)[h_nan] == 0x7FFFFFFF).all()
