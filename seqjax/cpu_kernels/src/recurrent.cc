// Recurrent cells (LSTM, GRU, Elman RNN) for the CPU: the serial part of a recurrence as two XLA FFI handlers.
//
// Legend: T steps, B batch, H hidden width (a multiple of 16), G gates (LSTM 4, GRU 3, RNN 1), GH = G * H, S state
// arrays (LSTM 2: h and c; the others 1: h), A per-step residual arrays, U hidden units per part. Time-major,
// row-major float32. Gate layouts are PyTorch's (seqjax/ops/recurrent.py).
//
// forward  "seqjax_rnn_fwd"
//   in : x [T, B, I], w_ih [GH, I], w_hh [GH, H], b_ih, b_hh [GH], state0 [S, B, H], keep u8 [T, B],
//        reset u8 [T, B]
//   out: ys [T, B, H], state_T [S, B, H]; with `save` = 1 or 2, also the residuals states_in [S, T, B, H] (the
//        state entering each step, after resets), and with `save` = 1 aux [T, B, A * H] (LSTM: the gate activations
//        i, f, g, o; GRU: r, z,
//        n and W_hn h + b_hn; RNN: the new h).
// backward "seqjax_rnn_bwd"
//   in : x (I a multiple of 16), w_ih, w_hh, b_ih, b_hh, aux, states_in, keep, reset, dys [T, B, H],
//        dstate_T [S, B, H]; with `remat`, aux is empty and each part recomputes its units' activations of a step
//        from states_in (two more small matmuls per part and step, for (S + A) / S times less residual memory)
//   out: dx [T, B, I], dstate0 [S, B, H], dw_ih [GH, I], dw_hh [GH, H], db_ih, db_hh [GH]: the whole backward pass
//        (the per-step gradients of the pre-activations never leave the cache).
//
// A step is cut into parts of U hidden units. A part computes its units' columns of all G gates (x_t W_ih^T and
// h W_hh^T: [B, I] x [I, G * U] and [B, H] x [H, G * U] matmuls against packed slices of the weights) and their
// pointwise update, so the parts of a step are independent and `Parallel::run_staged` puts a barrier between
// steps. The input projection is done here, per step, rather than as one big matmul beforehand: its [T, B, GH]
// result would be written to memory and read back with a stride per batch row, which measured slower than the
// in-cache matmul (the packed slices of both weights stay in the cores' L2 for the whole sequence). The backward pass fuses, per part, step
// t + 1's [B, GH] x [GH, U] product (the part's units of dh) with step t's pointwise gradient: one barrier per step.
// Every output element is computed by one part in a fixed order, whatever the threads: bitwise deterministic.
//
// Masks as in seqjax.ops.recurrent: keep = 0 leaves the state unchanged and emits 0; reset = 1 replaces the state
// entering the step by state0.

#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace seqjax_native;  // NOLINT

// ---- cells: the pointwise update of 16 units and its gradient -------------------------------------------------
// fwd(xg, hg, in, out, aux): xg[g] = input pre-activation + b_ih, hg[g] = W_hh h + b_hh of gate g; in[s] the state
// entering the step; out[s] the new state (out[0] = h is also the output); aux[a] the residuals.
// bwd(aux, in, dout, dgx, dhz, dir): dout[s] the gradient of the new state; dgx[g], dhz[g] those of xg and hg;
// dir[s] the gradient of `in` not through W_hh h (the caller adds dhz W_hh to dir[0]).
struct Lstm {
  static constexpr int G = 4, S = 2, A = 4;
  static constexpr bool kSeparateDhz = false;
  static void fwd(const vf* xg, const vf* hg, const vf* in, vf* out, vf* aux) {
    const vf i = vsigmoid(xg[0] + hg[0]), f = vsigmoid(xg[1] + hg[1]);
    const vf g = vtanh(xg[2] + hg[2]), o = vsigmoid(xg[3] + hg[3]);
    const vf c = f * in[1] + i * g;
    out[0] = o * vtanh(c);
    out[1] = c;
    aux[0] = i, aux[1] = f, aux[2] = g, aux[3] = o;
  }
  static void bwd(const vf* aux, const vf* in, const vf* dout, vf* dgx, vf* dhz, vf* dir) {
    const vf i = aux[0], f = aux[1], g = aux[2], o = aux[3];
    const vf tc = vtanh(f * in[1] + i * g);
    const vf dc = dout[1] + dout[0] * o * (1.f - tc * tc);
    dgx[0] = dc * g * i * (1.f - i);
    dgx[1] = dc * in[1] * f * (1.f - f);
    dgx[2] = dc * i * (1.f - g * g);
    dgx[3] = dout[0] * tc * o * (1.f - o);
    for (int k = 0; k < G; ++k) dhz[k] = dgx[k];
    dir[0] = splat(0.f);
    dir[1] = dc * f;
  }
};

struct Gru {
  static constexpr int G = 3, S = 1, A = 4;
  static constexpr bool kSeparateDhz = true;
  static void fwd(const vf* xg, const vf* hg, const vf* in, vf* out, vf* aux) {
    const vf r = vsigmoid(xg[0] + hg[0]), z = vsigmoid(xg[1] + hg[1]);
    const vf n = vtanh(xg[2] + r * hg[2]);
    out[0] = n + z * (in[0] - n);
    aux[0] = r, aux[1] = z, aux[2] = n, aux[3] = hg[2];
  }
  static void bwd(const vf* aux, const vf* in, const vf* dout, vf* dgx, vf* dhz, vf* dir) {
    const vf r = aux[0], z = aux[1], n = aux[2], hn = aux[3];
    const vf dh = dout[0];
    const vf dn = dh * (1.f - z) * (1.f - n * n);
    dgx[0] = dhz[0] = dn * hn * r * (1.f - r);
    dgx[1] = dhz[1] = dh * (in[0] - n) * z * (1.f - z);
    dgx[2] = dn;
    dhz[2] = dn * r;
    dir[0] = dh * z;
  }
};

template <bool kRelu>
struct Rnn {
  static constexpr int G = 1, S = 1, A = 1;
  static constexpr bool kSeparateDhz = false;
  static void fwd(const vf* xg, const vf* hg, const vf*, vf* out, vf* aux) {
    const vf u = xg[0] + hg[0];
    out[0] = aux[0] = kRelu ? (vf)(u > splat(0.f) ? u : splat(0.f)) : vtanh(u);
  }
  static void bwd(const vf* aux, const vf*, const vf* dout, vf* dgx, vf* dhz, vf* dir) {
    const vf h = aux[0];
    dgx[0] = dhz[0] = kRelu ? (vf)(h > splat(0.f) ? dout[0] : splat(0.f)) : dout[0] * (1.f - h * h);
    dir[0] = splat(0.f);
  }
};

enum CellKind : int64_t { kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3 };

// fn(Cell{}) for the cell type of `cell` (checked by check_dims).
template <class Fn>
void with_cell(int64_t cell, Fn&& fn) {
  switch (cell) {
    case kLstm: fn(Lstm{}); break;
    case kGru: fn(Gru{}); break;
    case kRnnTanh: fn(Rnn<false>{}); break;
    default: fn(Rnn<true>{}); break;
  }
}

int64_t gates_of(int64_t cell) { return cell == kLstm ? 4 : cell == kGru ? 3 : 1; }
int64_t states_of(int64_t cell) { return cell == kLstm ? 2 : 1; }

// ---- problem layout --------------------------------------------------------------------------------------------
struct Layout {
  int64_t T, B, H, G, U, parts;
  int64_t GH() const { return G * H; }
  int64_t first(int64_t p) const { return p * U; }
  int64_t units(int64_t p) const { return std::min(U, H - p * U); }
};

// U: a multiple of 16 giving every thread about four parts per step (fewer, wider parts when H is large).
Layout layout_of(int64_t T, int64_t B, int64_t H, int64_t G, int threads) {
  const int64_t blocks = H / kLanes;
  const int64_t U = kLanes * std::max<int64_t>(1, blocks / (4 * threads));
  return Layout{T, B, H, G, U, (H + U - 1) / U};
}

ffi::Error check_dims(int64_t cell, ffi::Buffer<ffi::F32>& w_hh, int64_t GH, int64_t B, ffi::Buffer<ffi::U8>& keep,
                      ffi::Buffer<ffi::U8>& reset, int64_t T, int64_t* H) {
  if (cell < kLstm || cell > kRnnRelu) return ffi::Error::InvalidArgument("seqjax native rnn: unknown cell");
  auto wd = w_hh.dimensions();
  if (wd.size() != 2 || wd[0] != GH || wd[0] != gates_of(cell) * wd[1] || wd[1] % kLanes)
    return ffi::Error::InvalidArgument("seqjax native rnn: w_hh must be [G*H, H] with H a multiple of 16");
  *H = wd[1];
  auto kd = keep.dimensions(), rd = reset.dimensions();
  if (kd.size() != 2 || kd[0] != T || kd[1] != B || rd.size() != 2 || rd[0] != T || rd[1] != B)
    return ffi::Error::InvalidArgument("seqjax native rnn: keep and reset must be [T, B]");
  return ffi::Error::Success();
}

// ---- forward ---------------------------------------------------------------------------------------------------
struct Forward {
  Layout L;
  int64_t I;
  const float *x, *b_ih, *b_hh, *state0, *wih_pack, *whh_pack;  // packs [parts][I or H][G * U]
  const uint8_t *keep, *reset;
  float *ys, *state_T, *states_in, *aux;  // states_in, aux: null unless saving
  float* ring;                            // [2][S][B][H] states entering a step when not saving
  int64_t S;

  float* in(int64_t t, int64_t s) const {
    const int64_t bh = L.B * L.H;
    return states_in ? states_in + (s * L.T + t) * bh : ring + ((t & 1) * S + s) * bh;
  }
};

// Part p's columns of W_hh^T (column g * u + j <-> row g * H + first(p) + j of w_hh, u = units(p)) as panels of 32
// columns, each [H, 32] contiguous: a panel is read as one sequential stream and stays in L1 across the register
// tiles of the batch rows (a [H, G * u] slice with its long row stride would not).
constexpr int64_t kPanel = kNV * kLanes;

void pack_forward(const Layout& L, const float* w, int64_t K, float* wpack) {  // w [GH, K] -> wpack [parts][K][G * U]
  for (int64_t p = 0; p < L.parts; ++p) {
    const int64_t u0 = L.first(p), u = L.units(p), gu = L.G * u;
    float* part = wpack + p * K * L.G * L.U;
    for (int64_t n0 = 0; n0 < gu; n0 += kPanel) {
      const int64_t width = std::min(kPanel, gu - n0);
      float* panel = part + n0 * K;
      for (int64_t n = n0; n < n0 + width; ++n) {
        const float* row = w + ((n / u) * L.H + u0 + n % u) * K;
        for (int64_t k = 0; k < K; ++k) panel[k * width + (n - n0)] = row[k];
      }
    }
  }
}

// c[:, :G * u] = a [rows, K] x (a part packed by pack_forward), panel by panel.
void part_matmul(int64_t rows, int64_t K, int64_t gu, const float* a, const float* part, float* c) {
  for (int64_t n0 = 0; n0 < gu; n0 += kPanel) {
    const int64_t width = std::min(kPanel, gu - n0);
    gemm(rows, width, K, a, K, 1, part + n0 * K, width, c + n0, gu, false);
  }
}

template <class C>
void forward_part(const Forward& F, int64_t t, int64_t p) {
  const Layout& L = F.L;
  const int64_t u0 = L.first(p), u = L.units(p), gu = C::G * u, H = L.H, B = L.B;
  // The units' pre-activations: x_t W_ih^T and h W_hh^T against the part's packed weight slices.
  float* gx = scratch().get(0, B * gu);
  float* hz = scratch().get(1, B * gu);
  part_matmul(B, F.I, gu, F.x + t * B * F.I, F.wih_pack + p * F.I * C::G * L.U, gx);
  part_matmul(B, H, gu, F.in(t, 0), F.whh_pack + p * H * C::G * L.U, hz);
  const bool last = t + 1 == L.T;
  for (int64_t b = 0; b < B; ++b) {
    const bool keep = F.keep[t * B + b];
    const bool reset_next = !last && F.reset[(t + 1) * B + b];
    for (int64_t j = 0; j < u; j += kLanes) {
      const int64_t col = u0 + j;
      vf xg[C::G], hg[C::G], in[C::S], out[C::S], ax[C::A];
      for (int g = 0; g < C::G; ++g) {
        xg[g] = load(gx + b * gu + g * u + j) + load(F.b_ih + g * H + col);
        hg[g] = load(hz + b * gu + g * u + j) + load(F.b_hh + g * H + col);
      }
      for (int s = 0; s < C::S; ++s) in[s] = load(F.in(t, s) + b * H + col);
      C::fwd(xg, hg, in, out, ax);
      if (F.aux)
        for (int a = 0; a < C::A; ++a) store(F.aux + (t * B + b) * C::A * H + a * H + col, ax[a]);
      store(F.ys + (t * B + b) * H + col, keep ? out[0] : splat(0.f));
      for (int s = 0; s < C::S; ++s) {
        const vf v = keep ? out[s] : in[s];
        if (last) {
          store(F.state_T + (s * B + b) * H + col, v);
        } else {
          store(F.in(t + 1, s) + b * H + col, reset_next ? load(F.state0 + (s * B + b) * H + col) : v);
        }
      }
    }
  }
}

ffi::Error RnnForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih,
                      ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_ih, ffi::Buffer<ffi::F32> b_hh, ffi::Buffer<ffi::F32> state0,
                      ffi::Buffer<ffi::U8> keep, ffi::Buffer<ffi::U8> reset, ffi::ResultBuffer<ffi::F32> ys,
                      ffi::ResultBuffer<ffi::F32> state_T, ffi::ResultBuffer<ffi::F32> states_in,
                      ffi::ResultBuffer<ffi::F32> aux, int64_t cell, int64_t save) {
  auto xd = x.dimensions(), wd = w_ih.dimensions();
  if (xd.size() != 3 || wd.size() != 2 || wd[1] != xd[2])
    return ffi::Error::InvalidArgument("seqjax native rnn: x must be [T, B, I] and w_ih [G*H, I]");
  const int64_t T = xd[0], B = xd[1], I = xd[2];
  int64_t H;
  if (auto err = check_dims(cell, w_hh, wd[0], B, keep, reset, T, &H); !err.success()) return err;
  const int64_t S = states_of(cell);
  if (T == 0 || B == 0) {  // no steps: the final state is the initial one
    std::memcpy(state_T->typed_data(), state0.typed_data(), sizeof(float) * S * B * H);
    return ffi::Error::Success();
  }
  Parallel parallel(pool);
  const Layout L = layout_of(T, B, H, gates_of(cell), parallel.max_slots(1 << 20));
  Scratch& own = scratch();  // the caller's roles 3-5 (items use 0-2)
  float* wih_pack = own.get(3, L.parts * I * L.G * L.U);
  float* whh_pack = own.get(5, L.parts * H * L.G * L.U);
  pack_forward(L, w_ih.typed_data(), I, wih_pack);
  pack_forward(L, w_hh.typed_data(), H, whh_pack);
  Forward F{L, I, x.typed_data(), b_ih.typed_data(), b_hh.typed_data(), state0.typed_data(), wih_pack, whh_pack,
            keep.typed_data(), reset.typed_data(), ys->typed_data(), state_T->typed_data(),
            save ? states_in->typed_data() : nullptr, save == 1 ? aux->typed_data() : nullptr,
            save ? nullptr : own.get(4, 2 * S * B * H), S};
  std::memcpy(F.in(0, 0), F.state0, sizeof(float) * B * H);
  if (S == 2) std::memcpy(F.in(0, 1), F.state0 + B * H, sizeof(float) * B * H);
  with_cell(cell, [&](auto c) {
    using C = decltype(c);
    parallel.run_staged(T, L.parts, [&](int64_t t, int64_t p) { forward_part<C>(F, t, p); });
  });
  return ffi::Error::Success();
}

// ---- backward --------------------------------------------------------------------------------------------------
struct Backward {
  Layout L;
  int64_t I, UI;  // input width (a multiple of 16) and the input columns of dx each part computes
  const float *x, *whh_pack, *wih_pack, *aux, *states_in, *dys, *dstate_T;  // packs [parts][GH][U or UI]
  const float *b_ih, *b_hh, *fwd_wih_pack, *fwd_whh_pack;  // remat (aux == null): the forward's packs
  const uint8_t *keep, *reset;
  float *dx, *dstate0, *db_ih, *db_hh;
  float* ring;    // [2][2][B][GH]: dgx and dhz of the last two steps (dhz == dgx for LSTM and RNN)
  float* direct;  // [S][B][H]: dir of the step processed last, per part's units
  float* acc;     // [parts][I + H][G * U]: the parts' weight-gradient accumulators (x rows, then h rows)

  float* dgx_of(int64_t t) const { return ring + (t & 1) * 2 * L.B * L.GH(); }
  float* dhz_of(int64_t t, bool separate) const { return dgx_of(t) + (separate ? L.B * L.GH() : 0); }
};

// wpack[p][r][j] = w[r, c0(p) + j] for j < width(p): a part's columns of w [GH, K], contiguous.
template <class C0, class W>
void pack_columns(const Layout& L, const float* w, int64_t K, int64_t stride, C0 c0, W width, float* wpack) {
  for (int64_t p = 0; p < L.parts; ++p) {
    const int64_t n = width(p);
    float* dst = wpack + p * L.GH() * stride;
    for (int64_t r = 0; n > 0 && r < L.GH(); ++r) std::memcpy(dst + r * n, w + r * K + c0(p), sizeof(float) * n);
  }
}

// Stage k of part p handles step t = T - 1 - k (and k = T finishes at t = -1):
//  1. from step t + 1's gradients (all parts'): the part's units of dhz W_hh, and its input columns of
//     dx_{t+1} = dgx W_ih;
//  2. the gradient of the state step t produced (those products plus direct terms, through the resets);
//  3. step t's pointwise gradient for the part's units (into the ring, and the bias gradients);
//  4. the part's weight gradients: dW_ih^T += x_t^T dgx, dW_hh^T += h_in^T dhz (rank-B updates of accumulators
//     that stay in the part's core's cache; no [T, B, GH] gradient is ever written to memory).
template <class C>
void backward_part(const Backward& D, int64_t k, int64_t p) {
  const Layout& L = D.L;
  const int64_t t = L.T - 1 - k, u0 = L.first(p), u = L.units(p), gu = C::G * u, GH = L.GH(), H = L.H, B = L.B;
  const int64_t I = D.I, ui0 = p * D.UI, ui = std::max<int64_t>(0, std::min(D.UI, I - ui0));
  Scratch& sc = scratch();
  float* dcar = sc.get(0, C::S * B * u);  // [S][B][u]: gradient of the state after step t
  if (t == L.T - 1) {
    for (int s = 0; s < C::S; ++s)
      for (int64_t b = 0; b < B; ++b)
        std::memcpy(dcar + (s * B + b) * u, D.dstate_T + (s * B + b) * H + u0, sizeof(float) * u);
  } else {
    if (t >= 0) {  // what step t's pointwise gradient reads, fetched while the matmuls run
      for (int a = 0; D.aux && a < C::A; ++a) prefetch_rows(D.aux + t * B * C::A * H + a * H + u0, B, C::A * H, u);
      for (int s = 0; s < C::S; ++s) prefetch_rows(D.states_in + (s * L.T + t) * B * H + u0, B, H, u);
      prefetch_rows(D.dys + t * B * H + u0, B, H, u);
    }
    float* dm = sc.get(1, B * u);
    gemm(B, u, GH, D.dhz_of(t + 1, C::kSeparateDhz), GH, 1, D.whh_pack + p * GH * L.U, u, dm, u, false);
    if (ui > 0)
      gemm(B, ui, GH, D.dgx_of(t + 1), GH, 1, D.wih_pack + p * GH * D.UI, ui, D.dx + (t + 1) * B * I + ui0, I,
           false);
    for (int64_t b = 0; b < B; ++b) {
      const bool reset = D.reset[(t + 1) * B + b];
      for (int s = 0; s < C::S; ++s)
        for (int64_t j = 0; j < u; j += kLanes) {
          vf d = load(D.direct + (s * B + b) * H + u0 + j);
          if (s == 0) d += load(dm + b * u + j);
          float* d0 = D.dstate0 + (s * B + b) * H + u0 + j;
          if (reset) store(d0, load(d0) + d);
          store(dcar + (s * B + b) * u + j, reset ? splat(0.f) : d);
        }
    }
  }
  if (t < 0) {  // step 0 entered with state0
    for (int s = 0; s < C::S; ++s)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < u; j += kLanes) {
          float* d0 = D.dstate0 + (s * B + b) * H + u0 + j;
          store(d0, load(d0) + load(dcar + (s * B + b) * u + j));
        }
    return;
  }
  float* dgl = sc.get(2, 4 * B * gu);  // the part's dgx and dhz of step t, [B][G * u] each
  float* dhl = dgl + B * gu;
  float* rgx = dhl + B * gu;  // remat: the recomputed x_t W_ih^T and h W_hh^T of the part's units
  float* rhz = rgx + B * gu;
  if (!D.aux) {
    part_matmul(B, I, gu, D.x + t * B * I, D.fwd_wih_pack + p * I * C::G * L.U, rgx);
    part_matmul(B, H, gu, D.states_in + t * B * H, D.fwd_whh_pack + p * H * C::G * L.U, rhz);
  }
  float* dgx = D.dgx_of(t);
  float* dhz = D.dhz_of(t, C::kSeparateDhz);
  for (int64_t j = 0; j < u; j += kLanes) {
    const int64_t col = u0 + j;
    vf dbi[C::G], dbh[C::G];
    for (int g = 0; g < C::G; ++g) dbi[g] = dbh[g] = splat(0.f);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = t * B + b;
      vf dout[C::S], dg[C::G], dh[C::G], dir[C::S];
      for (int s = 0; s < C::S; ++s) dout[s] = load(dcar + (s * B + b) * u + j);
      if (D.keep[row]) {
        vf ax[C::A], in[C::S];
        dout[0] += load(D.dys + row * H + col);
        for (int s = 0; s < C::S; ++s) in[s] = load(D.states_in + (s * L.T + t) * B * H + b * H + col);
        if (D.aux) {
          for (int a = 0; a < C::A; ++a) ax[a] = load(D.aux + row * C::A * H + a * H + col);
        } else {  // the forward step again, for this part's units
          vf xg[C::G], hg[C::G], out[C::S];
          for (int g = 0; g < C::G; ++g) {
            xg[g] = load(rgx + b * gu + g * u + j) + load(D.b_ih + g * H + col);
            hg[g] = load(rhz + b * gu + g * u + j) + load(D.b_hh + g * H + col);
          }
          C::fwd(xg, hg, in, out, ax);
        }
        C::bwd(ax, in, dout, dg, dh, dir);
      } else {  // the state passed through unchanged and the output was 0
        for (int g = 0; g < C::G; ++g) dg[g] = dh[g] = splat(0.f);
        for (int s = 0; s < C::S; ++s) dir[s] = dout[s];
      }
      for (int g = 0; g < C::G; ++g) {
        store(dgl + b * gu + g * u + j, dg[g]);
        store(dgx + b * GH + g * H + col, dg[g]);
        if (C::kSeparateDhz) {
          store(dhl + b * gu + g * u + j, dh[g]);
          store(dhz + b * GH + g * H + col, dh[g]);
        }
        dbi[g] += dg[g];
        dbh[g] += dh[g];
      }
      for (int s = 0; s < C::S; ++s) store(D.direct + (s * B + b) * H + col, dir[s]);
    }
    for (int g = 0; g < C::G; ++g) {
      store(D.db_ih + g * H + col, load(D.db_ih + g * H + col) + dbi[g]);
      store(D.db_hh + g * H + col, load(D.db_hh + g * H + col) + dbh[g]);
    }
  }
  const bool first = t == L.T - 1;  // the accumulators start at this step's products
  float* acc = D.acc + p * (I + H) * C::G * L.U;
  gemm(I, gu, B, D.x + t * B * I, 1, I, dgl, gu, acc, gu, !first);  // dW_ih^T += x_t^T dgx
  gemm(H, gu, B, D.states_in + t * B * H, 1, H, C::kSeparateDhz ? dhl : dgl, gu, acc + I * gu, gu,
       !first);  // dW_hh^T += h_in^T dhz
}

ffi::Error RnnBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih,
                       ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> b_ih, ffi::Buffer<ffi::F32> b_hh,
                       ffi::Buffer<ffi::F32> aux, ffi::Buffer<ffi::F32> states_in,
                       ffi::Buffer<ffi::U8> keep, ffi::Buffer<ffi::U8> reset, ffi::Buffer<ffi::F32> dys,
                       ffi::Buffer<ffi::F32> dstate_T, ffi::ResultBuffer<ffi::F32> dx,
                       ffi::ResultBuffer<ffi::F32> dstate0, ffi::ResultBuffer<ffi::F32> dw_ih,
                       ffi::ResultBuffer<ffi::F32> dw_hh, ffi::ResultBuffer<ffi::F32> db_ih,
                       ffi::ResultBuffer<ffi::F32> db_hh, int64_t cell, int64_t remat) {
  auto xd = x.dimensions(), wd = w_ih.dimensions();
  if (xd.size() != 3 || wd.size() != 2 || wd[1] != xd[2] || xd[2] % kLanes)
    return ffi::Error::InvalidArgument(
        "seqjax native rnn: x must be [T, B, I] and w_ih [G*H, I] with I a multiple of 16");
  const int64_t T = xd[0], B = xd[1], I = xd[2];
  int64_t H;
  if (auto err = check_dims(cell, w_hh, wd[0], B, keep, reset, T, &H); !err.success()) return err;
  Parallel parallel(pool);
  const int64_t S = states_of(cell), G = gates_of(cell), GH = G * H;
  const Layout L = layout_of(T, B, H, G, parallel.max_slots(1 << 20));
  std::memset(dstate0->typed_data(), 0, sizeof(float) * S * B * H);
  std::memset(db_ih->typed_data(), 0, sizeof(float) * GH);
  std::memset(db_hh->typed_data(), 0, sizeof(float) * GH);
  if (T == 0 || B == 0) {
    std::memset(dw_ih->typed_data(), 0, sizeof(float) * GH * I);
    std::memset(dw_hh->typed_data(), 0, sizeof(float) * GH * H);
    if (B) std::memcpy(dstate0->typed_data(), dstate_T.typed_data(), sizeof(float) * S * B * H);
    return ffi::Error::Success();
  }
  const int64_t UI = kLanes * ((I / kLanes + L.parts - 1) / L.parts);
  Scratch& own = scratch();  // the caller's roles 3-5 (items use 0-2)
  const int64_t fwd_pack = remat ? L.parts * (I + H) * G * L.U : 0;
  float* packs = own.get(3, L.parts * GH * (L.U + UI) + fwd_pack);
  float* whh_pack = packs;
  float* wih_pack = packs + L.parts * GH * L.U;
  float* fwd_wih_pack = wih_pack + L.parts * GH * UI;
  float* fwd_whh_pack = fwd_wih_pack + L.parts * I * G * L.U;
  if (remat) {
    pack_forward(L, w_ih.typed_data(), I, fwd_wih_pack);
    pack_forward(L, w_hh.typed_data(), H, fwd_whh_pack);
  }
  pack_columns(L, w_hh.typed_data(), H, L.U, [&](int64_t p) { return L.first(p); },
               [&](int64_t p) { return L.units(p); }, whh_pack);
  pack_columns(L, w_ih.typed_data(), I, UI, [&](int64_t p) { return p * UI; },
               [&](int64_t p) { return std::max<int64_t>(0, std::min(UI, I - p * UI)); }, wih_pack);
  float* bufs = own.get(4, 4 * B * GH + S * B * H);
  float* acc = own.get(5, L.parts * (I + H) * G * L.U);
  Backward D{L, I, UI, x.typed_data(), whh_pack, wih_pack, remat ? nullptr : aux.typed_data(),
             states_in.typed_data(), dys.typed_data(), dstate_T.typed_data(), b_ih.typed_data(), b_hh.typed_data(),
             fwd_wih_pack, fwd_whh_pack, keep.typed_data(), reset.typed_data(), dx->typed_data(),
             dstate0->typed_data(), db_ih->typed_data(), db_hh->typed_data(), bufs, bufs + 4 * B * GH, acc};
  with_cell(cell, [&](auto c) {  // stage k handles step T - 1 - k; stage T finishes at step -1
    using C = decltype(c);
    parallel.run_staged(T + 1, L.parts, [&](int64_t k, int64_t p) { backward_part<C>(D, k, p); });
  });
  // The accumulators [I + H][G * u] of each part, transposed into dW_ih [GH, I] and dW_hh [GH, H].
  parallel.run(L.parts, [&](int64_t p, int) {
    const int64_t u0 = L.first(p), u = L.units(p), gu = G * u;
    const float* a = acc + p * (I + H) * G * L.U;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < u; ++j) {
        float* ri = dw_ih->typed_data() + (g * H + u0 + j) * I;
        float* rh = dw_hh->typed_data() + (g * H + u0 + j) * H;
        for (int64_t i = 0; i < I; ++i) ri[i] = a[i * gu + g * u + j];
        for (int64_t h = 0; h < H; ++h) rh[h] = a[(I + h) * gu + g * u + j];
      }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxRnnForward, RnnForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // state0
                                  .Arg<ffi::Buffer<ffi::U8>>()   // keep
                                  .Arg<ffi::Buffer<ffi::U8>>()   // reset
                                  .Ret<ffi::Buffer<ffi::F32>>()  // ys
                                  .Ret<ffi::Buffer<ffi::F32>>()  // state_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // states_in (empty unless save)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // aux (empty unless save == 1)
                                  .Attr<int64_t>("cell")
                                  .Attr<int64_t>("save"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqjaxRnnBackward, RnnBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_ih
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_hh
                                  .Arg<ffi::Buffer<ffi::F32>>()  // aux (empty with remat)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // states_in
                                  .Arg<ffi::Buffer<ffi::U8>>()   // keep
                                  .Arg<ffi::Buffer<ffi::U8>>()   // reset
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dstate_T
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dstate0
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw_hh
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db_ih
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db_hh
                                  .Attr<int64_t>("cell")
                                  .Attr<int64_t>("remat"));
