// Building blocks shared by the native CPU kernels: SIMD vectors, a vector exp, a register-blocked matmul, a
// parallel-for on XLA's intra-op thread pool, and per-thread scratch buffers. Header-only; every function is
// inline in namespace seqjax_native.
#ifndef SEQJAX_OPS_NATIVE_KERNELS_H_
#define SEQJAX_OPS_NATIVE_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace seqjax_native {

namespace ffi = xla::ffi;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- SIMD ----------------------------------------------------------------------------------------------------
// GCC/Clang vector extensions: one `vf` is 16 floats; the compiler maps it to one AVX-512 register, or two AVX2
// registers, or four SSE/NEON registers, so the file builds for any target.
constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef float vf_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}

// exp(x) for a vector: round x / ln 2 to n, a degree-6 polynomial on the remainder (|r| <= ln2 / 2, relative error
// ~1e-7), times 2^n built in the exponent bits. exp(-inf) and anything below the normal range give exactly 0.
inline vf vexp(vf x) {
  const vi underflow = x < splat(-87.3f);
  x = x > splat(88.3f) ? splat(88.3f) : x;
  x = underflow ? splat(0.f) : x;
  const vf t = x * 1.44269504088896341f;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf n = (t + magic) - magic;
  vf r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  vf p = splat(1.f / 720.f);
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  const vf result = p * (vf)bits;
  return underflow ? splat(0.f) : result;
}

// tanh(u) = 1 - 2 / (1 + exp(2u)); exp saturates to 0 or ~1e38, so the limits are exactly -1 and 1.
inline vf vtanh(vf u) { return splat(1.f) - splat(2.f) / (splat(1.f) + vexp(u + u)); }

inline vf vsigmoid(vf u) { return splat(1.f) / (splat(1.f) + vexp(-u)); }

// Prefetch `rows` rows of `n` floats, `stride` floats apart, into L2: issued before a part's matmul, the strided
// rows its element-wise work reads next arrive while the matmul runs, instead of stalling it one miss at a time.
inline void prefetch_rows(const float* p, int64_t rows, int64_t stride, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; i += 64 / sizeof(float)) __builtin_prefetch(p + r * stride + i, 0, 2);
}

// ---- matmul -------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int kMR = 8;  // rows of the register tile: 8 x 32 floats = 16 of the 32 vector registers
#else
constexpr int kMR = 4;
#endif
constexpr int kNV = 2;  // vectors per register-tile row (32 columns)

// C[m, n] = (accumulate ? C[m, n] : 0) + sum_k A(m, k) B[k, n] for one register tile of MR x NV*16. A(m, k) is
// a[m * am + k * ak], so the same kernel serves A and A^T; B rows are contiguous (ldb apart).
template <int MR, int NV>
inline void micro_tile(int kc, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, float* c,
                       int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = accumulate ? load(c + m * ldc + v * kLanes) : vf{};
  for (int k = 0; k < kc; ++k) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load(b + k * ldb + v * kLanes);
    const float* ak_ptr = a + k * ak;
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const float av = ak_ptr[m * am];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(c + m * ldc + v * kLanes, acc[m][v]);
}

template <int NV>
inline void micro_rows(int mr, int kc, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb,
                       float* c, int64_t ldc, bool accumulate) {
  switch (mr) {
#if defined(__AVX512F__)
    case 8: micro_tile<8, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
    case 7: micro_tile<7, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
    case 6: micro_tile<6, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
    case 5: micro_tile<5, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
#endif
    case 4: micro_tile<4, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
    case 3: micro_tile<3, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
    case 2: micro_tile<2, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
    default: micro_tile<1, NV>(kc, a, am, ak, b, ldb, c, ldc, accumulate); break;
  }
}

// C [M, N] (+)= A [M, kc] B [kc, N] with N a multiple of 16 (all packed buffers are padded to that). Long
// contractions are cut into chunks of kKc, so a register tile's column panel of B ([kKc, 32], 32 KiB) stays in L1
// across the row tiles; the chunks add to C in order, so the sums are the unchunked ones exactly.
constexpr int kKc = 256;

inline void gemm(int M, int N, int kc, const float* a, int64_t am, int64_t ak, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  if (kc <= 0) {
    for (int m = 0; !accumulate && m < M; ++m) std::memset(c + m * ldc, 0, sizeof(float) * N);
    return;
  }
  for (int k0 = 0; k0 < kc; k0 += kKc) {
    const int kn = std::min(kKc, kc - k0);
    const bool acc = accumulate || k0 > 0;
    const float* ak0 = a + k0 * ak;
    const float* bk0 = b + k0 * ldb;
    for (int n0 = 0; n0 < N; n0 += kNV * kLanes) {
      const bool two = N - n0 >= kNV * kLanes;
      for (int m0 = 0; m0 < M; m0 += kMR) {
        const int mr = std::min(kMR, M - m0);
        const float* a0 = ak0 + m0 * am;
        float* c0 = c + m0 * ldc + n0;
        if (two) {
          micro_rows<kNV>(mr, kn, a0, am, ak, bk0 + n0, ldb, c0, ldc, acc);
        } else {
          micro_rows<1>(mr, kn, a0, am, ak, bk0 + n0, ldb, c0, ldc, acc);
        }
      }
    }
  }
}

// ---- thread pool --------------------------------------------------------------------------------------------
// parallel_for(n, fn): runs fn(item, slot) for item in [0, n) on the caller and XLA's intra-op threads. Items are
// taken dynamically in order (callers list the heaviest first). `slot` < max_slots(n) tells a participant apart
// (for per-thread accumulators). The caller works too and waits only for items already taken, so a task that the
// pool starts late finds nothing left and returns: no deadlock when every pool thread is busy.
class Parallel {
 public:
  explicit Parallel(ffi::ThreadPool& pool) : pool_(pool), threads_(std::max<int64_t>(1, pool.num_threads())) {}

  int max_slots(int64_t n) const { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads_, n))); }

  void run(int64_t n, const std::function<void(int64_t, int)>& fn) {
    const int participants = max_slots(n);
    if (participants == 1) {
      for (int64_t i = 0; i < n; ++i) fn(i, 0);
      return;
    }
    auto state = std::make_shared<State>();
    state->n = n;
    state->fn = &fn;
    for (int p = 1; p < participants; ++p) {
      pool_.Schedule([state] { Work(*state); });
    }
    Work(*state);
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->done.load() == state->n; });
  }

 private:
  struct State {
    int64_t n = 0;
    const std::function<void(int64_t, int)>* fn = nullptr;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<int> slots{0};
    std::mutex mu;
    std::condition_variable cv;
  };

  static void Work(State& s) {
    int slot = -1;
    int64_t finished = 0;
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n;) {
      if (slot < 0) slot = s.slots.fetch_add(1);
      (*s.fn)(i, slot);
      ++finished;
    }
    if (finished && s.done.fetch_add(finished) + finished == s.n) {
      std::lock_guard<std::mutex> lock(s.mu);
      s.cv.notify_all();
    }
  }

 public:
  // run_staged(stages, parts, fn): fn(stage, part) for every part of every stage, where all parts of a stage finish
  // before any part of the next one starts (a barrier per stage, for serial recurrences cut into parallel parts).
  // Parts are sticky: participant q first takes the parts p = q (mod participants) of each stage, so a part's
  // weights and accumulators stay in one core's cache, then steals what is left (from the end of the other
  // participants' lists), so an unequal or late participant only shifts work. A participant that has tried every
  // part of a stage waits for items that running participants hold, so this cannot deadlock; with no pool thread
  // free the caller runs every item itself.
  void run_staged(int64_t stages, int64_t parts, const std::function<void(int64_t, int64_t)>& fn) {
    const int participants = max_slots(parts);
    if (participants == 1) {
      for (int64_t s = 0; s < stages; ++s)
        for (int64_t p = 0; p < parts; ++p) fn(s, p);
      return;
    }
    auto state = std::make_shared<Staged>(stages, parts, participants, &fn);
    for (int p = 1; p < participants; ++p) {
      pool_.Schedule([state] { WorkStaged(*state); });
    }
    WorkStaged(*state);
    spin_until(state->done, stages * parts);
  }

 private:
  struct Staged {
    Staged(int64_t stages, int64_t parts, int participants, const std::function<void(int64_t, int64_t)>* fn)
        : stages(stages), parts(parts), participants(participants), fn(fn), claimed(parts) {
      for (auto& c : claimed) c.store(-1, std::memory_order_relaxed);
    }
    const int64_t stages, parts;
    const int participants;
    const std::function<void(int64_t, int64_t)>* fn;
    std::vector<std::atomic<int64_t>> claimed;  // per part: the last stage taken
    std::atomic<int64_t> done{0};               // items finished (stage by stage)
    std::atomic<int> slots{0};
  };

  static void spin_until(const std::atomic<int64_t>& counter, int64_t target) {
    for (int64_t spins = 0; counter.load(std::memory_order_acquire) < target; ++spins) {
      if (spins < (1 << 10)) {  // ~50 us of pause instructions, then give the core away
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();  // the machine is oversubscribed: let the participant we wait for run
      }
    }
  }

  static bool take(Staged& s, int64_t stage, int64_t p) {
    int64_t expected = stage - 1;
    if (s.claimed[p].load(std::memory_order_relaxed) != expected) return false;
    if (!s.claimed[p].compare_exchange_strong(expected, stage, std::memory_order_acq_rel)) return false;
    (*s.fn)(stage, p);
    s.done.fetch_add(1, std::memory_order_acq_rel);
    return true;
  }

  static void WorkStaged(Staged& s) {
    const int q = s.slots.fetch_add(1) % s.participants, n = s.participants;
    for (;;) {
      const int64_t stage = s.done.load(std::memory_order_acquire) / s.parts;  // every earlier stage is complete
      if (stage >= s.stages) return;
      for (int64_t p = q; p < s.parts; p += n) take(s, stage, p);
      for (int64_t p = s.parts - 1; p >= 0; --p) take(s, stage, p);
      spin_until(s.done, (stage + 1) * s.parts);
    }
  }

  ffi::ThreadPool& pool_;
  int64_t threads_;
};

// Grow-only scratch buffers, one set per thread and reused across calls (XLA's pool threads live as long as the
// process), so a call allocates nothing and touches no fresh pages after the first one of its size.
struct Scratch {
  std::vector<float> f[6];
  std::vector<char> flags;
  float* get(int role, size_t n) {
    if (f[role].size() < n) f[role].resize(n);
    return f[role].data();
  }
};

inline Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// How many items to cut each (b, kh) group into, so every thread gets a few items: 1 when there are many groups.
inline int64_t splits_for(int64_t groups, int64_t blocks, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(blocks, (4 * threads + groups - 1) / groups));
}

}  // namespace seqjax_native

#endif  // SEQJAX_OPS_NATIVE_KERNELS_H_
