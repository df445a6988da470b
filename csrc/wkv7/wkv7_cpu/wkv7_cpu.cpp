// RWKV-7 WKV recurrence (the generalised delta rule) on the CPU: forward and backward, parallel over (batch, head).
//
// Layout (the package's torch op, visualrwkv_hf.ops.wkv7): r, w, k, v, a, b are (B, T, H, N); the state S is
// (B, H, N, N), key-major (row i = key channel, column j = value channel). w is the raw log-log decay: the per-step
// log-decay is lw = -exp(min(w, ln 60)) and the decay d = exp(lw), as in the torch forms. Per head and step:
//   sa_t = a_t S_{t-1},   S_t = diag(d_t) S_{t-1} + b_t^T sa_t + k_t^T v_t,   y_t = r_t S_t
// Math runs in float32 (float64 for float64 inputs, so gradcheck works); y and the final state come back in that
// type whatever the input dtype.
//
// Backward, with G_t = dL/dS_t: G_T is the final-state gradient plus r_T^T dy_T, and going back one step
//   dsa = b G_t,   G_{t-1} = diag(d_t) G_t + a_t^T dsa + r_{t-1}^T dy_{t-1}
// while step t's gradients are row sums against G_t and the states on both sides of the step:
//   dr = S_t dy^T,  dk = G_t v^T,  db = G_t sa^T,  da = S_{t-1} dsa^T,  dd_i = sum_j G_t[i, j] S_{t-1}[i, j],
//   dv = k G_t,     dw = dd * d * lw (0 above the clamp, as torch's clamp).
// The transition diag(d) + b^T a may be singular (a full erasure, a decay at the clamp), so states are never
// recovered by inverting a step: a first pass keeps the state entering every chunk of kChunk steps (N^2 / kChunk
// floats per step and head while the backward runs), and the second pass, chunk by chunk backwards, recomputes the
// chunk's states from its checkpoint and then walks its steps backwards.
//
// Every loop over a state row is along the contiguous value index j (`omp simd`, with the row sums as simd
// reductions); the state of a head (16 KB at N = 64) stays in L1 while its steps run.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../wkv7_checks.h"
#include "wkv7_cpu.h"

namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr double kMaxW = 4.0943445622221004;  // ln 60: the per-step log-decay is clamped at -60
// Steps per chunk: the inputs are read a chunk at a time, and the backward keeps one checkpoint per chunk and the
// chunk's states (kChunk + 1 of N^2, 272 KB at N = 64: L2) while it walks the chunk backwards.
constexpr int64_t kChunk = 16;

// Sizes of one call; every (batch, time, head, channel) array is (B, T, H, N).
struct Dims {
  int64_t B, T, H, N;
  // offset of (b, t, h, 0) for the flat head index bh = b * H + h
  int64_t offset(int64_t bh, int64_t t) const { return ((bh / H * T + t) * H + bh % H) * N; }
};

// The inputs, and the log-decay and decay computed from w by torch beforehand (vectorised exp; std::exp per element
// took about as long as a forward step).
template <typename scalar_t, typename acc_t>
struct Inputs {
  const scalar_t *r, *w, *k, *v, *a, *b;
  const acc_t *lw, *d;
  Dims dims;
};

// One chunk of one head's steps as acc_t rows (step-major, up to kChunk x N): the inputs, the decay d and the
// log-decay lw; dy in the backward.
template <typename acc_t>
struct ChunkRows {
  int64_t N;
  std::vector<acc_t> storage;
  acc_t *r, *w, *k, *v, *a, *b, *d, *lw, *dy;
  ChunkRows(int64_t N, int64_t rows) : N(N), storage(9 * rows * N) {
    acc_t* next = storage.data();
    for (acc_t** field : {&r, &w, &k, &v, &a, &b, &d, &lw, &dy}) {
      *field = next;
      next += rows * N;
    }
  }
  ChunkRows(const ChunkRows&) = delete;

  // steps first .. first + n - 1 of head bh (and their output gradients when dy_src is given)
  template <typename scalar_t>
  void load(const Inputs<scalar_t, acc_t>& in, int64_t bh, int64_t first, int64_t n, const acc_t* dy_src = nullptr) {
    for (int64_t s = 0; s < n; ++s) {
      const int64_t off = in.dims.offset(bh, first + s), row = s * N;
      for (auto [src, dst] : {std::pair{in.r, r}, {in.w, w}, {in.k, k}, {in.v, v}, {in.a, a}, {in.b, b}})
        for (int64_t i = 0; i < N; ++i) dst[row + i] = static_cast<acc_t>(src[off + i]);
      for (auto [src, dst] : {std::pair{in.lw, lw}, {in.d, d}, {dy_src, dy}})
        if (src != nullptr) std::copy(src + off, src + off + N, dst + row);
    }
  }
};

// out = c S: a combination of S's rows, four rows per pass so that out is loaded and stored once per four rows.
template <int kN, typename acc_t>
void combine_rows(const acc_t* __restrict__ S, const acc_t* __restrict__ c, acc_t* __restrict__ out, int64_t n) {
  const int64_t N = kN > 0 ? kN : n;
  std::fill(out, out + N, acc_t(0));
  int64_t i = 0;
  for (; i + 4 <= N; i += 4) {
    const acc_t *s0 = S + i * N, *s1 = s0 + N, *s2 = s1 + N, *s3 = s2 + N;
    const acc_t c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) out[j] += (c0 * s0[j] + c1 * s1[j]) + (c2 * s2[j] + c3 * s3[j]);
  }
  for (; i < N; ++i) {
    const acc_t ci = c[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) out[j] += ci * S[i * N + j];
  }
}

// One step: sa = a S_prev (into `sa`), S_next = diag(d) S_prev + b^T sa + k^T v, and y = r S_next when y is given.
// S_prev and S_next may be the same matrix (each element is read, then written, by one iteration).
template <int kN, typename acc_t>
void forward_step(const acc_t* S_prev, acc_t* S_next, const acc_t* __restrict__ r, const acc_t* __restrict__ d,
                  const acc_t* __restrict__ k, const acc_t* __restrict__ v, const acc_t* __restrict__ a,
                  const acc_t* __restrict__ b, acc_t* __restrict__ sa, acc_t* __restrict__ y, int64_t n) {
  const int64_t N = kN > 0 ? kN : n;
  combine_rows<kN>(S_prev, a, sa, N);
  if (y != nullptr) std::fill(y, y + N, acc_t(0));
  for (int64_t i = 0; i < N; ++i) {
    const acc_t di = d[i], bi = b[i], ki = k[i], ri = r[i];
    const acc_t* src = S_prev + i * N;
    acc_t* dst = S_next + i * N;
    if (y != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        const acc_t s = di * src[j] + (bi * sa[j] + ki * v[j]);
        dst[j] = s;
        y[j] += ri * s;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) dst[j] = di * src[j] + (bi * sa[j] + ki * v[j]);
    }
  }
}

// Per-step gradient rows of the backward: the row sums over j and the two accumulated rows dsa (= b G) and dv.
template <typename acc_t>
struct StepGrads {
  acc_t *dr, *dk, *db, *da, *dw, *dv, *dsa;
};

// One step backwards (see the header). G holds dL/dS_t without step t's own r^T dy on entry, dL/dS_{t-1} without
// step t-1's on return. S_prev = S_{t-1}, S_cur = S_t, sa = a_t S_{t-1}.
template <int kN, typename acc_t>
void backward_step(acc_t* __restrict__ G, const acc_t* __restrict__ S_prev, const acc_t* __restrict__ S_cur,
                   const acc_t* __restrict__ sa, const acc_t* __restrict__ r, const acc_t* __restrict__ w,
                   const acc_t* __restrict__ lw, const acc_t* __restrict__ d, const acc_t* __restrict__ k,
                   const acc_t* __restrict__ v, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                   const acc_t* __restrict__ dy, const StepGrads<acc_t>& out, int64_t n) {
  const int64_t N = kN > 0 ? kN : n;
  acc_t* __restrict__ dsa = out.dsa;
  acc_t* __restrict__ dv = out.dv;
  std::fill(dsa, dsa + N, acc_t(0));
  std::fill(dv, dv + N, acc_t(0));
  for (int64_t i = 0; i < N; ++i) {
    const acc_t ri = r[i], bi = b[i], ki = k[i];
    acc_t* g = G + i * N;
    const acc_t *sp = S_prev + i * N, *sc = S_cur + i * N;
    acc_t dr = 0, dk = 0, db = 0, dd = 0;
#pragma omp simd reduction(+ : dr, dk, db, dd)
    for (int64_t j = 0; j < N; ++j) {
      const acc_t gj = g[j] + ri * dy[j];
      g[j] = gj;
      dr += sc[j] * dy[j];
      dk += gj * v[j];
      db += gj * sa[j];
      dd += gj * sp[j];
      dsa[j] += bi * gj;
      dv[j] += ki * gj;
    }
    out.dr[i] = dr;
    out.dk[i] = dk;
    out.db[i] = db;
    // d(lw)/dw = -exp(w) = lw below the clamp, 0 above it
    out.dw[i] = w[i] > static_cast<acc_t>(kMaxW) ? acc_t(0) : dd * d[i] * lw[i];
  }
  for (int64_t i = 0; i < N; ++i) {
    const acc_t di = d[i], ai = a[i];
    acc_t* g = G + i * N;
    const acc_t* sp = S_prev + i * N;
    acc_t da = 0;
#pragma omp simd reduction(+ : da)
    for (int64_t j = 0; j < N; ++j) {
      da += sp[j] * dsa[j];
      g[j] = di * g[j] + ai * dsa[j];
    }
    out.da[i] = da;
  }
}

// Forward of heads [bh_begin, bh_end): `state` holds the initial states on entry and the final ones on return.
template <int kN, typename scalar_t, typename acc_t>
void forward_heads(const Inputs<scalar_t, acc_t>& in, acc_t* y, acc_t* state, int64_t bh_begin, int64_t bh_end) {
  const Dims& dims = in.dims;
  const int64_t N = dims.N, T = dims.T;
  ChunkRows<acc_t> rows(N, std::min(kChunk, std::max<int64_t>(T, 1)));
  std::vector<acc_t> sa(N);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    acc_t* S = state + bh * N * N;
    for (int64_t first = 0; first < T; first += kChunk) {
      const int64_t n = std::min(kChunk, T - first);
      rows.load(in, bh, first, n);
      for (int64_t s = 0, row = 0; s < n; ++s, row += N)
        forward_step<kN>(S, S, rows.r + row, rows.d + row, rows.k + row, rows.v + row, rows.a + row, rows.b + row,
                     sa.data(), y + dims.offset(bh, first + s), N);
    }
  }
}

// Output gradients of heads [bh_begin, bh_end); grad_state holds the final-state gradients (or zeros) on entry and
// the initial-state gradients on return.
template <int kN, typename scalar_t, typename acc_t>
void backward_heads(const Inputs<scalar_t, acc_t>& in, const acc_t* initial_state, const acc_t* dy, acc_t* grad_state,
                    acc_t* dr, acc_t* dw, acc_t* dk, acc_t* dv, acc_t* da, acc_t* db, int64_t bh_begin,
                    int64_t bh_end) {
  const Dims& dims = in.dims;
  const int64_t N = dims.N, NN = N * N, T = dims.T, chunks = (T + kChunk - 1) / kChunk;
  ChunkRows<acc_t> rows(N, std::min(kChunk, std::max<int64_t>(T, 1)));
  std::vector<acc_t> checkpoints(chunks * NN), states((kChunk + 1) * NN), sa(kChunk * N), scratch(2 * N);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    // pass 1: the state entering each chunk
    acc_t* S = states.data();
    if (initial_state != nullptr)
      std::copy(initial_state + bh * NN, initial_state + (bh + 1) * NN, S);
    else
      std::fill(S, S + NN, acc_t(0));
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t first = c * kChunk, n = std::min(kChunk, T - first);
      std::copy(S, S + NN, checkpoints.data() + c * NN);
      rows.load(in, bh, first, n);
      for (int64_t s = 0, row = 0; s < n; ++s, row += N)
        forward_step<kN>(S, S, rows.r + row, rows.d + row, rows.k + row, rows.v + row, rows.a + row, rows.b + row,
                     sa.data(), static_cast<acc_t*>(nullptr), N);
    }
    // pass 2: chunk by chunk backwards, the chunk's states recomputed (states[s] = S before its step s), then its
    // steps walked backwards
    acc_t* G = grad_state + bh * NN;
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t first = c * kChunk, n = std::min(kChunk, T - first);
      rows.load(in, bh, first, n, dy);
      std::copy(checkpoints.data() + c * NN, checkpoints.data() + (c + 1) * NN, states.data());
      for (int64_t s = 0, row = 0; s < n; ++s, row += N)
        forward_step<kN>(states.data() + s * NN, states.data() + (s + 1) * NN, rows.r + row, rows.d + row, rows.k + row,
                     rows.v + row, rows.a + row, rows.b + row, sa.data() + row, static_cast<acc_t*>(nullptr), N);
      for (int64_t s = n - 1; s >= 0; --s) {
        const int64_t row = s * N, off = dims.offset(bh, first + s);
        const StepGrads<acc_t> out{dr + off, dk + off, db + off, da + off, dw + off, dv + off, scratch.data()};
        backward_step<kN>(G, states.data() + s * NN, states.data() + (s + 1) * NN, sa.data() + row, rows.r + row,
                      rows.w + row, rows.lw + row, rows.d + row, rows.k + row, rows.v + row, rows.a + row,
                      rows.b + row, rows.dy + row, out, N);
      }
    }
  }
}

// Calls fn with the head size as a compile-time constant where it is RWKV-7's 64 (the row loops unroll whole, with no
// remainder handling: forward and backward 1.2-1.4x faster), else with 0 (the size read at run time).
template <typename Fn>
void with_head_size(int64_t N, Fn&& fn) {
  if (N == 64)
    fn(std::integral_constant<int, 64>{});
  else
    fn(std::integral_constant<int, 0>{});
}

torch::ScalarType acc_dtype(const torch::Tensor& r) {
  return r.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

// Heads per parallel task: enough state updates per task (~T N^2 each) that a short call (a decode step) is not
// spread over threads whose start-up costs more than its work.
int64_t heads_per_task(const Dims& dims) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, dims.T * dims.N * dims.N));
}

Dims dims_of(const torch::Tensor& r) { return Dims{r.size(0), r.size(1), r.size(2), r.size(3)}; }

// The contiguous inputs, then lw and d (acc dtype): see `Inputs`.
std::vector<torch::Tensor> prepare(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                                   const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b) {
  auto lw = -torch::exp(w.to(acc_dtype(r)).clamp_max(kMaxW));
  auto d = torch::exp(lw);
  return {r.contiguous(), w.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(), b.contiguous(),
          lw.contiguous(), d};
}

template <typename scalar_t, typename acc_t>
Inputs<scalar_t, acc_t> inputs_of(const std::vector<torch::Tensor>& c, const Dims& dims) {
  return {c[0].data_ptr<scalar_t>(), c[1].data_ptr<scalar_t>(), c[2].data_ptr<scalar_t>(),
          c[3].data_ptr<scalar_t>(), c[4].data_ptr<scalar_t>(), c[5].data_ptr<scalar_t>(),
          c[6].data_ptr<acc_t>(),    c[7].data_ptr<acc_t>(),    dims};
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> wkv7_forward_cpu(const torch::Tensor& r, const torch::Tensor& w,
                                                          const torch::Tensor& k, const torch::Tensor& v,
                                                          const torch::Tensor& a, const torch::Tensor& b,
                                                          const std::optional<torch::Tensor>& initial_state) {
  wkv7_check_inputs(r, w, k, v, a, b, initial_state);
  const Dims dims = dims_of(r);
  const auto acc = r.options().dtype(acc_dtype(r));
  const auto c = prepare(r, w, k, v, a, b);
  auto y = torch::empty(r.sizes(), acc);
  // a copy: the kernel writes the final state into it
  auto state = initial_state.has_value() ? initial_state->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous()
                                         : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv7_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto in = inputs_of<scalar_t, acc_t>(c, dims);
    at::parallel_for(0, dims.B * dims.H, heads_per_task(dims), [&](int64_t begin, int64_t end) {
      with_head_size(dims.N, [&](auto head_size) {
        forward_heads<decltype(head_size)::value>(in, y.data_ptr<acc_t>(), state.data_ptr<acc_t>(), begin, end);
      });
    });
  });
  return {y, state};
}

WKV7Grads wkv7_backward_cpu(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                            const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b,
                            const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                            const std::optional<torch::Tensor>& grad_final_state) {
  wkv7_check_inputs(r, w, k, v, a, b, initial_state);
  wkv7_check_grad_y(r, grad_y);
  const Dims dims = dims_of(r);
  const auto acc = r.options().dtype(acc_dtype(r));
  const auto c = prepare(r, w, k, v, a, b);
  auto dy = grad_y.to(acc).contiguous();
  std::optional<torch::Tensor> s0;
  if (initial_state.has_value()) s0 = initial_state->to(acc).contiguous();
  // the backward walks the state gradient from the final state's to the initial state's in place
  auto grad_state = grad_final_state.has_value()
                        ? grad_final_state->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous()
                        : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  std::vector<torch::Tensor> grads;
  for (int i = 0; i < 6; ++i) grads.push_back(torch::empty(r.sizes(), acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv7_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto in = inputs_of<scalar_t, acc_t>(c, dims);
    at::parallel_for(0, dims.B * dims.H, heads_per_task(dims), [&](int64_t begin, int64_t end) {
      with_head_size(dims.N, [&](auto head_size) {
        backward_heads<decltype(head_size)::value>(
            in, s0.has_value() ? s0->data_ptr<acc_t>() : nullptr, dy.data_ptr<acc_t>(), grad_state.data_ptr<acc_t>(),
            grads[0].data_ptr<acc_t>(), grads[1].data_ptr<acc_t>(), grads[2].data_ptr<acc_t>(),
            grads[3].data_ptr<acc_t>(), grads[4].data_ptr<acc_t>(), grads[5].data_ptr<acc_t>(), begin, end);
      });
    });
  });
  const auto dtype = r.scalar_type();
  // the initial-state gradient comes back even without an initial state (the caller drops it): one fixed schema
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {grads[0].to(dtype), grads[1].to(dtype), grads[2].to(dtype), grads[3].to(dtype),
          grads[4].to(dtype), grads[5].to(dtype), grad_initial_state};
}
