// The position-wise MLP y = act(x W1) W2 for the CPU, fused, as two XLA FFI handlers (forward, backward).
//
// Legend: M rows (batch x length, flattened), D model width, F hidden width; x [M, D], W1 [D, F], W2 [F, D],
// all row-major float32, D and F multiples of 16. XLA runs this as a dot, a few element-wise fusions and another
// dot, each a pass over the [M, F] hidden activations in memory (the element-wise ones on one core). Here each
// work item takes a block of rows through the whole MLP while the block's hidden activations stay in the cache:
//
//   forward  : h = x W1 (saved for the backward), g = act(h), y = g W2
//   backward : g = act(h), dg = dy W2^T, dW2 += g^T dy, dh = dg * act'(h), dW1 += x^T dh, dx = dh W1^T
//
// Weight gradients are accumulated in a fixed number of parts and summed in order (bitwise deterministic). The weights' transposes are packed once per
// call, so every matmul streams its right-hand side row by row.
//
// Activations (attribute `activation`): 0 = GELU with the tanh approximation (flax.linen.gelu's default),
// 1 = ReLU, 2 = SiLU.

#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace seqjax_native;  // NOLINT

constexpr int64_t kRowBlock = 64;      // rows per forward work item
constexpr int64_t kGradRowBlock = 128;  // rows per backward work item: fewer passes over the dW accumulators

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// act(h) into g, and, if dact != nullptr, act'(h) into dact. n a multiple of 16.
inline void activate(int act, const float* h, float* g, float* dact, int64_t n) {
  for (int64_t i = 0; i < n; i += kLanes) {
    const vf x = load(h + i);
    vf y, d;
    if (act == 0) {
      const vf x2 = x * x;
      const vf t = vtanh(kGeluC * (x + kGeluA * x2 * x));
      y = 0.5f * x * (1.f + t);
      d = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * (kGeluC * (1.f + 3.f * kGeluA * x2));
    } else if (act == 1) {
      const vi pos = x > splat(0.f);
      y = pos ? x : splat(0.f);
      d = pos ? splat(1.f) : splat(0.f);
    } else {
      const vf s = splat(1.f) / (splat(1.f) + vexp(-x));
      y = x * s;
      d = s * (1.f + x * (1.f - s));
    }
    store(g + i, y);
    if (dact) store(dact + i, d);
  }
}

struct Dims {
  int64_t M, D, F;
};

ffi::Error check(const Dims& d, ffi::Buffer<ffi::F32>& w1, ffi::Buffer<ffi::F32>& w2, int64_t act) {
  auto a = w1.dimensions(), b = w2.dimensions();
  if (a.size() != 2 || b.size() != 2 || a[0] != d.D || a[1] != d.F || b[0] != d.F || b[1] != d.D)
    return ffi::Error::InvalidArgument("seqjax native mlp: weights must be W1 [D, F] and W2 [F, D]");
  if (d.D % kLanes || d.F % kLanes)
    return ffi::Error::InvalidArgument("seqjax native mlp: D and F must be multiples of 16");
  if (act < 0 || act > 2) return ffi::Error::InvalidArgument("seqjax native mlp: unknown activation");
  return ffi::Error::Success();
}

Dims dims_of(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w1) {
  auto xd = x.dimensions();
  const int64_t D = xd.size() ? xd[xd.size() - 1] : 0;
  return Dims{D ? static_cast<int64_t>(x.element_count()) / D : 0, D, w1.dimensions()[1]};
}

void transpose(const float* src, int64_t rows, int64_t cols, float* dst) {  // [rows, cols] -> [cols, rows]
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// Weight gradients are sums over row blocks. To be bitwise deterministic whatever the thread count and schedule,
// the blocks are cut into a fixed number of contiguous parts (not one per thread): part p accumulates its blocks
// in order into its own buffer, and the parts are then added in order.
constexpr int64_t kGradParts = 4;

struct Parts {
  int64_t n, blocks;
  int64_t first(int64_t p) const { return p * blocks / n; }
  int64_t last(int64_t p) const { return (p + 1) * blocks / n; }  // exclusive
};

Parts grad_parts(int64_t blocks) { return Parts{std::max<int64_t>(1, std::min(kGradParts, blocks)), blocks}; }

// out[i] = sum over p of parts[p * size + i], in order of p, for i < size; split into chunks over the threads.
void sum_parts(Parallel& parallel, const float* parts, int64_t n, int64_t size, float* out0, int64_t split,
               float* out1) {
  const int64_t chunk = 16 * 1024;
  parallel.run((size + chunk - 1) / chunk, [&](int64_t c, int) {
    const int64_t lo = c * chunk, hi = std::min(size, lo + chunk);
    int64_t i = lo;
    for (; i + kLanes <= hi && (i + kLanes <= split || i >= split); i += kLanes) {
      vf s = load(parts + i);
      for (int64_t p = 1; p < n; ++p) s += load(parts + p * size + i);
      store(i < split ? out0 + i : out1 + (i - split), s);
    }
    for (; i < hi; ++i) {
      float s = parts[i];
      for (int64_t p = 1; p < n; ++p) s += parts[p * size + i];
      (i < split ? out0[i] : out1[i - split]) = s;
    }
  });
}

ffi::Error MlpForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                      ffi::Buffer<ffi::F32> w2, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h,
                      int64_t activation) {
  const Dims d = dims_of(x, w1);
  if (auto err = check(d, w1, w2, activation); !err.success()) return err;
  Parallel parallel(pool);
  const float* xd = x.typed_data();
  const float* w1d = w1.typed_data();
  const float* w2d = w2.typed_data();
  float* yd = y->typed_data();
  float* hd = h->typed_data();
  const int64_t blocks = (d.M + kRowBlock - 1) / kRowBlock;
  parallel.run(blocks, [&](int64_t blk, int) {
    const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, d.M - r0);
    float* g = scratch().get(0, kRowBlock * d.F);
    float* hb = hd + r0 * d.F;
    gemm(rows, d.F, d.D, xd + r0 * d.D, d.D, 1, w1d, d.F, hb, d.F, false);  // h = x W1
    activate(activation, hb, g, nullptr, rows * d.F);
    gemm(rows, d.D, d.F, g, d.F, 1, w2d, d.D, yd + r0 * d.D, d.D, false);   // y = g W2
  });
  return ffi::Error::Success();
}

ffi::Error MlpBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                       ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dy,
                       ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw1,
                       ffi::ResultBuffer<ffi::F32> dw2, int64_t activation) {
  const Dims d = dims_of(x, w1);
  if (auto err = check(d, w1, w2, activation); !err.success()) return err;
  Parallel parallel(pool);
  const int64_t blocks = (d.M + kGradRowBlock - 1) / kGradRowBlock;
  const Parts parts = grad_parts(blocks);
  const int64_t grad_size = 2 * d.D * d.F;  // [dW1; dW2] of one part
  // W1^T [F, D] and W2^T [D, F], and the parts' weight-gradient accumulators.
  // (The caller's scratch roles 3-5: items use 0-2, also when they run on the caller's thread.)
  Scratch& own = scratch();
  float* w1t = own.get(3, d.F * d.D);
  float* w2t = own.get(4, d.D * d.F);
  float* acc_all = own.get(5, parts.n * grad_size);
  transpose(w1.typed_data(), d.D, d.F, w1t);
  transpose(w2.typed_data(), d.F, d.D, w2t);
  const float* xd = x.typed_data();
  const float* hd = h.typed_data();
  const float* dyd = dy.typed_data();
  parallel.run(parts.n, [&](int64_t part, int) {
    Scratch& sc = scratch();
    float* g = sc.get(0, kGradRowBlock * d.F);
    float* da = sc.get(1, kGradRowBlock * d.F);
    float* dg = sc.get(2, kGradRowBlock * d.F);
    float* dw1_acc = acc_all + part * grad_size;
    float* dw2_acc = dw1_acc + d.D * d.F;
    std::memset(dw1_acc, 0, sizeof(float) * grad_size);
    for (int64_t blk = parts.first(part); blk < parts.last(part); ++blk) {
      const int64_t r0 = blk * kGradRowBlock, rows = std::min(kGradRowBlock, d.M - r0);
      const float* xb = xd + r0 * d.D;
      const float* dyb = dyd + r0 * d.D;
      activate(activation, hd + r0 * d.F, g, da, rows * d.F);
      gemm(rows, d.F, d.D, dyb, d.D, 1, w2t, d.F, dg, d.F, false);                // dg = dy W2^T
      gemm(d.F, d.D, rows, g, 1, d.F, dyb, d.D, dw2_acc, d.D, true);              // dW2 += g^T dy
      for (int64_t i = 0; i < rows * d.F; i += kLanes) store(dg + i, load(dg + i) * load(da + i));  // dh
      gemm(d.D, d.F, rows, xb, 1, d.D, dg, d.F, dw1_acc, d.F, true);              // dW1 += x^T dh
      gemm(rows, d.D, d.F, dg, d.F, 1, w1t, d.D, dx->typed_data() + r0 * d.D, d.D, false);  // dx = dh W1^T
    }
  });
  sum_parts(parallel, acc_all, parts.n, grad_size, dw1->typed_data(), d.D * d.F, dw2->typed_data());
  return ffi::Error::Success();
}

// ---- a plain projection y = x W (the building block above without the activation) ------------------------
// x [M, K], W [K, N]; forward y = x W; backward dx = dy W^T, dW = x^T dy. K a multiple of 16; N any: when it is
// not a multiple of 16 (e.g. a vocabulary of 259 in a tied read-out) W, dy and the dW accumulators are padded
// with zero columns to Np in scratch buffers and only the N real columns are written out.
ffi::Error dense_dims(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& w, int64_t* M, int64_t* K, int64_t* N) {
  auto wd = w.dimensions();
  if (wd.size() != 2 || wd[0] % kLanes || wd[1] <= 0)
    return ffi::Error::InvalidArgument("seqjax native dense: W must be [K, N] with K a multiple of 16");
  *K = wd[0];
  *N = wd[1];
  *M = static_cast<int64_t>(x.element_count()) / *K;
  return ffi::Error::Success();
}

// rows x n of src (leading dim n) into dst (leading dim np >= n), zero-padding the extra columns.
inline void pad_columns(const float* src, int64_t rows, int64_t n, int64_t np, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * np, src + r * n, sizeof(float) * n);
    std::memset(dst + r * np + n, 0, sizeof(float) * (np - n));
  }
}

ffi::Error DenseForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> y) {
  int64_t M, K, N;
  if (auto err = dense_dims(x, w, &M, &K, &N); !err.success()) return err;
  Parallel parallel(pool);
  const int64_t Np = round_up(N, kLanes);
  const float* wp = w.typed_data();
  if (Np != N) {  // caller's scratch role 4 (items use 0-2)
    float* padded = scratch().get(4, K * Np);
    pad_columns(w.typed_data(), K, N, Np, padded);
    wp = padded;
  }
  // Items are row blocks; with few rows (a recurrent step's [B, H] x [H, 4H]) also column panels, so every
  // thread gets work.
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  const int64_t panel = blocks >= 4 ? Np : std::max<int64_t>(64, round_up((Np + 3) / 4, 32));
  const int64_t panels = (Np + panel - 1) / panel;
  parallel.run(blocks * panels, [&](int64_t item, int) {
    const int64_t blk = item / panels, c0 = (item % panels) * panel, cols = std::min(panel, Np - c0);
    const int64_t r0 = blk * kRowBlock, rows = std::min(kRowBlock, M - r0);
    float* out = y->typed_data() + r0 * N;
    if (Np == N) {
      gemm(rows, cols, K, x.typed_data() + r0 * K, K, 1, wp + c0, Np, out + c0, N, false);
      return;
    }
    float* dst = scratch().get(0, kRowBlock * Np);
    gemm(rows, cols, K, x.typed_data() + r0 * K, K, 1, wp + c0, Np, dst, cols, false);
    const int64_t real = std::min(cols, N - c0);
    for (int64_t r = 0; real > 0 && r < rows; ++r) std::memcpy(out + r * N + c0, dst + r * cols, sizeof(float) * real);
  });
  return ffi::Error::Success();
}

// dx = dy W^T and dW = x^T dy for x [M, K], dy [M, N]; wt = W^T [N, K].
void dense_backward(Parallel& parallel, const float* x, const float* wt, const float* dy, int64_t M, int64_t K,
                    int64_t N, float* dx, float* dw) {
  const int64_t Np = round_up(N, kLanes);
  const int64_t blocks = (M + kGradRowBlock - 1) / kGradRowBlock;
  const Parts parts = grad_parts(blocks);
  float* acc_all = scratch().get(5, parts.n * K * Np);
  parallel.run(parts.n, [&](int64_t part, int) {
    float* acc = acc_all + part * K * Np;
    std::memset(acc, 0, sizeof(float) * K * Np);
    for (int64_t blk = parts.first(part); blk < parts.last(part); ++blk) {
      const int64_t r0 = blk * kGradRowBlock, rows = std::min(kGradRowBlock, M - r0);
      const float* dyb = dy + r0 * N;
      gemm(rows, K, N, dyb, N, 1, wt, K, dx + r0 * K, K, false);  // dx = dy W^T
      const float* dyp = dyb;
      if (Np != N) {
        float* padded = scratch().get(0, kGradRowBlock * Np);
        pad_columns(dyb, rows, N, Np, padded);
        dyp = padded;
      }
      gemm(K, Np, rows, x + r0 * K, 1, K, dyp, Np, acc, Np, true);  // dW += x^T dy
    }
  });
  if (Np == N) {
    sum_parts(parallel, acc_all, parts.n, K * N, dw, K * N, nullptr);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) {
        float s = acc_all[k * Np + n];
        for (int64_t p = 1; p < parts.n; ++p) s += acc_all[p * K * Np + k * Np + n];
        dw[k * N + n] = s;
      }
  }
}

ffi::Error DenseBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dw) {
  int64_t M, K, N;
  if (auto err = dense_dims(x, w, &M, &K, &N); !err.success()) return err;
  Parallel parallel(pool);
  float* wt = scratch().get(3, N * K);
  transpose(w.typed_data(), K, N, wt);
  dense_backward(parallel, x.typed_data(), wt, dy.typed_data(), M, K, N, dx->typed_data(), dw->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxMlpForward, MlpForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // h = x W1
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxMlpBackward, MlpBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw2
                                  .Attr<int64_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxDenseForward, DenseForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxDenseBackward, DenseBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dw
