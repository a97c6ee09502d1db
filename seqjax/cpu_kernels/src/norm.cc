// LayerNorm over the last axis for the CPU, as two XLA FFI handlers (forward, backward).
//
// x [M, D] row-major float32, D a multiple of 16; y = (x - mean) * rstd * scale + bias with rstd = 1 / sqrt(var + eps), the statistics
// in float32 (two-pass variance). The forward saves mean and rstd [M] for the backward:
//   xhat = (x - mean) rstd, g = dy * scale,
//   dx = rstd (g - mean(g) - xhat mean(g xhat)),  dscale = sum_rows dy xhat,  dbias = sum_rows dy.
// Rows are split over XLA's intra-op threads; dscale / dbias are summed over a fixed number of contiguous parts in
// order (bitwise deterministic whatever the schedule).

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace seqjax_native;  // NOLINT

constexpr int64_t kRows = 256;   // rows per work item
constexpr int64_t kParts = 4;    // fixed parts of the parameter-gradient sums

ffi::Error NormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                       ffi::ResultBuffer<ffi::F32> rstd, float eps) {
  const int64_t D = scale.element_count(), M = D ? static_cast<int64_t>(x.element_count()) / D : 0;
  if (D == 0 || D % kLanes || static_cast<int64_t>(bias.element_count()) != D)
    return ffi::Error::InvalidArgument("seqjax native layer_norm: scale and bias must be [D], D a multiple of 16");
  Parallel parallel(pool);
  const float* xd = x.typed_data();
  const float* sd = scale.typed_data();
  const float* bd = bias.typed_data();
  parallel.run((M + kRows - 1) / kRows, [&](int64_t blk, int) {
    for (int64_t r = blk * kRows; r < std::min(M, (blk + 1) * kRows); ++r) {
      const float* xr = xd + r * D;
      float* yr = y->typed_data() + r * D;
      vf sum = vf{};
      for (int64_t d = 0; d < D; d += kLanes) sum += load(xr + d);
      const float mu = hsum(sum) / D;
      vf sq = vf{};
      for (int64_t d = 0; d < D; d += kLanes) {
        const vf c = load(xr + d) - mu;
        sq += c * c;
      }
      const float rs = 1.f / std::sqrt(hsum(sq) / D + eps);
      for (int64_t d = 0; d < D; d += kLanes)
        store(yr + d, (load(xr + d) - mu) * rs * load(sd + d) + load(bd + d));
      mean->typed_data()[r] = mu;
      rstd->typed_data()[r] = rs;
    }
  });
  return ffi::Error::Success();
}

ffi::Error NormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias) {
  const int64_t D = scale.element_count(), M = D ? static_cast<int64_t>(x.element_count()) / D : 0;
  Parallel parallel(pool);
  const int64_t blocks = (M + kRows - 1) / kRows, parts = std::max<int64_t>(1, std::min(kParts, blocks));
  float* acc = scratch().get(3, parts * 2 * D);  // [part][dscale; dbias]; the caller's role 3 (items use 0)
  parallel.run(parts, [&](int64_t part, int) {
    float* ds = acc + part * 2 * D;
    float* db = ds + D;
    std::memset(ds, 0, sizeof(float) * 2 * D);
    float* g = scratch().get(0, 2 * D);
    float* xh = g + D;
    const int64_t r_lo = part * blocks / parts * kRows, r_hi = std::min(M, (part + 1) * blocks / parts * kRows);
    for (int64_t r = r_lo; r < r_hi; ++r) {
      const float* xr = x.typed_data() + r * D;
      const float* dyr = dy.typed_data() + r * D;
      const float mu = mean.typed_data()[r], rs = rstd.typed_data()[r];
      vf mg = vf{}, mgx = vf{};
      for (int64_t d = 0; d < D; d += kLanes) {
        const vf xh_ = (load(xr + d) - mu) * rs, dy_ = load(dyr + d), g_ = dy_ * load(scale.typed_data() + d);
        store(xh + d, xh_);
        store(g + d, g_);
        mg += g_;
        mgx += g_ * xh_;
        store(ds + d, load(ds + d) + dy_ * xh_);
        store(db + d, load(db + d) + dy_);
      }
      const float mgs = hsum(mg) / D, mgxs = hsum(mgx) / D;
      float* dxr = dx->typed_data() + r * D;
      for (int64_t d = 0; d < D; d += kLanes)
        store(dxr + d, rs * (load(g + d) - mgs - load(xh + d) * mgxs));
    }
  });
  for (int64_t d = 0; d < D; ++d) {
    float s = 0.f, b = 0.f;
    for (int64_t p = 0; p < parts; ++p) {
      s += acc[p * 2 * D + d];
      b += acc[p * 2 * D + D + d];
    }
    dscale->typed_data()[d] = s;
    dbias->typed_data()[d] = b;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLayerNormForward, NormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxLayerNormBackward, NormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias
