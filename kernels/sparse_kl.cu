// Sparse-KL distillation loss on CUDA: one thread block per row of logits.
//
// Why this file exists: the student's logits are the largest tensor in a distillation step
// ([N, V], V up to ~150k). The loss needs only a logsumexp over V plus a gather of the K
// cached teacher entries, so it is memory bound; this kernel reads the logits the minimum
// number of times and never builds an fp32 copy of them. docs/kernels.md has the design,
// the bytes-moved model and what has been run.
//
// Compiled at run time through cupy.RawModule (NVRTC) from the packaged source, or offline
// with `nvcc -arch=sm_90 -cubin` for checking. It includes no headers: bf16/fp16 conversions
// are written with PTX `cvt` (sm_80+), so NVRTC needs no CUDA include path. The same file
// also runs on the CPU in tests: g++ compiles it with -DLONGKD_HOST against
// kernels/host/cuda_host.h (threads, barriers, shuffles, shared memory; docs/kernels.md);
// the block below is the only place where the two builds differ.
//
// Contract (shared with kernels/reference.py):
//   logits  [N, V] row-major contiguous, dtype fp32 | bf16 | fp16
//   ids     [N, K] int64, id < 0 = padding (skipped); ids in a row must be distinct; ids >= V
//           are treated as padding (the Python side documents this).
//   tlp     [N, K] fp32 teacher log-probabilities over the FULL vocabulary (-inf padding)
//   mask    [N] uint8 (bool) or null; 0 = ignored row: zero loss and zero gradient.
//   mode    0 bucket, 1 renorm, 2 sampled (same math as renorm: targets are log(counts/draws)).
// Math (q = softmax(z/T), p_i = exp(tlp_i), P = sum_K p, Q = sum_K q, r = max(1 - P, 0)):
//   bucket:  L = sum_K p (log p - log q) + r (log r - log(1 - Q))
//            T dL/dz_j = q_j - p_j (j in K);  q_j (1 - r / (1 - Q)) (j not in K)
//   renorm:  L = sum_K p^ (log p^ - log q), p^ = p / P;  T dL/dz_j = q_j - p^_j (p^ = 0 off K)
//
// Kernels (extern "C", one per dtype suffix _f32 / _bf16 / _f16):
//   sparse_kl_fwd_*: loss per row, and per-row stats (lse, tail coefficient, target scale);
//                    when `grad` is non-null also writes the gradient in the same launch
//                    (Liger style; used by the fused-linear path, where the chunk is ours).
//   sparse_kl_bwd_*: gradient from the saved stats, scaled by grad_scale read on device.
// `grad` may alias `logits` (in place): every K entry is gathered before any write, each
// element is read by the thread that then overwrites it, and the K fix-ups follow a barrier.

#define LONGKD_MAX_THREADS 1024

typedef unsigned short u16;

// ---------------------------------------------------------------------------------------
// What differs on the host: the PTX conversions (cuda_host.h gives bit-exact C++ versions)
// and the dynamic shared memory declaration (`extern __shared__` has no host spelling).
// ---------------------------------------------------------------------------------------
#ifndef LONGKD_HOST
__device__ __forceinline__ u16 cvt_rn_bf16_f32(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ u16 cvt_rn_f16_f32(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ float cvt_f32_f16(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#define LONGKD_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// ---------------------------------------------------------------------------------------
// dtype adapters: storage type, scalar load/store in fp32, elements per 16-byte vector.
// ---------------------------------------------------------------------------------------
struct F32 {
    typedef float S;
    static const int VEC = 4;
    static __device__ __forceinline__ float load(S v) { return v; }
    static __device__ __forceinline__ S store(float f) { return f; }
};

struct BF16 {
    typedef u16 S;
    static const int VEC = 8;
    // bf16 is the top half of an fp32: widening is a shift, exact.
    static __device__ __forceinline__ float load(S v) { return __uint_as_float(((unsigned int)v) << 16); }
    static __device__ __forceinline__ S store(float f) { return cvt_rn_bf16_f32(f); }
};

struct F16 {
    typedef u16 S;
    static const int VEC = 8;
    static __device__ __forceinline__ float load(S v) { return cvt_f32_f16(v); }
    static __device__ __forceinline__ S store(float f) { return cvt_rn_f16_f32(f); }
};

template <class D>
union Vec16 {
    uint4 raw;
    typename D::S s[D::VEC];
};

// ---------------------------------------------------------------------------------------
// Block reductions (any blockDim that is a multiple of 32, up to 1024).
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void merge_ms(float& m, float& s, float m2, float s2) {
    // Merge two (max, sum of exp(x - max)) pairs. Maxima start at -FLT_MAX, not -inf, so
    // exp(m - m_new) is never exp(-inf + inf) = NaN; a -inf logit just adds exp(-inf) = 0.
    float mn = fmaxf(m, m2);
    s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
    m = mn;
}

__device__ void block_reduce_ms(float& m, float& s, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge_ms(m, s, m2, s2);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    __syncthreads();  // `red` may still be read from a previous reduction
    if (lane == 0) {
        red[warp] = m;
        red[32 + warp] = s;
    }
    __syncthreads();
    m = -3.402823466e38f;
    s = 0.0f;
    for (int w = 0; w < nwarps; ++w) merge_ms(m, s, red[w], red[32 + w]);
}

__device__ void block_reduce_sum3(float& a, float& b, float& c, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
        c += __shfl_xor_sync(0xffffffffu, c, o);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        red[warp] = a;
        red[32 + warp] = b;
        red[64 + warp] = c;
    }
    __syncthreads();
    a = 0.0f;
    b = 0.0f;
    c = 0.0f;
    // Every thread sums the warp partials in the same order, so all agree bit for bit.
    for (int w = 0; w < nwarps; ++w) {
        a += red[w];
        b += red[32 + w];
        c += red[64 + w];
    }
}

// Elements before the first 16-byte boundary of a row (rows of odd V start misaligned).
template <class D>
__device__ __forceinline__ int head_elems(const void* p, int V) {
    int h = (int)(((16u - ((unsigned int)(size_t)p & 15u)) & 15u) / sizeof(typename D::S));
    return h < V ? h : V;
}

// ---------------------------------------------------------------------------------------
// Pass 1: online max / sum of exp over the row of z / T, 16-byte loads where aligned.
// ---------------------------------------------------------------------------------------
template <class D>
__device__ void row_max_sumexp(const typename D::S* z, int V, float inv_T, float& m, float& s) {
    m = -3.402823466e38f;
    s = 0.0f;
    const int head = head_elems<D>(z, V);
    for (int j = threadIdx.x; j < head; j += blockDim.x) merge_ms(m, s, D::load(z[j]) * inv_T, 1.0f);
    const int nvec = (V - head) / D::VEC;
    const uint4* zv = reinterpret_cast<const uint4*>(z + head);
#pragma unroll 2
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        Vec16<D> v;
        v.raw = zv[i];
        float x[D::VEC];
        float vm = m;
#pragma unroll
        for (int e = 0; e < D::VEC; ++e) {
            x[e] = D::load(v.s[e]) * inv_T;
            vm = fmaxf(vm, x[e]);
        }
        // One rescale per vector instead of per element.
        float acc = s * __expf(m - vm);
#pragma unroll
        for (int e = 0; e < D::VEC; ++e) acc += __expf(x[e] - vm);
        m = vm;
        s = acc;
    }
    for (int j = head + nvec * D::VEC + threadIdx.x; j < V; j += blockDim.x)
        merge_ms(m, s, D::load(z[j]) * inv_T, 1.0f);
}

// ---------------------------------------------------------------------------------------
// Gradient pass: g_j = q_j * dense_mul for every j, then K fix-ups g_i = (q_i - c p_i) * gs.
// `zK` holds the gathered z_i / T (gathered before any write, so g may alias z).
// ---------------------------------------------------------------------------------------
template <class D>
__device__ void row_grad(const typename D::S* z, typename D::S* g, int V, float inv_T, float lse,
                         float dense_mul, const long long* ids, const float* tlp, int K,
                         const float* zK, float pscale, float gs) {
    const int head = head_elems<D>(z, V);
    const bool same_align = (((size_t)z ^ (size_t)g) & 15u) == 0;
    if (same_align) {
        for (int j = threadIdx.x; j < head; j += blockDim.x)
            g[j] = D::store(__expf(D::load(z[j]) * inv_T - lse) * dense_mul);
        const int nvec = (V - head) / D::VEC;
        const uint4* zv = reinterpret_cast<const uint4*>(z + head);
        uint4* gv = reinterpret_cast<uint4*>(g + head);
#pragma unroll 2
        for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
            Vec16<D> v;
            v.raw = zv[i];
#pragma unroll
            for (int e = 0; e < D::VEC; ++e)
                v.s[e] = D::store(__expf(D::load(v.s[e]) * inv_T - lse) * dense_mul);
            gv[i] = v.raw;
        }
        for (int j = head + nvec * D::VEC + threadIdx.x; j < V; j += blockDim.x)
            g[j] = D::store(__expf(D::load(z[j]) * inv_T - lse) * dense_mul);
    } else {
        for (int j = threadIdx.x; j < V; j += blockDim.x)
            g[j] = D::store(__expf(D::load(z[j]) * inv_T - lse) * dense_mul);
    }
    // The dense writes to the K positions must land before the fix-ups overwrite them;
    // __syncthreads orders global-memory accesses among the block's threads.
    __syncthreads();
    if (pscale == 0.0f && dense_mul == 0.0f) return;  // row with no targets: all zero
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const long long id = ids[k];
        if (id < 0 || id >= V) continue;
        const float q = __expf(zK[k] - lse);
        const float t = tlp[k];
        const float p = t > -3.0e38f ? __expf(t) * pscale : 0.0f;
        g[id] = D::store((q - p) * gs);
    }
}

template <class D>
__device__ void zero_row(typename D::S* g, int V) {
    for (int j = threadIdx.x; j < V; j += blockDim.x) g[j] = D::store(0.0f);
}

// Guard for log(1 - Q): Q is a sum of K fp32 probabilities, so 1 - Q carries an absolute
// error of ~1e-7; below that floor the difference is rounding noise. We form 1 - Q directly
// (equivalently full sum minus K sum, the same cancellation) and clamp it at this floor, so
// the tail term stays finite when the student puts (almost) all its mass on K.
#define LONGKD_ONE_MINUS_Q_FLOOR 1.0e-7f

// ---------------------------------------------------------------------------------------
// Forward: loss per row, stats per row, and (optionally) the gradient in the same pass.
//   stats[3 * row + 0] = lse of z / T
//   stats[3 * row + 1] = dense multiplier a (non-K gradient is q_j * a before 1/T, scale)
//   stats[3 * row + 2] = c, target scale on p for K entries (1 bucket, 1/P renorm, 0 empty)
// ---------------------------------------------------------------------------------------
template <class D>
__device__ void fwd_impl(const typename D::S* logits, const long long* ids, const float* tlp,
                         const unsigned char* mask, int V, int K, float inv_T, int mode,
                         float* loss_out, float* stats, typename D::S* grad, const float* grad_scale,
                         long long scale_stride) {
    LONGKD_DYNAMIC_SHARED(float, zK);  // K floats: z_i / T of this row's gathered entries
    __shared__ float red[96];
    const long long row = blockIdx.x;
    const size_t off = (size_t)row * (size_t)V;  // 64-bit: N * V exceeds 2^31 at scale
    const typename D::S* z = logits + off;
    const long long* rid = ids + row * (long long)K;
    const float* rt = tlp + row * (long long)K;

    if (mask != nullptr && mask[row] == 0) {
        if (threadIdx.x == 0) {
            loss_out[row] = 0.0f;
            stats[3 * row] = 0.0f;
            stats[3 * row + 1] = 0.0f;
            stats[3 * row + 2] = 0.0f;
        }
        if (grad != nullptr) zero_row<D>(grad + off, V);
        return;
    }
    // Gather first: with an in-place gradient these positions are overwritten later.
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const long long id = rid[k];
        zK[k] = (id >= 0 && id < V) ? D::load(z[id]) * inv_T : 0.0f;
    }
    float m, s;
    row_max_sumexp<D>(z, V, inv_T, m, s);
    block_reduce_ms(m, s, red);  // its barriers also publish zK
    const float lse = m + logf(s);

    float P = 0.0f, Q = 0.0f, A = 0.0f;  // sum p, sum q, sum p (log p - log q) over K
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const long long id = rid[k];
        if (id < 0 || id >= V) continue;
        const float logq = zK[k] - lse;
        const float t = rt[k];
        Q += __expf(logq);
        if (t > -3.0e38f) {  // p = 0 contributes nothing (and 0 * -inf would be NaN)
            const float p = __expf(t);
            P += p;
            A += p * (t - logq);
        }
    }
    block_reduce_sum3(P, Q, A, red);

    float loss, a, c;
    if (mode == 0) {  // bucket
        const float r = fmaxf(1.0f - P, 0.0f);
        const float omq = fmaxf(1.0f - Q, LONGKD_ONE_MINUS_Q_FLOOR);
        loss = A + (r > 0.0f ? r * (logf(r) - logf(omq)) : 0.0f);
        a = 1.0f - r / omq;
        c = 1.0f;
    } else if (P > 0.0f) {  // renorm / sampled
        loss = A / P - logf(P);
        a = 1.0f;
        c = 1.0f / P;
    } else {  // no targets in this row: nothing to match, zero loss and gradient
        loss = 0.0f;
        a = 0.0f;
        c = 0.0f;
    }
    if (threadIdx.x == 0) {
        loss_out[row] = loss;
        stats[3 * row] = lse;
        stats[3 * row + 1] = a;
        stats[3 * row + 2] = c;
    }
    if (grad != nullptr) {
        const float gs = grad_scale[row * scale_stride] * inv_T;
        row_grad<D>(z, grad + off, V, inv_T, lse, a * gs, rid, rt, K, zK, c, gs);
    }
}

// ---------------------------------------------------------------------------------------
// Backward: gradient from the forward's stats; grad_scale (grad_output, times 1/count for a
// mean) is read on device, stride 0 for a scalar or 1 for reduction="none".
// ---------------------------------------------------------------------------------------
template <class D>
__device__ void bwd_impl(const typename D::S* logits, const long long* ids, const float* tlp,
                         const unsigned char* mask, int V, int K, float inv_T, const float* stats,
                         typename D::S* grad, const float* grad_scale, long long scale_stride) {
    LONGKD_DYNAMIC_SHARED(float, zK);
    const long long row = blockIdx.x;
    const size_t off = (size_t)row * (size_t)V;
    if (mask != nullptr && mask[row] == 0) {
        zero_row<D>(grad + off, V);
        return;
    }
    const typename D::S* z = logits + off;
    const long long* rid = ids + row * (long long)K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const long long id = rid[k];
        zK[k] = (id >= 0 && id < V) ? D::load(z[id]) * inv_T : 0.0f;
    }
    __syncthreads();  // all gathers done before any (possibly in-place) write
    const float lse = stats[3 * row], a = stats[3 * row + 1], c = stats[3 * row + 2];
    const float gs = grad_scale[row * scale_stride] * inv_T;
    row_grad<D>(z, grad + off, V, inv_T, lse, a * gs, rid, tlp + row * (long long)K, K, zK, c, gs);
}

#define LONGKD_KERNELS(SUFFIX, D)                                                                   \
    extern "C" __global__ void __launch_bounds__(LONGKD_MAX_THREADS) sparse_kl_fwd_##SUFFIX(       \
        const D::S* logits, const long long* ids, const float* tlp, const unsigned char* mask,     \
        int V, int K, float inv_T, int mode, float* loss_out, float* stats, D::S* grad,            \
        const float* grad_scale, long long scale_stride) {                                        \
        fwd_impl<D>(logits, ids, tlp, mask, V, K, inv_T, mode, loss_out, stats, grad, grad_scale, \
                    scale_stride);                                                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(LONGKD_MAX_THREADS) sparse_kl_bwd_##SUFFIX(       \
        const D::S* logits, const long long* ids, const float* tlp, const unsigned char* mask,     \
        int V, int K, float inv_T, const float* stats, D::S* grad, const float* grad_scale,        \
        long long scale_stride) {                                                                  \
        bwd_impl<D>(logits, ids, tlp, mask, V, K, inv_T, stats, grad, grad_scale, scale_stride);  \
    }

LONGKD_KERNELS(f32, F32)
LONGKD_KERNELS(bf16, BF16)
LONGKD_KERNELS(f16, F16)
