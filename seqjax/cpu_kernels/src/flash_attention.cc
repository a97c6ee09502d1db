// Flash attention for the CPU, as two XLA FFI handlers (forward, backward).
//
// The algorithm is the one of seqjax/ops/attention_blockwise.py (read its docstring first): tiles of `bq` query
// positions x `bk` keys, an online softmax in the forward pass, and a backward pass that recomputes the
// probabilities from the saved log-sum-exp, key-major (one work item per key block). What this file adds is what
// XLA cannot do for that program on a CPU: it runs each tile's matmuls, exp and masking back to back while the
// tile is in the L1/L2 cache, with register-blocked SIMD matmuls, and spreads the work items over XLA's intra-op
// thread pool (XLA runs the fusions inside a loop body on one core).
//
// Legend: B batch, T queries, S keys, N query heads, K kv heads, G = N / K, H head dim. A query tile holds the G
// heads of one kv group folded into its rows: row r = t_local * G + g, so R = bq * G rows.
//
// Masks come as one canonical form (built by seqjax/ops/attention_native.py from the mask objects):
//   visible(b, t, s) = band_lo <= s - t <= band_hi   (causal, sliding windows; offsets folded in)
//                    & q_seg[b, t] == kv_seg[b, s] & q_seg[b, t] != pad_id   (packed sequences)
//                    & s < kv_len[b]                  (key padding)
// each term optional. Tiles are classified EMPTY (skipped), FULL (no mask arithmetic) or PARTIAL per (b, i, j).
//
// Buffers are row-major float32 in the jax.nn.dot_product_attention layout: q [B, T, N, H], k and v [B, S, K, H].
// Internally every operand is re-packed once per call into tiles padded to multiples of 16 floats (one SIMD
// vector), so the inner kernels never see a ragged edge: padded query rows are never written back, padded key
// columns get score -inf.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace seqjax_native;  // NOLINT

// ---- problem and masks --------------------------------------------------------------------------------------
enum Kind { kEmpty = 0, kPartial = 1, kFull = 2 };

struct Problem {
  int64_t B, T, S, N, K, G, H;
  int64_t bq, bk, nq, nk, R, Hp, bkp;
  float scale;
  bool has_band;
  int64_t band_lo, band_hi;
  bool has_seg, has_pad;
  int32_t pad_id;
  const int32_t* q_seg;   // [B, T]
  const int32_t* kv_seg;  // [B, S]
  bool has_len;
  const int32_t* kv_len;  // [B]
  // id ranges of each tile's segment ids, [B * nq] and [B * nk]
  std::vector<int32_t> q_min, q_max, kv_min, kv_max;

  int64_t t_first(int64_t i) const { return i * bq; }
  int64_t q_rows_valid(int64_t i) const { return std::min(bq, T - i * bq); }
  int64_t kv_cols_valid(int64_t j) const { return std::min(bk, S - j * bk); }

  void init_ranges() {
    if (!has_seg) return;
    q_min.resize(B * nq); q_max.resize(B * nq); kv_min.resize(B * nk); kv_max.resize(B * nk);
    auto range = [](const int32_t* ids, int64_t lo, int64_t n, int32_t* mn, int32_t* mx) {
      int32_t a = ids[lo], b = ids[lo];
      for (int64_t x = lo + 1; x < lo + n; ++x) { a = std::min(a, ids[x]); b = std::max(b, ids[x]); }
      *mn = a; *mx = b;
    };
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < nq; ++i)
        range(q_seg + b * T, i * bq, q_rows_valid(i), &q_min[b * nq + i], &q_max[b * nq + i]);
      for (int64_t j = 0; j < nk; ++j)
        range(kv_seg + b * S, j * bk, kv_cols_valid(j), &kv_min[b * nk + j], &kv_max[b * nk + j]);
    }
  }

  Kind kind(int64_t b, int64_t i, int64_t j) const {
    const int64_t t0 = i * bq, t1 = t0 + q_rows_valid(i) - 1;
    const int64_t s0 = j * bk, s1 = s0 + kv_cols_valid(j) - 1;
    Kind k = kFull;
    if (has_band) {
      const int64_t d_min = s0 - t1, d_max = s1 - t0;
      if (d_max < band_lo || d_min > band_hi) return kEmpty;
      if (d_min < band_lo || d_max > band_hi) k = kPartial;
    }
    if (has_len) {
      const int64_t len = kv_len[b];
      if (s0 >= len) return kEmpty;
      if (s1 >= len) k = kPartial;
    }
    if (has_seg) {
      const int32_t qa = q_min[b * nq + i], qb = q_max[b * nq + i];
      const int32_t ka = kv_min[b * nk + j], kb = kv_max[b * nk + j];
      if (qb < ka || kb < qa) return kEmpty;
      if (has_pad && qa == pad_id && qb == pad_id) return kEmpty;
      if (!(qa == qb && ka == kb && qa == ka && !(has_pad && qa == pad_id))) k = kPartial;
    }
    return k;
  }

  // Sets hidden scores of a PARTIAL tile (rows R, columns ncols, leading dim bkp) to -inf.
  void apply_mask(float* s, int64_t b, int64_t i, int64_t j) const {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const int64_t s0 = j * bk, ncols = kv_cols_valid(j);
    const int64_t rows = q_rows_valid(i);
    for (int64_t tl = 0; tl < rows; ++tl) {
      const int64_t t = i * bq + tl;
      int64_t lo = 0, hi = ncols;  // visible columns by position: [lo, hi)
      if (has_band) {
        lo = std::max<int64_t>(lo, std::min<int64_t>(ncols, t + band_lo - s0));
        hi = std::min<int64_t>(hi, std::max<int64_t>(0, t + band_hi - s0 + 1));
      }
      if (has_len) hi = std::min<int64_t>(hi, std::max<int64_t>(0, kv_len[b] - s0));
      const int32_t qid = has_seg ? q_seg[b * T + t] : 0;
      const bool q_is_pad = has_seg && has_pad && qid == pad_id;
      for (int64_t g = 0; g < G; ++g) {
        float* row = s + (tl * G + g) * bkp;
        if (q_is_pad || lo >= hi) {
          for (int64_t c = 0; c < ncols; ++c) row[c] = neg_inf;
          continue;
        }
        for (int64_t c = 0; c < lo; ++c) row[c] = neg_inf;
        for (int64_t c = hi; c < ncols; ++c) row[c] = neg_inf;
        if (has_seg) {
          const int32_t* ks = kv_seg + b * S + s0;
          for (int64_t c = lo; c < hi; ++c)
            if (ks[c] != qid) row[c] = neg_inf;
        }
      }
    }
  }
};

// Padded key columns [ncols, bkp) of a score tile get -inf.
inline void mask_padding_columns(float* s, int64_t rows, int64_t ncols, int64_t bkp) {
  if (ncols == bkp) return;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = ncols; c < bkp; ++c) s[r * bkp + c] = neg_inf;
}

// ---- packing ------------------------------------------------------------------------------------------------
// Query-side tile of x [B, T, N, H] for (b, kh, i): rows r = tl * G + g, [R, Hp], times `mul`, zero-padded.
void pack_q_tile(const Problem& p, const float* x, int64_t b, int64_t kh, int64_t i, float mul, float* dst) {
  std::memset(dst, 0, sizeof(float) * p.R * p.Hp);
  const int64_t rows = p.q_rows_valid(i);
  for (int64_t tl = 0; tl < rows; ++tl) {
    const int64_t t = i * p.bq + tl;
    const float* src = x + ((b * p.T + t) * p.N + kh * p.G) * p.H;
    for (int64_t g = 0; g < p.G; ++g) {
      float* d = dst + (tl * p.G + g) * p.Hp;
      for (int64_t h = 0; h < p.H; ++h) d[h] = mul * src[g * p.H + h];
    }
  }
}

// Key-side tiles of x [B, S, K, H] for (b, kh, j): rows [bkp, Hp] and/or columns [Hp, bkp], zero-padded.
void pack_kv_tile(const Problem& p, const float* x, int64_t b, int64_t kh, int64_t j, float* rows_dst,
                  float* cols_dst) {
  if (rows_dst) std::memset(rows_dst, 0, sizeof(float) * p.bkp * p.Hp);
  if (cols_dst) std::memset(cols_dst, 0, sizeof(float) * p.bkp * p.Hp);
  const int64_t ncols = p.kv_cols_valid(j);
  for (int64_t c = 0; c < ncols; ++c) {
    const float* src = x + ((b * p.S + j * p.bk + c) * p.K + kh) * p.H;
    if (rows_dst) std::memcpy(rows_dst + c * p.Hp, src, sizeof(float) * p.H);
    if (cols_dst)
      for (int64_t h = 0; h < p.H; ++h) cols_dst[h * p.bkp + c] = src[h];
  }
}

// ---- handlers -----------------------------------------------------------------------------------------------
ffi::Error make_problem(Problem& p, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                        ffi::Buffer<ffi::S32>& q_seg, ffi::Buffer<ffi::S32>& kv_seg, ffi::Buffer<ffi::S32>& kv_len,
                        int64_t block_q, int64_t block_kv, float scale, bool has_band, int64_t band_lo,
                        int64_t band_hi, bool has_seg, bool has_pad, int64_t pad_id, bool has_len) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("seqjax flash attention: rank-4 q, k");
  p.B = qd[0]; p.T = qd[1]; p.N = qd[2]; p.H = qd[3];
  p.S = kd[1]; p.K = kd[2];
  if (kd[0] != p.B || kd[3] != p.H || p.K <= 0 || p.N % p.K)
    return ffi::Error::InvalidArgument("seqjax flash attention: q and k shapes disagree");
  if (block_q <= 0 || block_kv <= 0) return ffi::Error::InvalidArgument("seqjax flash attention: blocks > 0");
  p.G = p.N / p.K;
  p.bq = std::min(block_q, std::max<int64_t>(1, p.T));
  p.bk = std::min(block_kv, std::max<int64_t>(1, p.S));
  p.nq = (p.T + p.bq - 1) / p.bq;
  p.nk = (p.S + p.bk - 1) / p.bk;
  p.R = p.bq * p.G;
  p.Hp = round_up(p.H, kLanes);
  p.bkp = round_up(p.bk, kLanes);
  p.scale = scale;
  p.has_band = has_band; p.band_lo = band_lo; p.band_hi = band_hi;
  p.has_seg = has_seg; p.has_pad = has_pad; p.pad_id = static_cast<int32_t>(pad_id);
  p.q_seg = q_seg.typed_data(); p.kv_seg = kv_seg.typed_data();
  p.has_len = has_len; p.kv_len = kv_len.typed_data();
  p.init_ranges();
  return ffi::Error::Success();
}

ffi::Error FlashForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                        ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                        ffi::Buffer<ffi::S32> kv_len, ffi::ResultBuffer<ffi::F32> out,
                        ffi::ResultBuffer<ffi::F32> lse, int64_t block_q, int64_t block_kv, float scale,
                        bool has_band, int64_t band_lo, int64_t band_hi, bool has_seg, bool has_pad, int64_t pad_id,
                        bool has_len) {
  Problem p;
  if (auto err = make_problem(p, q, k, q_seg, kv_seg, kv_len, block_q, block_kv, scale, has_band, band_lo, band_hi,
                              has_seg, has_pad, pad_id, has_len);
      !err.success())
    return err;
  Parallel parallel(pool);
  const float* qd = q.typed_data();
  float* od = out->typed_data();
  float* lsed = lse->typed_data();
  const int64_t groups = p.B * p.K, kv_tile = p.bkp * p.Hp, q_tile = p.R * p.Hp, s_tile = p.R * p.bkp;
  // An item is one (b, kh) group's query blocks split, split + splits, ...; it packs each key block it visits
  // once (k^T columns and v rows) and keeps them for its other query blocks.
  const int64_t splits = splits_for(groups, p.nq, parallel.max_slots(groups * p.nq));
  parallel.run(groups * splits, [&](int64_t item, int) {
    const int64_t split = item / groups, bk = item % groups, b = bk / p.K, kh = bk % p.K;
    Scratch& sc = scratch();
    float* kT_tiles = sc.get(0, p.nk * kv_tile);
    float* v_tiles = sc.get(1, p.nk * kv_tile);
    float* qp = sc.get(2, q_tile);
    float* acc = sc.get(3, q_tile);
    float* s = sc.get(4, s_tile);
    float* ml = sc.get(5, 2 * p.R);
    float* m = ml;
    float* l = ml + p.R;
    sc.flags.assign(p.nk, 0);
    const float neg_init = -1e30f, inf = std::numeric_limits<float>::infinity();
    for (int64_t i = split; i < p.nq; i += splits) {
      pack_q_tile(p, qd, b, kh, i, p.scale, qp);
      std::memset(acc, 0, sizeof(float) * q_tile);
      std::fill(m, m + p.R, neg_init);
      std::fill(l, l + p.R, 0.f);
      const int64_t R = p.q_rows_valid(i) * p.G;
      for (int64_t j = 0; j < p.nk; ++j) {
        const Kind kind = p.kind(b, i, j);
        if (kind == kEmpty) continue;
        float* kT = kT_tiles + j * kv_tile;
        float* vt = v_tiles + j * kv_tile;
        if (!sc.flags[j]) {
          pack_kv_tile(p, k.typed_data(), b, kh, j, nullptr, kT);
          pack_kv_tile(p, v.typed_data(), b, kh, j, vt, nullptr);
          sc.flags[j] = 1;
        }
        const int64_t ncols = p.kv_cols_valid(j);
        gemm(R, p.bkp, p.H, qp, p.Hp, 1, kT, p.bkp, s, p.bkp, false);
        mask_padding_columns(s, R, ncols, p.bkp);
        if (kind == kPartial) p.apply_mask(s, b, i, j);
        for (int64_t r = 0; r < R; ++r) {
          float* row = s + r * p.bkp;
          vf mx = splat(m[r]);
          for (int64_t c = 0; c < p.bkp; c += kLanes) {
            const vf x = load(row + c);
            mx = x > mx ? x : mx;
          }
          const float m_new = hmax(mx);
          const vf mv = splat(m_new);
          vf sum = vf{};
          for (int64_t c = 0; c < p.bkp; c += kLanes) {
            const vf e = vexp(load(row + c) - mv);
            store(row + c, e);
            sum += e;
          }
          const float alpha = std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = m_new;
          if (alpha != 1.f) {
            float* a = acc + r * p.Hp;
            for (int64_t h = 0; h < p.Hp; h += kLanes) store(a + h, load(a + h) * alpha);
          }
        }
        gemm(R, p.Hp, ncols, s, p.bkp, 1, vt, p.Hp, acc, p.Hp, true);
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = i * p.bq + r / p.G, n = kh * p.G + r % p.G;
        float* o = od + ((b * p.T + t) * p.N + n) * p.H;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t h = 0; h < p.H; ++h) o[h] = acc[r * p.Hp + h] * inv;
        lsed[(b * p.T + t) * p.N + n] = l[r] > 0.f ? m[r] + std::log(l[r]) : inf;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error FlashBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                         ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                         ffi::Buffer<ffi::S32> kv_len, ffi::ResultBuffer<ffi::F32> dq,
                         ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, int64_t block_q,
                         int64_t block_kv, float scale, bool has_band, int64_t band_lo, int64_t band_hi, bool has_seg,
                         bool has_pad, int64_t pad_id, bool has_len) {
  Problem p;
  if (auto err = make_problem(p, q, k, q_seg, kv_seg, kv_len, block_q, block_kv, scale, has_band, band_lo, band_hi,
                              has_seg, has_pad, pad_id, has_len);
      !err.success())
    return err;
  Parallel parallel(pool);
  const int64_t groups = p.B * p.K, q_tile = p.R * p.Hp, kv_tile = p.bkp * p.Hp, s_tile = p.R * p.bkp;
  const int64_t dq_size = p.nq * q_tile;  // one group's packed dQ
  // An item is one (b, kh) group's key blocks split, split + splits, ...; it packs each query block it visits
  // once (scaled q rows, dO rows, lse, delta = rowsum(dO * out)) and accumulates the group's dQ privately. With
  // several splits per group the partial dQs are summed at the end.
  const int64_t splits = splits_for(groups, p.nk, parallel.max_slots(groups * p.nk));
  std::vector<float> dq_parts(splits > 1 ? splits * groups * dq_size : 0);
  const float inf = std::numeric_limits<float>::infinity();
  auto write_dq = [&](int64_t b, int64_t kh, int64_t i, const float* packed) {  // packed [R, Hp] -> dq * scale
    const int64_t R = p.q_rows_valid(i) * p.G;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = i * p.bq + r / p.G, n = kh * p.G + r % p.G;
      float* dst = dq->typed_data() + ((b * p.T + t) * p.N + n) * p.H;
      for (int64_t h = 0; h < p.H; ++h) dst[h] = packed[r * p.Hp + h] * p.scale;
    }
  };
  parallel.run(groups * splits, [&](int64_t item, int) {
    const int64_t split = item / groups, bk = item % groups, b = bk / p.K, kh = bk % p.K;
    Scratch& sc = scratch();
    float* q_tiles = sc.get(0, dq_size);
    float* do_tiles = sc.get(1, dq_size);
    float* dq_acc = splits > 1 ? dq_parts.data() + (split * groups + bk) * dq_size : sc.get(2, dq_size);
    float* stats = sc.get(3, 2 * p.nq * p.R);  // lse, delta per packed row
    float* kv = sc.get(4, 3 * kv_tile + 2 * kv_tile);
    float* kT = kv;
    float* k_rows = kT + kv_tile;
    float* vT = k_rows + kv_tile;
    float* dk_acc = vT + kv_tile;
    float* dv_acc = dk_acc + kv_tile;
    float* pt = sc.get(5, 2 * s_tile);
    float* ds = pt + s_tile;
    std::memset(dq_acc, 0, sizeof(float) * dq_size);
    sc.flags.assign(p.nq, 0);
    for (int64_t j = split; j < p.nk; j += splits) {
      const int64_t ncols = p.kv_cols_valid(j);
      bool packed_kv = false;
      std::memset(dk_acc, 0, sizeof(float) * 2 * kv_tile);
      for (int64_t i = 0; i < p.nq; ++i) {
        const Kind kind = p.kind(b, i, j);
        if (kind == kEmpty) continue;
        const int64_t R = p.q_rows_valid(i) * p.G;
        float* qp = q_tiles + i * q_tile;
        float* dop = do_tiles + i * q_tile;
        float* ls = stats + i * p.R;
        float* de = stats + (p.nq + i) * p.R;
        if (!sc.flags[i]) {
          pack_q_tile(p, q.typed_data(), b, kh, i, p.scale, qp);
          pack_q_tile(p, d_out.typed_data(), b, kh, i, 1.f, dop);
          std::fill(ls, ls + p.R, inf);
          std::fill(de, de + p.R, 0.f);
          for (int64_t r = 0; r < R; ++r) {
            const int64_t t = i * p.bq + r / p.G, n = kh * p.G + r % p.G, off = (b * p.T + t) * p.N + n;
            ls[r] = lse.typed_data()[off];
            const float* o = out.typed_data() + off * p.H;
            const float* g = d_out.typed_data() + off * p.H;
            float acc = 0.f;
            for (int64_t h = 0; h < p.H; ++h) acc += o[h] * g[h];
            de[r] = acc;
          }
          sc.flags[i] = 1;
        }
        if (!packed_kv) {
          pack_kv_tile(p, k.typed_data(), b, kh, j, k_rows, kT);
          pack_kv_tile(p, v.typed_data(), b, kh, j, nullptr, vT);
          packed_kv = true;
        }
        gemm(R, p.bkp, p.H, qp, p.Hp, 1, kT, p.bkp, pt, p.bkp, false);  // scores
        mask_padding_columns(pt, R, ncols, p.bkp);
        if (kind == kPartial) p.apply_mask(pt, b, i, j);
        for (int64_t r = 0; r < R; ++r) {
          float* row = pt + r * p.bkp;
          const vf lv = splat(ls[r]);
          for (int64_t c = 0; c < p.bkp; c += kLanes) store(row + c, vexp(load(row + c) - lv));
        }
        gemm(ncols, p.Hp, R, pt, 1, p.bkp, dop, p.Hp, dv_acc, p.Hp, true);              // dV += P^T dO
        gemm(R, p.bkp, p.H, dop, p.Hp, 1, vT, p.bkp, ds, p.bkp, false);                 // dP = dO V^T
        for (int64_t r = 0; r < R; ++r) {
          float* d = ds + r * p.bkp;
          const float* pr = pt + r * p.bkp;
          const vf dr = splat(de[r]);
          for (int64_t c = 0; c < p.bkp; c += kLanes) store(d + c, load(pr + c) * (load(d + c) - dr));
        }
        gemm(ncols, p.Hp, R, ds, 1, p.bkp, qp, p.Hp, dk_acc, p.Hp, true);               // dK += dS^T q
        gemm(R, p.Hp, ncols, ds, p.bkp, 1, k_rows, p.Hp, dq_acc + i * q_tile, p.Hp, true);  // dQ += dS k
      }
      for (int64_t c = 0; c < ncols; ++c) {
        const int64_t off = ((b * p.S + j * p.bk + c) * p.K + kh) * p.H;
        std::memcpy(dk->typed_data() + off, dk_acc + c * p.Hp, sizeof(float) * p.H);
        std::memcpy(dv->typed_data() + off, dv_acc + c * p.Hp, sizeof(float) * p.H);
      }
    }
    if (splits == 1)
      for (int64_t i = 0; i < p.nq; ++i) write_dq(b, kh, i, dq_acc + i * q_tile);
  });
  if (splits > 1) {
    parallel.run(groups * p.nq, [&](int64_t item, int) {
      const int64_t bk = item / p.nq, i = item % p.nq;
      float* total = scratch().get(0, q_tile);
      std::memcpy(total, dq_parts.data() + bk * dq_size + i * q_tile, sizeof(float) * q_tile);
      for (int64_t s = 1; s < splits; ++s) {
        const float* part = dq_parts.data() + (s * groups + bk) * dq_size + i * q_tile;
        for (int64_t x = 0; x < q_tile; x += kLanes) store(total + x, load(total + x) + load(part + x));
      }
      write_dq(bk / p.K, bk % p.K, i, total);
    });
  }
  return ffi::Error::Success();
}

// The tile and mask attributes both handlers take, in their order in the handlers' signatures.
template <typename Binding>
auto with_tile_and_mask_attrs(Binding binding) {
  return std::move(binding).template Attr<int64_t>("block_q")
      .template Attr<int64_t>("block_kv")
      .template Attr<float>("scale")
      .template Attr<bool>("has_band")
      .template Attr<int64_t>("band_lo")
      .template Attr<int64_t>("band_hi")
      .template Attr<bool>("has_seg")
      .template Attr<bool>("has_pad")
      .template Attr<int64_t>("pad_id")
      .template Attr<bool>("has_len");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxFlashForward, FlashForward,
                              with_tile_and_mask_attrs(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_len
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()));  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxFlashBackward, FlashBackward,
                              with_tile_and_mask_attrs(ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v
                                  .Arg<ffi::Buffer<ffi::F32>>()   // out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // d_out
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_len
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()));  // dv
