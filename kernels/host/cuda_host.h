// CUDA's execution model on the host, so that g++ can compile and run a .cu file as written.
//
// Why it exists: the sparse-KL kernel (kernels/sparse_kl.cu) must be exercised line by line in
// CI, where there is no GPU. kernels/host/build.py compiles the unchanged .cu with
//   g++ -O1 -std=c++20 -pthread -shared -fPIC -x c++ -DLONGKD_HOST -include cuda_host.h
// and kernels/host/cupy_host.py launches the result through a stand-in for the part of CuPy
// that kernels/cupy_kl.py uses. docs/kernels.md says what this does and does not prove.
//
// The model:
// - Threads: every thread of a block is a real OS thread (pthreads), all running at once, with
//   threadIdx / blockIdx / blockDim / gridDim as thread_local variables. A launch creates
//   blockDim threads and they run the grid's blocks ONE AFTER ANOTHER, all of them in each.
// - __syncthreads(): a real barrier over the block's threads (an atomic counter and a futex
//   wait on a generation number; arrival and release are release/acquire operations, so the
//   writes before the barrier are visible after it, and nothing else orders the threads).
//   The caller's source line is recorded: threads of one block meeting at different
//   __syncthreads calls, a thread returning while others wait at a barrier, or every thread
//   stuck in barriers that cannot complete are reported as errors, not hangs.
// - Warp shuffles (__shfl_xor_sync, __shfl_sync, __shfl_up_sync, __shfl_down_sync,
//   __syncwarp): the 32 lanes of a warp meet at a per-warp barrier and exchange values through
//   a double-buffered per-warp slot array. Only full-warp masks in full warps are modelled;
//   anything else is reported.
// - Schedule perturbation (with a schedule seed, different for every launch): threads yield
//   at random after barriers, and in every block one random thread lags at a random point
//   until all the others are blocked, so a missing barrier shows as a wrong or changing result.
// - Static __shared__ memory: `__shared__` is `static`, so a __shared__ array is one object
//   in the process that every thread of the running block sees. That is exactly CUDA's
//   per-block shared memory BECAUSE blocks run one at a time (and launches are serialised by
//   a lock in this library); a per-block arena would need the declaration rewritten, which a
//   macro in front of the type cannot do. The launcher (build.py) finds these variables in
//   the library's symbol table (function-local statics, mangled _ZZ...); before every block
//   they are filled with 0xFF bytes (NaN as float), as uninitialised shared memory would be
//   garbage, and the ones a kernel writes give its static shared size, which counts against
//   CUDA's 48 KiB per-block limit together with the dynamic size.
// - Dynamic shared memory: `extern __shared__ T name[]` cannot be expressed with a macro
//   (`extern static` is ill-formed), so the .cu declares it with LONGKD_DYNAMIC_SHARED(T, name),
//   which is that line on the GPU and a pointer to this block's buffer here: shared_mem bytes,
//   16-byte aligned, filled with 0xFF before each block, followed by a guard band that must be
//   intact after the block (a write past shared_mem is reported).
// - 16-byte vector accesses (uint4): copying a uint4 from or to an address that is not
//   16-byte aligned is reported (the GPU faults with "misaligned address"; x86 would not).
// - Intrinsics: __expf(x) = 2^(x * log2 e) with the product rounded to fp32 and subnormal
//   results flushed to zero, as the GPU's ex2.approx.ftz does; the approximation error of
//   ex2.approx itself (about 2 ulp) is not modelled. logf, fmaxf and friends are libm's.
// - Conversions: cvt.rn.bf16.f32, cvt.rn.f16.f32 and cvt.f32.f16 bit-exact in integer code:
//   round to nearest even, subnormals kept, overflow to infinity, any NaN to the canonical
//   NaN (0x7fff; 0x7fffffff when widening), as CUDA's own host versions of these conversions.
// Not modelled: timing, the GPU's weaker memory ordering between barriers (x86 is stronger),
// blocks running at the same time, bank conflicts, occupancy, register limits,
// __launch_bounds__ (ignored), atomics, cooperative groups.

#pragma once

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------
// Keywords and built-in types.
// ---------------------------------------------------------------------------------------
#define __global__ __attribute__((visibility("default"), used))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static
#define LONGKD_DYNAMIC_SHARED(T, name) T* const name = ::longkd_host::dynamic_shared<T>()

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline constexpr int warpSize = 32;

namespace longkd_host {
[[noreturn]] inline void fail(const std::string& what);
inline void check_vector_address(const void* p, const char* what) {
    std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
    asm volatile("" : "+r"(a));  // the type promises 16-byte alignment: keep the check honest
    if (a & 15u) fail(std::string("misaligned 16-byte ") + what + " at address " + std::to_string(a));
}
}  // namespace longkd_host

// 16 bytes, 16-byte aligned, like CUDA's uint4; copies check the alignment of both ends.
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
    uint4() = default;
    uint4(const uint4& o) {
        longkd_host::check_vector_address(&o, "load");
        std::memcpy(static_cast<void*>(this), &o, 16);
    }
    uint4& operator=(const uint4& o) {
        longkd_host::check_vector_address(&o, "load");
        longkd_host::check_vector_address(this, "store");
        std::memcpy(static_cast<void*>(this), &o, 16);
        return *this;
    }
};

// ---------------------------------------------------------------------------------------
// Intrinsics.
// ---------------------------------------------------------------------------------------
__forceinline__ float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
__forceinline__ unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
__forceinline__ float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned int>(i)); }
__forceinline__ int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }

__forceinline__ float __expf(float x) {
    const float t = x * 1.44269504088896341f;  // rounded to fp32, as the GPU's mul.f32
    const float r = exp2f(t);
    return r < 1.17549435e-38f ? 0.0f : r;  // ex2.approx.ftz flushes subnormal results
}
__forceinline__ float __logf(float x) { return log2f(x) * 0.693147180559945309f; }
__forceinline__ float __fdividef(float a, float b) { return a / b; }

// bf16 / fp16 conversions, bit-exact with the PTX instructions the .cu uses on the GPU.
__forceinline__ unsigned short cvt_rn_bf16_f32(float f) {
    const unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN -> canonical NaN
    // Round to nearest even on the 16 dropped bits; a carry into the exponent is correct
    // (up to infinity), and subnormals round like any other value.
    return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

__forceinline__ unsigned short cvt_rn_f16_f32(float f) {
    const unsigned int x = __float_as_uint(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int u = x & 0x7fffffffu;
    if (u > 0x7f800000u) return 0x7fffu;                       // NaN -> canonical NaN
    if (u >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 65520: inf
    if (u >= 0x38800000u) {                                    // normal fp16 (>= 2^-14)
        const unsigned int r = u + 0xfffu + ((u >> 13) & 1u);  // nearest even on 13 bits
        return static_cast<unsigned short>(sign | ((r - 0x38000000u) >> 13));
    }
    // Subnormal fp16 result (units of 2^-24) or zero. The value is m * 2^(e - 150).
    const unsigned int e = u >> 23;
    if (e < 102u) return static_cast<unsigned short>(sign);    // below 2^-25: rounds to 0
    const unsigned int m = (u & 0x7fffffu) | 0x800000u;
    const unsigned int shift = 126u - e;                       // 14 .. 24
    unsigned int q = m >> shift;
    const unsigned int rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;          // may carry into 0x400: normal
    return static_cast<unsigned short>(sign | q);
}

__forceinline__ float cvt_f32_f16(unsigned short h) {
    const unsigned int sign = (static_cast<unsigned int>(h) & 0x8000u) << 16;
    const unsigned int e = (h >> 10) & 0x1fu;
    unsigned int m = h & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(m ? 0x7fffffffu : (sign | 0x7f800000u));
    if (e == 0u) {
        if (m == 0u) return __uint_as_float(sign);
        int exp = 113;  // subnormal: normalise (value m * 2^-24)
        while (!(m & 0x400u)) {
            m <<= 1;
            --exp;
        }
        return __uint_as_float(sign | (static_cast<unsigned int>(exp) << 23) | ((m & 0x3ffu) << 13));
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// ---------------------------------------------------------------------------------------
// The block: threads, barriers, warp exchange, shared memory.
// ---------------------------------------------------------------------------------------
namespace longkd_host {

struct Abort {};  // unwinds a thread once its block has failed

// A reusable barrier: the last of `expected` arrivals starts the next generation and wakes
// the others (futex wait on `gen`). Arrivals, the generation bump and the waits are
// release/acquire operations, so everything written before a barrier is visible after it.
struct Barrier {
    int expected = 0;
    std::atomic<int> count{0};     // arrivals in this generation
    std::atomic<unsigned> gen{0};  // generations completed (also bumped to wake on failure)
    std::atomic<int> site{0};      // source line of this generation's arrivals
};

struct LaunchConfig {  // mirrored by kernels/host/build.py (ctypes)
    unsigned int grid[3];
    unsigned int block[3];
    unsigned long long shared_bytes;
    unsigned long long schedule_seed;  // 0: no extra yields; else perturbs thread interleaving
};

inline constexpr std::size_t kGuardBytes = 64;
inline constexpr unsigned char kPoison = 0xff;

struct Range {
    unsigned char* p;
    std::size_t n;
};

struct Block {
    int nthreads = 0;
    // (threads blocked in a barrier) << 32 | (threads returned from the kernel), in one word
    // so that one atomic read-modify-write sees both: when they add up to nthreads, no
    // barrier can ever complete (every live thread waits), which is reported, not hung on.
    std::atomic<long long> parked{0};
    std::atomic<bool> failed{false};
    Barrier block_bar;
    std::unique_ptr<Barrier[]> warp_bar;
    int nwarps = 0;
    std::vector<unsigned char> exchange;  // [warp][2][32][8]: shuffle values, double-buffered
    std::vector<unsigned char> dyn_storage;
    unsigned char* dyn = nullptr;
    std::size_t dyn_bytes = 0;
    unsigned long long seed = 0;
    int lag_tid = -1, lag_sync = -1;  // this block's lagging thread and where it lags
    // Sequencing of the grid's blocks and the first error, under `m`.
    std::mutex m;
    std::condition_variable next_cv;
    long long current = 0, nblocks = 0;
    int finished = 0;
    std::string error;
    std::vector<unsigned char> touched;  // per registered static shared variable: written?
};

struct ThreadState {
    Block* block = nullptr;
    int tid = 0, lane = 0, warp = 0;
    int syncs = 0;  // __syncthreads passed in the current block
    unsigned long long rng = 0;
};
inline thread_local ThreadState tls;

inline std::vector<Range>& static_shared_ranges() {
    static std::vector<Range> ranges;
    return ranges;
}

inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

inline std::string& last_error() {
    static std::string e;
    return e;
}

inline std::vector<unsigned char>& last_touched() {
    static std::vector<unsigned char> t;
    return t;
}

template <class T>
T* dynamic_shared() {
    return reinterpret_cast<T*>(tls.block->dyn);
}

inline std::string where() {
    return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ") thread (" + std::to_string(threadIdx.x) + "," +
           std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + ")";
}

// Record the block's first error and wake every waiter (they then unwind with Abort).
inline void record_failure(Block& b, const std::string& what) {
    {
        std::lock_guard<std::mutex> lk(b.m);
        if (b.failed.load()) return;
        b.error = what;
        b.failed.store(true);
    }
    auto wake = [](Barrier& bar) {
        bar.gen.fetch_add(1, std::memory_order_acq_rel);
        bar.gen.notify_all();
    };
    wake(b.block_bar);
    for (int w = 0; w < b.nwarps; ++w) wake(b.warp_bar[w]);
    std::lock_guard<std::mutex> lk(b.m);
    b.next_cv.notify_all();
}

[[noreturn]] inline void fail(const std::string& what) {
    record_failure(*tls.block, where() + ": " + what);
    throw Abort{};
}

inline long long parked_waiting(long long v) { return (v - (v & 0xffffffffll)) >> 32; }
inline long long parked_exited(long long v) { return v & 0xffffffffll; }

// Schedule perturbation, with a schedule seed (a different one per launch):
// - after any barrier a thread gives up its core 1 time in 8, so repeated launches
//   interleave threads differently;
// - in every block one thread chosen at random lags at one point chosen at random (its
//   start, or just after its 1st to 4th __syncthreads): it waits until every other thread of
//   the block is blocked in a barrier or has returned. Whatever the others can do before
//   they need it, they do first, which is how a missing barrier shows: a shared value
//   overwritten before the lagging thread reads it, or read before it writes it.
inline void jitter() {
    ThreadState& t = tls;
    if (!t.block->seed) return;
    t.rng = t.rng * 6364136223846793005ull + 1442695040888963407ull;
    if ((t.rng >> 61) == 0) sched_yield();
}

inline void lag_point() {
    Block& b = *tls.block;
    if (tls.tid != b.lag_tid || tls.syncs != b.lag_sync) return;
    for (;;) {
        const long long v = b.parked.load(std::memory_order_acquire);
        if (parked_waiting(v) + parked_exited(v) >= b.nthreads - 1 || b.failed.load()) return;
        sched_yield();
    }
}

// Arrive at `bar` (from source line `site`) and wait until all `bar.expected` threads have.
inline void arrive(Block& b, Barrier& bar, int site, const char* what) {
    if (b.failed.load(std::memory_order_acquire)) throw Abort{};
    int first = 0;
    if (!bar.site.compare_exchange_strong(first, site) && first != site)
        fail(std::string("reached ") + what + " at line " + std::to_string(site) +
             " while other threads wait at line " + std::to_string(first) + " (a barrier in divergent code)");
    const unsigned gen = bar.gen.load(std::memory_order_acquire);
    if (bar.count.fetch_add(1, std::memory_order_acq_rel) + 1 == bar.expected) {
        bar.count.store(0, std::memory_order_relaxed);
        bar.site.store(0, std::memory_order_relaxed);
        // Un-park the waiters before releasing them: `parked` never counts a running thread.
        b.parked.fetch_sub(static_cast<long long>(bar.expected - 1) << 32, std::memory_order_acq_rel);
        bar.gen.fetch_add(1, std::memory_order_acq_rel);
        bar.gen.notify_all();
        return;
    }
    const long long v = b.parked.fetch_add(1ll << 32, std::memory_order_acq_rel) + (1ll << 32);
    if (parked_waiting(v) + parked_exited(v) == b.nthreads)
        fail(std::string("deadlock at ") + what + " (line " + std::to_string(site) + "): " +
             std::to_string(parked_waiting(v)) + " threads wait in barriers that cannot complete, " +
             std::to_string(parked_exited(v)) + " have returned from the kernel");
    while (bar.gen.load(std::memory_order_acquire) == gen) bar.gen.wait(gen, std::memory_order_acquire);
    if (b.failed.load(std::memory_order_acquire)) throw Abort{};
}

inline void syncthreads(int line) {
    arrive(*tls.block, tls.block->block_bar, line, "__syncthreads");
    ++tls.syncs;
    jitter();
    lag_point();
}

inline void check_full_warp(unsigned mask, const char* what) {
    Block& b = *tls.block;
    const int first = tls.warp * 32, size = b.nthreads - first < 32 ? b.nthreads - first : 32;
    if (size != 32 || mask != 0xffffffffu)
        fail(std::string(what) + " with mask " + std::to_string(mask) + " in a warp of " +
             std::to_string(size) + " threads: the host model runs full-warp masks only");
}

// Every lane writes its value, meets the others at the warp's barrier, then reads lane
// `src_lane`'s value. Buffers alternate by generation: a lane writes a buffer again only two
// shuffles later, after passing a barrier every lane reaches after its read of it.
template <class T>
T exchange(unsigned mask, T v, int src_lane, int line, const char* what) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    check_full_warp(mask, what);
    Block& b = *tls.block;
    Barrier& bar = b.warp_bar[tls.warp];
    const unsigned gen = bar.gen.load(std::memory_order_acquire);
    unsigned char* buf = b.exchange.data() + (static_cast<std::size_t>(tls.warp) * 2 + (gen & 1u)) * 32 * 8;
    std::memcpy(buf + tls.lane * 8, &v, sizeof(T));
    arrive(b, bar, line, what);
    T r;
    std::memcpy(&r, buf + src_lane * 8, sizeof(T));
    jitter();
    return r;
}

inline void syncwarp(unsigned mask, int line) {
    check_full_warp(mask, "__syncwarp");
    arrive(*tls.block, tls.block->warp_bar[tls.warp], line, "__syncwarp");
    jitter();
}

}  // namespace longkd_host

__forceinline__ void __syncthreads(int line = __builtin_LINE()) {
    asm volatile("" ::: "memory");
    longkd_host::syncthreads(line);
    asm volatile("" ::: "memory");
}

__forceinline__ void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    longkd_host::syncwarp(mask, line);
}

template <class T>
__forceinline__ T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, int line = __builtin_LINE()) {
    const int lane = longkd_host::tls.lane;
    int src = lane ^ lane_mask;
    if (src >= ((lane / width) + 1) * width) src = lane;  // a later segment: own value
    return longkd_host::exchange(mask, var, src & 31, line, "__shfl_xor_sync");
}

template <class T>
__forceinline__ T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, int line = __builtin_LINE()) {
    const int lane = longkd_host::tls.lane;
    const int src = (lane / width) * width + ((src_lane % width) + width) % width;
    return longkd_host::exchange(mask, var, src, line, "__shfl_sync");
}

template <class T>
__forceinline__ T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    const int lane = longkd_host::tls.lane;
    const int src = lane + static_cast<int>(delta);
    const bool inside = src / width == lane / width && src < 32;
    return longkd_host::exchange(mask, var, inside ? src : lane, line, "__shfl_down_sync");
}

template <class T>
__forceinline__ T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, int line = __builtin_LINE()) {
    const int lane = longkd_host::tls.lane;
    const int src = lane - static_cast<int>(delta);
    const bool inside = src >= 0 && src / width == lane / width;
    return longkd_host::exchange(mask, var, inside ? src : lane, line, "__shfl_up_sync");
}

// ---------------------------------------------------------------------------------------
// Launching: blockDim threads run every block of the grid in turn.
// ---------------------------------------------------------------------------------------
namespace longkd_host {

inline void choose_lag(Block& b) {
    if (!b.seed) return;
    unsigned long long h = (b.seed + static_cast<unsigned long long>(b.current)) * 0x9e3779b97f4a7c15ull;
    h ^= h >> 29;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    b.lag_tid = static_cast<int>(h % static_cast<unsigned long long>(b.nthreads));
    b.lag_sync = static_cast<int>((h >> 40) % 5);
}

inline void poison_shared(Block& b) {
    for (const Range& r : static_shared_ranges()) std::memset(r.p, kPoison, r.n);
    std::memset(b.dyn, kPoison, b.dyn_bytes + kGuardBytes);
}

// Run by the last thread of a block to return (holding b.m): checks, then the next block.
inline void finish_block(Block& b) {
    for (std::size_t i = 0; i < kGuardBytes && !b.failed.load(); ++i) {
        if (b.dyn[b.dyn_bytes + i] != kPoison) {
            b.error = "block " + std::to_string(b.current) + " wrote past the end of its " +
                      std::to_string(b.dyn_bytes) + " bytes of dynamic shared memory";
            b.failed.store(true);
        }
    }
    const auto& ranges = static_shared_ranges();
    for (std::size_t i = 0; i < ranges.size(); ++i)
        for (std::size_t j = 0; j < ranges[i].n && !b.touched[i]; ++j)
            if (ranges[i].p[j] != kPoison) b.touched[i] = 1;
    b.finished = 0;
    b.parked.store(0);
    if (b.failed.load()) {
        b.current = b.nblocks;
    } else if (++b.current < b.nblocks) {
        poison_shared(b);
        choose_lag(b);
    }
    b.next_cv.notify_all();
}

struct Worker {
    Block* block;
    const LaunchConfig* cfg;
    void (*body)(void*);
    void* ctx;
    int tid;
};

inline void* worker_main(void* arg) {
    Worker& wk = *static_cast<Worker*>(arg);
    Block& b = *wk.block;
    const LaunchConfig& c = *wk.cfg;
    tls.block = &b;
    tls.tid = wk.tid;
    tls.lane = wk.tid % 32;
    tls.warp = wk.tid / 32;
    tls.rng = c.schedule_seed * 0x9e3779b97f4a7c15ull + static_cast<unsigned long long>(wk.tid) + 1;
    const unsigned tid = static_cast<unsigned>(wk.tid);
    threadIdx = {tid % c.block[0], (tid / c.block[0]) % c.block[1], tid / (c.block[0] * c.block[1])};
    blockDim = {c.block[0], c.block[1], c.block[2]};
    gridDim = {c.grid[0], c.grid[1], c.grid[2]};
    for (long long k = 0; k < b.nblocks; ++k) {
        {
            std::unique_lock<std::mutex> lk(b.m);
            b.next_cv.wait(lk, [&] { return b.current >= k; });
            if (b.current > k) break;  // the grid stopped after a failure
        }
        const long long gx = c.grid[0], gxy = gx * c.grid[1];
        blockIdx = {static_cast<unsigned>(k % gx), static_cast<unsigned>((k / gx) % c.grid[1]),
                    static_cast<unsigned>(k / gxy)};
        tls.syncs = 0;
        jitter();
        lag_point();
        try {
            wk.body(wk.ctx);
            const long long v = b.parked.fetch_add(1, std::memory_order_acq_rel) + 1;
            if (parked_waiting(v) > 0 && parked_waiting(v) + parked_exited(v) == b.nthreads)
                record_failure(b, where() + ": returned from the kernel while " +
                                      std::to_string(parked_waiting(v)) +
                                      " threads wait at a barrier (a barrier in divergent code)");
        } catch (const Abort&) {
        } catch (const std::exception& e) {
            record_failure(b, where() + ": " + e.what());
        }
        std::unique_lock<std::mutex> lk(b.m);
        if (++b.finished == b.nthreads) finish_block(b);
        b.next_cv.wait(lk, [&] { return b.current > k; });
    }
    return nullptr;
}

// Run `body` (one call = one thread's kernel) over the grid; 0 on success, else 1 and
// last_error() says what went wrong.
inline int run_grid(const LaunchConfig& c, void (*body)(void*), void* ctx) {
    std::lock_guard<std::mutex> launch_lock(launch_mutex());
    Block b;
    b.nthreads = static_cast<int>(c.block[0] * c.block[1] * c.block[2]);
    b.nblocks = static_cast<long long>(c.grid[0]) * c.grid[1] * c.grid[2];
    b.seed = c.schedule_seed;
    b.block_bar.expected = b.nthreads;
    b.nwarps = (b.nthreads + 31) / 32;
    b.warp_bar.reset(new Barrier[b.nwarps]);
    for (int w = 0; w < b.nwarps; ++w) b.warp_bar[w].expected = b.nthreads - 32 * w < 32 ? b.nthreads - 32 * w : 32;
    b.exchange.assign(static_cast<std::size_t>(b.nwarps) * 2 * 32 * 8, 0);
    b.dyn_bytes = c.shared_bytes;
    b.dyn_storage.assign(c.shared_bytes + kGuardBytes + 16, 0);
    b.dyn = b.dyn_storage.data() + ((16 - reinterpret_cast<std::uintptr_t>(b.dyn_storage.data()) % 16) % 16);
    b.touched.assign(static_shared_ranges().size(), 0);
    poison_shared(b);
    choose_lag(b);

    std::vector<Worker> workers(b.nthreads);
    std::vector<pthread_t> threads(b.nthreads);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    int started = 0;
    for (int t = 0; t < b.nthreads; ++t) {
        workers[t] = {&b, &c, body, ctx, t};
        if (pthread_create(&threads[t], &attr, worker_main, &workers[t]) != 0) {
            std::lock_guard<std::mutex> lk(b.m);
            b.error = "could not start thread " + std::to_string(t) + " of " + std::to_string(b.nthreads);
            b.failed.store(true);
            b.current = b.nblocks;  // the started threads leave without running
            b.next_cv.notify_all();
            break;
        }
        ++started;
    }
    pthread_attr_destroy(&attr);
    for (int t = 0; t < started; ++t) pthread_join(threads[t], nullptr);
    last_error() = b.error;
    last_touched() = b.touched;
    return b.failed.load() ? 1 : 0;
}


// The kernel's parameter types as codes for the launcher: p (pointer), i/u (signed/unsigned
// integer), f (floating point), b (other) followed by the size in bytes.
template <class T>
std::string type_code() {
    if constexpr (std::is_pointer_v<T>) return "p" + std::to_string(sizeof(T));
    else if constexpr (std::is_floating_point_v<T>) return "f" + std::to_string(sizeof(T));
    else if constexpr (std::is_integral_v<T>) return (std::is_signed_v<T> ? "i" : "u") + std::to_string(sizeof(T));
    else return "b" + std::to_string(sizeof(T));
}

template <class... A>
std::string signature(void (*)(A...)) {
    std::string s;
    ((s += type_code<A>() + ","), ...);
    if (!s.empty()) s.pop_back();
    return s;
}

// As the driver does: each parameter is copied from args[i], sizeof(parameter) bytes.
template <class... A, std::size_t... I>
std::tuple<A...> unpack(const void* const* args, std::index_sequence<I...>) {
    std::tuple<A...> t;
    ((std::memcpy(static_cast<void*>(&std::get<I>(t)), args[I], sizeof(A))), ...);
    return t;
}

template <class... A>
int launch(void (*fn)(A...), const LaunchConfig& c, const void* const* args) {
    struct Call {
        void (*fn)(A...);
        std::tuple<A...> args;
    } call{fn, unpack<A...>(args, std::index_sequence_for<A...>{})};
    return run_grid(c, [](void* p) {
        Call& k = *static_cast<Call*>(p);
        std::apply(k.fn, k.args);
    }, &call);
}

}  // namespace longkd_host

// The library's C entry points besides the kernels (this header is included by exactly one
// translation unit, so these are defined once). Used by kernels/host/build.py.
extern "C" __attribute__((visibility("default"))) const char* longkd_host_last_error() {
    return longkd_host::last_error().c_str();
}

// Register the static __shared__ variables (found in the symbol table): poisoned before each block.
extern "C" __attribute__((visibility("default"))) void longkd_host_set_static_shared(
    void* const* addresses, const unsigned long long* sizes, int n) {
    std::lock_guard<std::mutex> lk(longkd_host::launch_mutex());
    auto& r = longkd_host::static_shared_ranges();
    r.clear();
    for (int i = 0; i < n; ++i) r.push_back({static_cast<unsigned char*>(addresses[i]), sizes[i]});
}

// After a launch: which registered variables its blocks wrote (one byte per variable).
extern "C" __attribute__((visibility("default"))) void longkd_host_static_shared_touched(unsigned char* out, int n) {
    std::lock_guard<std::mutex> lk(longkd_host::launch_mutex());
    const auto& t = longkd_host::last_touched();
    for (int i = 0; i < n; ++i) out[i] = i < static_cast<int>(t.size()) ? t[i] : 0;
}

// One launcher and one signature per kernel; build.py appends these lines.
#define LONGKD_HOST_EXPORT(name)                                                                  \
    extern "C" __attribute__((visibility("default"))) const char* longkd_host_signature__##name() { \
        static const std::string s = ::longkd_host::signature(&name);                            \
        return s.c_str();                                                                        \
    }                                                                                            \
    extern "C" __attribute__((visibility("default"))) int longkd_host_launch__##name(             \
        const ::longkd_host::LaunchConfig* c, const void* const* args) {                         \
        return ::longkd_host::launch(&name, *c, args);                                           \
    }
