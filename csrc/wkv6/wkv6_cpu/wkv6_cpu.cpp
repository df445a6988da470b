// RWKV-6 WKV recurrence on the CPU: forward and backward, parallel over (batch, head).
//
// Layout (the package's torch op): r, k, v, w are (B, T, H, N); u is (H, N); the state S is (B, H, N, N),
// key-major (row i = key channel, column j = value channel). w is the raw log-log decay: the per-step log-decay is
// -exp(min(w, ln 60)), so the decay never drops below e^-60 and exp(w) never overflows.
//   y_t = r_t (diag(u) k_t^T v_t + S_{t-1}),   S_t = diag(d_t) S_{t-1} + k_t^T v_t
// State and decay math run in float32 (float64 for float64 inputs, so gradcheck works); y and the final state are
// float32 whatever the input dtype.
//
// Backward without storing states (O(1) memory per head): a forward sweep recomputes S_{t-1} for dr and for
// A_t = r_t * (S_{t-1} dy_t); a backward sweep carries G_t = dL/dS_t for dk, dv and B_t = k_t * (G_t v_t). The
// gradient of the log-decay at step t sums every (key s, query tau) pair with s < t < tau, which is
// sum_{tau > t} A_tau - sum_{s >= t} B_s (the final-state gradient acting as the query tau = T + 1); that running
// difference is carried in float64 so the cancellation costs nothing measurable.
//
// Everything happens inside the per-head loops: inputs are read, converted and turned into decays in place, and
// outputs (y, dr, dk, dv, dw) are written straight into (B, T, H, N). Separate torch passes for the decay, the
// transposes and dw cost more than the recurrence itself at N = 64.
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "wkv6_cpu.h"

namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr double kMaxW = 4.0943445622221004;  // ln 60: the per-step log-decay is clamped at -60

// exp for float32 that the compiler vectorises (std::exp is a libm call per element): 2^n * p(f) with
// f = x - n ln 2 in [-ln2 / 2, ln2 / 2] and a degree-6 polynomial, within 2 ulp of expf over [-87, 88].
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float f = std::fma(n, -0.693359375f, x);  // ln 2 in two parts, so n ln 2 is exact enough
  f = std::fma(n, 2.12194440e-4f, f);
  float p = 1.9875691500e-4f;
  p = std::fma(p, f, 1.3981999507e-3f);
  p = std::fma(p, f, 8.3334519073e-3f);
  p = std::fma(p, f, 4.1665795894e-2f);
  p = std::fma(p, f, 1.6666665459e-1f);
  p = std::fma(p, f, 5.0000001201e-1f);
  p = std::fma(p, f * f, f + 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp_vectorisable(double x) { return std::exp(x); }

// One step of one head: r, k, v, w converted to acc_t, the per-step log-decay lw = -exp(min(w, ln 60)) and decay d.
template <typename acc_t>
struct Step {
  std::vector<acc_t> storage;
  acc_t *r, *k, *v, *w, *lw, *d;
  explicit Step(int64_t N) : storage(6 * N) {
    r = storage.data();
    k = r + N;
    v = k + N;
    w = v + N;
    lw = w + N;
    d = lw + N;
  }
  template <typename scalar_t>
  void load(const scalar_t* r_in, const scalar_t* k_in, const scalar_t* v_in, const scalar_t* w_in, int64_t N) {
    for (int64_t i = 0; i < N; ++i) {
      r[i] = static_cast<acc_t>(r_in[i]);
      k[i] = static_cast<acc_t>(k_in[i]);
      v[i] = static_cast<acc_t>(v_in[i]);
      w[i] = static_cast<acc_t>(w_in[i]);
    }
    // separate loops so each vectorises (needs -fno-trapping-math for the clamps)
    for (int64_t i = 0; i < N; ++i) lw[i] = -exp_vectorisable(std::min(w[i], static_cast<acc_t>(kMaxW)));
    for (int64_t i = 0; i < N; ++i) d[i] = exp_vectorisable(lw[i]);
  }
};

// Sizes, and the layout shared by every (batch, time, head, channel) array of one call: (B, T, H, N) as the op
// receives them, or head-major (B, H, T, N), where one head's steps are contiguous.
struct Dims {
  int64_t B, T, H, N;
  bool head_major;
  // offset of (b, t, h, 0) for the flat head index bh = b * H + h
  int64_t offset(int64_t bh, int64_t t) const {
    return head_major ? (bh * T + t) * N : ((bh / H * T + t) * H + bh % H) * N;
  }
};

// Steps ahead to prefetch: a head's consecutive steps lie H * N elements apart, too far for the hardware prefetcher.
constexpr int64_t kPrefetch = 4;

// Prefetch the rows of step t of one head in each of `tensors` ((B, T, H, N) arrays of `element_size` bytes).
inline void prefetch_step(std::initializer_list<const void*> tensors, int64_t element_size, const Dims& dims,
                          int64_t bh, int64_t t) {
  if (t < 0 || t >= dims.T) return;
  const int64_t offset = dims.offset(bh, t) * element_size;
  for (const void* tensor : tensors) {
    const char* row = static_cast<const char*>(tensor) + offset;
    for (int64_t byte = 0; byte < dims.N * element_size; byte += 64) __builtin_prefetch(row + byte);
  }
}

// y_t and the state update for one head and step, four key rows per pass over the columns (a quarter of the loads
// and stores of y_t that one row per pass would cost).
template <typename acc_t>
inline void forward_step(const Step<acc_t>& in, const acc_t* __restrict__ uh, acc_t* __restrict__ S,
                         acc_t* __restrict__ yt, int64_t N) {
  const acc_t* __restrict__ v = in.v;
  acc_t bonus = 0;
  for (int64_t i = 0; i < N; ++i) bonus += in.r[i] * uh[i] * in.k[i];
  for (int64_t j = 0; j < N; ++j) yt[j] = bonus * v[j];
  int64_t i = 0;
  for (; i + 3 < N; i += 4) {
    acc_t* __restrict__ S0 = S + i * N;
    acc_t* __restrict__ S1 = S0 + N;
    acc_t* __restrict__ S2 = S1 + N;
    acc_t* __restrict__ S3 = S2 + N;
    const acc_t* r = in.r + i;
    const acc_t* d = in.d + i;
    const acc_t* k = in.k + i;
    for (int64_t j = 0; j < N; ++j) {
      yt[j] += r[0] * S0[j] + r[1] * S1[j] + r[2] * S2[j] + r[3] * S3[j];
      S0[j] = d[0] * S0[j] + k[0] * v[j];
      S1[j] = d[1] * S1[j] + k[1] * v[j];
      S2[j] = d[2] * S2[j] + k[2] * v[j];
      S3[j] = d[3] * S3[j] + k[3] * v[j];
    }
  }
  for (; i < N; ++i) {
    acc_t* __restrict__ S0 = S + i * N;
    for (int64_t j = 0; j < N; ++j) {
      yt[j] += in.r[i] * S0[j];
      S0[j] = in.d[i] * S0[j] + in.k[i] * v[j];
    }
  }
}

// kN > 0 fixes the head size at compile time (fully unrolled, vectorised rows); kN == 0 takes it at run time. Each
// thread runs its heads one after the other, so a head's N x N state stays in L1.
template <int kN, typename scalar_t, typename acc_t>
void forward_heads(const scalar_t* r, const scalar_t* k, const scalar_t* v, const scalar_t* w, const acc_t* u,
                   acc_t* y, acc_t* state, Dims dims, int64_t bh_begin, int64_t bh_end) {
  const int64_t N = kN > 0 ? kN : dims.N;
  Step<acc_t> in(N);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    acc_t* S = state + bh * N * N;
    const acc_t* uh = u + (bh % dims.H) * N;
    for (int64_t t = 0; t < dims.T; ++t) {
      prefetch_step({r, k, v, w}, sizeof(scalar_t), dims, bh, t + kPrefetch);
      const int64_t off = dims.offset(bh, t);
      in.load(r + off, k + off, v + off, w + off, N);
      forward_step(in, uh, S, y + off, N);
    }
  }
}

// kR consecutive rows M_q of an N x N matrix: dots_q = M_q . x (before the update), then M_q <- decay_q M_q + a_q b;
// with kAccumulate, also acc += sum_q c_q M_q (before the update). kR independent reductions keep the FMA pipes busy
// where one running sum would wait on its own latency every column block.
template <int kR, bool kAccumulate, typename acc_t>
inline void rows_dot_then_decay(acc_t* __restrict__ M, int64_t N, const acc_t* __restrict__ decay,
                                const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                                const acc_t* __restrict__ x, acc_t* __restrict__ dots,
                                const acc_t* __restrict__ c = nullptr, acc_t* __restrict__ acc = nullptr) {
  acc_t* __restrict__ M0 = M;
  acc_t* __restrict__ M1 = M + (kR > 1 ? N : 0);
  acc_t* __restrict__ M2 = M + (kR > 2 ? 2 * N : 0);
  acc_t* __restrict__ M3 = M + (kR > 3 ? 3 * N : 0);
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < N; ++j) {
    const acc_t m0 = M0[j];
    s0 += m0 * x[j];
    M0[j] = decay[0] * m0 + a[0] * b[j];
    if constexpr (kR == 4) {
      const acc_t m1 = M1[j], m2 = M2[j], m3 = M3[j];
      s1 += m1 * x[j];
      s2 += m2 * x[j];
      s3 += m3 * x[j];
      M1[j] = decay[1] * m1 + a[1] * b[j];
      M2[j] = decay[2] * m2 + a[2] * b[j];
      M3[j] = decay[3] * m3 + a[3] * b[j];
      if constexpr (kAccumulate) acc[j] += c[0] * m0 + c[1] * m1 + c[2] * m2 + c[3] * m3;
    } else if constexpr (kAccumulate) {
      acc[j] += c[0] * m0;
    }
  }
  dots[0] = s0;
  if constexpr (kR == 4) {
    dots[1] = s1;
    dots[2] = s2;
    dots[3] = s3;
  }
}

template <int kN, typename scalar_t, typename acc_t>
void backward_heads(const scalar_t* r, const scalar_t* k, const scalar_t* v, const scalar_t* w, const acc_t* u,
                    const acc_t* dy, const acc_t* grad_final_state, acc_t* state, acc_t* grad_state, acc_t* dr,
                    acc_t* dk, acc_t* dv, acc_t* dw, acc_t* du_per_head, Dims dims, int64_t bh_begin,
                    int64_t bh_end) {
  const int64_t N = kN > 0 ? kN : dims.N;
  Step<acc_t> in(N);
  std::vector<acc_t> dots(N);
  std::vector<double> decay_grad_carry(N);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    const acc_t* __restrict__ uh = u + (bh % dims.H) * N;
    // Forward sweep: dr, the u-gradient, and A_t (kept in dw until the backward sweep consumes it).
    acc_t* __restrict__ S = state + bh * N * N;
    acc_t* __restrict__ du = du_per_head + bh * N;
    for (int64_t t = 0; t < dims.T; ++t) {
      prefetch_step({r, k, v, w}, sizeof(scalar_t), dims, bh, t + kPrefetch);
      prefetch_step({dy}, sizeof(acc_t), dims, bh, t + kPrefetch);
      const int64_t off = dims.offset(bh, t);
      in.load(r + off, k + off, v + off, w + off, N);
      const acc_t* __restrict__ dyt = dy + off;
      acc_t v_dy = 0;
      for (int64_t j = 0; j < N; ++j) v_dy += in.v[j] * dyt[j];
      acc_t* __restrict__ s_dy = dots.data();  // (S_{t-1} dy_t)_i
      int64_t i = 0;
      for (; i + 3 < N; i += 4) rows_dot_then_decay<4, false>(S + i * N, N, in.d + i, in.k + i, in.v, dyt, s_dy + i);
      for (; i < N; ++i) rows_dot_then_decay<1, false>(S + i * N, N, in.d + i, in.k + i, in.v, dyt, s_dy + i);
      // per key channel, vectorised: dr, A_t (parked in dw) and the u-gradient
      for (int64_t c = 0; c < N; ++c) {
        dr[off + c] = s_dy[c] + uh[c] * in.k[c] * v_dy;
        dw[off + c] = in.r[c] * s_dy[c];
        du[c] += in.r[c] * in.k[c] * v_dy;
      }
    }
    // Running sum_{tau > t} A_tau - sum_{s > t} B_s per key channel, seeded with the final-state term A_{T+1}.
    std::fill(decay_grad_carry.begin(), decay_grad_carry.end(), 0.0);
    if (grad_final_state != nullptr) {
      const acc_t* dS = grad_final_state + bh * N * N;
      for (int64_t i = 0; i < N; ++i) {
        double a = 0;
        for (int64_t j = 0; j < N; ++j) a += static_cast<double>(S[i * N + j]) * dS[i * N + j];
        decay_grad_carry[i] = a;
      }
    }
    // Backward sweep: G_t = dL/dS_t gives dk, dv and B_t; dw = (log-decay gradient) * d(log-decay)/dw.
    acc_t* __restrict__ G = grad_state + bh * N * N;
    for (int64_t t = dims.T - 1; t >= 0; --t) {
      prefetch_step({r, k, v, w}, sizeof(scalar_t), dims, bh, t - kPrefetch);
      prefetch_step({dy, dw}, sizeof(acc_t), dims, bh, t - kPrefetch);
      const int64_t off = dims.offset(bh, t);
      in.load(r + off, k + off, v + off, w + off, N);
      const acc_t* __restrict__ dyt = dy + off;
      acc_t* __restrict__ dvt = dv + off;  // accumulated in place over the key rows
      acc_t v_dy = 0, ruk = 0;
      for (int64_t j = 0; j < N; ++j) v_dy += in.v[j] * dyt[j];
      for (int64_t i = 0; i < N; ++i) ruk += in.r[i] * uh[i] * in.k[i];
      for (int64_t j = 0; j < N; ++j) dvt[j] = ruk * dyt[j];
      acc_t* __restrict__ g_v = dots.data();  // (G_t v_t)_i
      int64_t i = 0;
      for (; i + 3 < N; i += 4)
        rows_dot_then_decay<4, true>(G + i * N, N, in.d + i, in.r + i, dyt, in.v, g_v + i, in.k + i, dvt);
      for (; i < N; ++i)
        rows_dot_then_decay<1, true>(G + i * N, N, in.d + i, in.r + i, dyt, in.v, g_v + i, in.k + i, dvt);
      // per key channel, vectorised: dk, and dw from the running log-decay gradient (A_t read from dw); its
      // derivative d(log-decay)/dw = -exp(w) is lw below the clamp and 0 above it (as torch's clamp)
      double* __restrict__ carry = decay_grad_carry.data();
      for (int64_t c = 0; c < N; ++c) {
        dk[off + c] = g_v[c] + uh[c] * in.r[c] * v_dy;
        const double log_decay_grad = carry[c] - static_cast<double>(in.k[c]) * g_v[c];
        carry[c] = log_decay_grad + dw[off + c];
        dw[off + c] = in.w[c] > static_cast<acc_t>(kMaxW) ? acc_t(0) : static_cast<acc_t>(log_decay_grad) * in.lw[c];
      }
    }
  }
}

template <typename Fn>
void dispatch_head_size(int64_t N, Fn&& fn) {
  if (N == 64) {
    fn(std::integral_constant<int, 64>{});
  } else {
    fn(std::integral_constant<int, 0>{});
  }
}

void check_inputs(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& w,
                  const torch::Tensor& u, const std::optional<torch::Tensor>& initial_state) {
  TORCH_CHECK(r.dim() == 4, "wkv6: r must be (batch, time, heads, head_size)");
  TORCH_CHECK(k.sizes() == r.sizes() && v.sizes() == r.sizes() && w.sizes() == r.sizes(),
              "wkv6: r, k, v, w must have the same shape");
  TORCH_CHECK(k.scalar_type() == r.scalar_type() && v.scalar_type() == r.scalar_type() &&
                  w.scalar_type() == r.scalar_type(),
              "wkv6: r, k, v, w must have the same dtype");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == r.size(2) && u.size(1) == r.size(3), "wkv6: u must be (heads, head_size)");
  if (initial_state.has_value()) {
    const auto& s = *initial_state;
    TORCH_CHECK(s.dim() == 4 && s.size(0) == r.size(0) && s.size(1) == r.size(2) && s.size(2) == r.size(3) &&
                    s.size(3) == r.size(3),
                "wkv6: initial_state must be (batch, heads, head_size, head_size)");
  }
}

torch::ScalarType acc_dtype(const torch::Tensor& r) {
  return r.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

torch::Tensor initial_or_zero_state(const std::optional<torch::Tensor>& initial_state, const Dims& dims,
                                    const torch::TensorOptions& acc) {
  // a copy: the kernels update the state in place
  return initial_state.has_value() ? initial_state->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous()
                                   : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> wkv6_forward_cpu(const torch::Tensor& r, const torch::Tensor& k,
                                                          const torch::Tensor& v, const torch::Tensor& w,
                                                          const torch::Tensor& u,
                                                          const std::optional<torch::Tensor>& initial_state) {
  check_inputs(r, k, v, w, u, initial_state);
  const Dims dims{r.size(0), r.size(1), r.size(2), r.size(3), /*head_major=*/false};
  const auto acc = r.options().dtype(acc_dtype(r));
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uc = u.to(acc).contiguous();
  auto y = torch::empty(r.sizes(), acc);
  auto state = initial_or_zero_state(initial_state, dims, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_head_size(dims.N, [&](auto head_size) {
      at::parallel_for(0, dims.B * dims.H, 1, [&](int64_t begin, int64_t end) {
        forward_heads<decltype(head_size)::value, scalar_t, acc_t>(
            rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
            uc.data_ptr<acc_t>(), y.data_ptr<acc_t>(), state.data_ptr<acc_t>(), dims, begin, end);
      });
    });
  });
  return {y, state};
}

WKV6Grads wkv6_backward_cpu(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& w, const torch::Tensor& u,
                            const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                            const std::optional<torch::Tensor>& grad_final_state) {
  check_inputs(r, k, v, w, u, initial_state);
  // Head-major copies: the backward touches ~3x the rows per step that the forward does, and walking (B, T, H, N)
  // head by head (a stride of H * N per step) cost it more than the copies do.
  const Dims dims{r.size(0), r.size(1), r.size(2), r.size(3), /*head_major=*/true};
  const auto acc = r.options().dtype(acc_dtype(r));
  auto head_major = [](const torch::Tensor& x) { return x.transpose(1, 2).contiguous(); };
  auto rc = head_major(r), kc = head_major(k), vc = head_major(v), wc = head_major(w);
  auto uc = u.to(acc).contiguous();
  auto dy = head_major(grad_y.to(acc));
  auto state = initial_or_zero_state(initial_state, dims, acc);
  std::optional<torch::Tensor> dsT;
  if (grad_final_state.has_value()) dsT = grad_final_state->to(acc).contiguous();
  auto grad_state = dsT.has_value() ? dsT->clone() : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  auto dr = torch::empty_like(rc, acc), dk = torch::empty_like(rc, acc);
  auto dv = torch::empty_like(rc, acc), dw = torch::empty_like(rc, acc);
  auto du_per_head = torch::zeros({dims.B, dims.H, dims.N}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_head_size(dims.N, [&](auto head_size) {
      at::parallel_for(0, dims.B * dims.H, 1, [&](int64_t begin, int64_t end) {
        backward_heads<decltype(head_size)::value, scalar_t, acc_t>(
            rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
            uc.data_ptr<acc_t>(), dy.data_ptr<acc_t>(), dsT.has_value() ? dsT->data_ptr<acc_t>() : nullptr,
            state.data_ptr<acc_t>(), grad_state.data_ptr<acc_t>(), dr.data_ptr<acc_t>(), dk.data_ptr<acc_t>(),
            dv.data_ptr<acc_t>(), dw.data_ptr<acc_t>(), du_per_head.data_ptr<acc_t>(), dims, begin, end);
      });
    });
  });
  const auto dtype = r.scalar_type();
  // the initial-state gradient comes back even without an initial state (the caller drops it): one fixed schema
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  auto layout = [&](const torch::Tensor& x) { return x.transpose(1, 2).to(dtype); };
  return {layout(dr), layout(dk), layout(dv), layout(dw), du_per_head.sum(0).to(u.scalar_type()), grad_initial_state};
}
