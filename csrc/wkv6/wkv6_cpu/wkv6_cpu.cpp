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
#include <ATen/Parallel.h>
#include <torch/all.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "wkv6_cpu.h"

namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The kernels read and write head-major (B, H, T, N) buffers: one head's steps are contiguous. Walking the
// (B, T, H, N) layout directly jumps H * N elements per step, which measured 1.5-2x slower (TLB and cache sets).
struct Dims {
  int64_t B, T, H, N;
  int64_t offset(int64_t bh, int64_t t) const { return (bh * T + t) * N; }
};

// One step's r, k, v of one head, converted to acc_t.
template <typename acc_t>
struct StepBuffer {
  std::vector<acc_t> storage;
  acc_t *r, *k, *v;
  explicit StepBuffer(int64_t N) : storage(3 * N) {
    r = storage.data();
    k = r + N;
    v = k + N;
  }
  template <typename scalar_t>
  void load(const scalar_t* r_in, const scalar_t* k_in, const scalar_t* v_in, int64_t N) {
    for (int64_t i = 0; i < N; ++i) {
      r[i] = static_cast<acc_t>(r_in[i]);
      k[i] = static_cast<acc_t>(k_in[i]);
      v[i] = static_cast<acc_t>(v_in[i]);
    }
  }
};

// Per-step decay exp(-exp(min(w, ln 60))) for every token at once: torch's vectorised exp, where a scalar exp per
// channel and step would cost more than the recurrence itself.
torch::Tensor log_decay(const torch::Tensor& w, torch::ScalarType acc) {
  return -torch::exp(w.to(acc).clamp_max(std::log(60.0)));
}

// kN > 0 fixes the head size at compile time (fully unrolled, vectorised rows); kN == 0 takes it at run time.
// Each thread runs its heads one after the other, so a head's N x N state stays in L1; two key rows per pass.
template <int kN, typename scalar_t, typename acc_t>
void forward_heads(const scalar_t* r, const scalar_t* k, const scalar_t* v, const acc_t* decay, const acc_t* u,
                   acc_t* y, acc_t* state, Dims dims, int64_t bh_begin, int64_t bh_end) {
  const int64_t N = kN > 0 ? kN : dims.N;
  StepBuffer<acc_t> in(N);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    for (int64_t t = 0; t < dims.T; ++t) {
      const int64_t off = dims.offset(bh, t);
      in.load(r + off, k + off, v + off, N);
      const acc_t* __restrict__ rt = in.r;
      const acc_t* __restrict__ kt = in.k;
      const acc_t* __restrict__ vt = in.v;
      const acc_t* __restrict__ dt = decay + off;
      const acc_t* __restrict__ uh = u + (bh % dims.H) * N;
      acc_t* __restrict__ yt = y + off;
      acc_t* __restrict__ S = state + bh * N * N;
      acc_t bonus = 0;
      for (int64_t i = 0; i < N; ++i) bonus += rt[i] * uh[i] * kt[i];
      for (int64_t j = 0; j < N; ++j) yt[j] = bonus * vt[j];
      int64_t i = 0;
      for (; i + 1 < N; i += 2) {
        acc_t* __restrict__ S0 = S + i * N;
        acc_t* __restrict__ S1 = S0 + N;
        const acc_t r0 = rt[i], r1 = rt[i + 1], d0 = dt[i], d1 = dt[i + 1], k0 = kt[i], k1 = kt[i + 1];
        for (int64_t j = 0; j < N; ++j) {
          yt[j] += r0 * S0[j] + r1 * S1[j];
          S0[j] = d0 * S0[j] + k0 * vt[j];
          S1[j] = d1 * S1[j] + k1 * vt[j];
        }
      }
      for (; i < N; ++i) {
        acc_t* __restrict__ S0 = S + i * N;
        for (int64_t j = 0; j < N; ++j) {
          yt[j] += rt[i] * S0[j];
          S0[j] = dt[i] * S0[j] + kt[i] * vt[j];
        }
      }
    }
  }
}

template <int kN, typename scalar_t, typename acc_t>
void backward_heads(const scalar_t* r, const scalar_t* k, const scalar_t* v, const acc_t* decay, const acc_t* u,
                    const acc_t* dy, const acc_t* grad_final_state, acc_t* state, acc_t* grad_state, acc_t* dr,
                    acc_t* dk, acc_t* dv, acc_t* dlw, acc_t* du_per_head, Dims dims, int64_t bh_begin,
                    int64_t bh_end) {
  const int64_t N = kN > 0 ? kN : dims.N;
  StepBuffer<acc_t> in(N);
  // Forward sweep: dr, the u-gradient, and A_t (kept in dlw until the backward sweep consumes it).
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    for (int64_t t = 0; t < dims.T; ++t) {
      const int64_t off = dims.offset(bh, t);
      in.load(r + off, k + off, v + off, N);
      const acc_t* __restrict__ rt = in.r;
      const acc_t* __restrict__ kt = in.k;
      const acc_t* __restrict__ vt = in.v;
      const acc_t* __restrict__ dt = decay + off;
      const acc_t* __restrict__ dyt = dy + off;
      const acc_t* __restrict__ uh = u + (bh % dims.H) * N;
      acc_t* __restrict__ S = state + bh * N * N;
      acc_t* __restrict__ du = du_per_head + bh * N;
      acc_t v_dy = 0;
      for (int64_t j = 0; j < N; ++j) v_dy += vt[j] * dyt[j];
      for (int64_t i = 0; i < N; ++i) {
        acc_t* __restrict__ Si = S + i * N;
        acc_t s_dy = 0;
#pragma omp simd reduction(+ : s_dy)
        for (int64_t j = 0; j < N; ++j) {
          s_dy += Si[j] * dyt[j];
          Si[j] = dt[i] * Si[j] + kt[i] * vt[j];
        }
        dr[off + i] = s_dy + uh[i] * kt[i] * v_dy;
        dlw[off + i] = rt[i] * s_dy;
        du[i] += rt[i] * kt[i] * v_dy;
      }
    }
  }
  // Running sum_{tau > t} A_tau - sum_{s > t} B_s per key channel, seeded with the final-state term A_{T+1}.
  const int64_t heads = bh_end - bh_begin;
  std::vector<double> decay_grad_carry(heads * N, 0.0);
  if (grad_final_state != nullptr) {
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
      const acc_t* S = state + bh * N * N;
      const acc_t* dS = grad_final_state + bh * N * N;
      for (int64_t i = 0; i < N; ++i) {
        double a = 0;
        for (int64_t j = 0; j < N; ++j) a += static_cast<double>(S[i * N + j]) * dS[i * N + j];
        decay_grad_carry[(bh - bh_begin) * N + i] = a;
      }
    }
  }
  std::vector<acc_t> dv_acc(N);
  // Backward sweep: G_t = dL/dS_t gives dk, dv and B_t.
  for (int64_t bh = bh_begin; bh < bh_end; ++bh) {
    for (int64_t t = dims.T - 1; t >= 0; --t) {
      const int64_t off = dims.offset(bh, t);
      in.load(r + off, k + off, v + off, N);
      const acc_t* __restrict__ rt = in.r;
      const acc_t* __restrict__ kt = in.k;
      const acc_t* __restrict__ vt = in.v;
      const acc_t* __restrict__ dt = decay + off;
            const acc_t* __restrict__ dyt = dy + off;
      const acc_t* __restrict__ uh = u + (bh % dims.H) * N;
            acc_t* __restrict__ G = grad_state + bh * N * N;
      double* carry = decay_grad_carry.data() + (bh - bh_begin) * N;
      acc_t* __restrict__ dvt = dv_acc.data();
      acc_t v_dy = 0, ruk = 0;
      for (int64_t j = 0; j < N; ++j) v_dy += vt[j] * dyt[j];
      for (int64_t i = 0; i < N; ++i) ruk += rt[i] * uh[i] * kt[i];
      for (int64_t j = 0; j < N; ++j) dvt[j] = ruk * dyt[j];
      for (int64_t i = 0; i < N; ++i) {
        acc_t* __restrict__ Gi = G + i * N;
        acc_t g_v = 0;
#pragma omp simd reduction(+ : g_v)
        for (int64_t j = 0; j < N; ++j) {
          g_v += Gi[j] * vt[j];
          dvt[j] += Gi[j] * kt[i];
          Gi[j] = dt[i] * Gi[j] + rt[i] * dyt[j];
        }
        dk[off + i] = g_v + uh[i] * rt[i] * v_dy;
        const double log_decay_grad = carry[i] - static_cast<double>(kt[i]) * g_v;
        carry[i] = log_decay_grad + dlw[off + i];  // dlw still holds A_t
        dlw[off + i] = static_cast<acc_t>(log_decay_grad);
      }
      for (int64_t j = 0; j < N; ++j) dv[off + j] = dvt[j];
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

torch::Tensor head_major(const torch::Tensor& x) { return x.transpose(1, 2).contiguous(); }

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> wkv6_forward_cpu(const torch::Tensor& r, const torch::Tensor& k,
                                                          const torch::Tensor& v, const torch::Tensor& w,
                                                          const torch::Tensor& u,
                                                          const std::optional<torch::Tensor>& initial_state) {
  check_inputs(r, k, v, w, u, initial_state);
  const Dims dims{r.size(0), r.size(1), r.size(2), r.size(3)};
  const auto acc = r.options().dtype(acc_dtype(r));
  auto rc = head_major(r), kc = head_major(k), vc = head_major(v);
  auto decay = head_major(torch::exp(log_decay(w, acc_dtype(r))));
  auto uc = u.to(acc).contiguous();
  auto y = torch::empty({dims.B, dims.H, dims.T, dims.N}, acc);
  auto state = initial_state.has_value() ? initial_state->to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous()
                                         : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_forward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_head_size(dims.N, [&](auto head_size) {
      at::parallel_for(0, dims.B * dims.H, 1, [&](int64_t begin, int64_t end) {
        forward_heads<decltype(head_size)::value, scalar_t, acc_t>(
            rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), decay.data_ptr<acc_t>(),
            uc.data_ptr<acc_t>(), y.data_ptr<acc_t>(), state.data_ptr<acc_t>(), dims, begin, end);
      });
    });
  });
  return {y.transpose(1, 2), state};
}

WKV6Grads wkv6_backward_cpu(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& w, const torch::Tensor& u,
                            const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                            const std::optional<torch::Tensor>& grad_final_state) {
  check_inputs(r, k, v, w, u, initial_state);
  const Dims dims{r.size(0), r.size(1), r.size(2), r.size(3)};
  const auto acc = r.options().dtype(acc_dtype(r));
  auto rc = head_major(r), kc = head_major(k), vc = head_major(v);
  auto lw = log_decay(w, acc_dtype(r));
  auto decay = head_major(torch::exp(lw));
  auto uc = u.to(acc).contiguous();
  auto dy = head_major(grad_y.to(acc));
  auto state = initial_state.has_value() ? initial_state->to(acc, false, true).contiguous()
                                         : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  std::optional<torch::Tensor> dsT;
  if (grad_final_state.has_value()) dsT = grad_final_state->to(acc).contiguous();
  auto grad_state = dsT.has_value() ? dsT->clone() : torch::zeros({dims.B, dims.H, dims.N, dims.N}, acc);
  const auto head_major_sizes = {dims.B, dims.H, dims.T, dims.N};
  auto dr = torch::empty(head_major_sizes, acc), dk = torch::empty(head_major_sizes, acc);
  auto dv = torch::empty(head_major_sizes, acc), dlw = torch::empty(head_major_sizes, acc);
  auto du_per_head = torch::zeros({dims.B, dims.H, dims.N}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    dispatch_head_size(dims.N, [&](auto head_size) {
      at::parallel_for(0, dims.B * dims.H, 1, [&](int64_t begin, int64_t end) {
        backward_heads<decltype(head_size)::value, scalar_t, acc_t>(
            rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), decay.data_ptr<acc_t>(),
            uc.data_ptr<acc_t>(), dy.data_ptr<acc_t>(), dsT.has_value() ? dsT->data_ptr<acc_t>() : nullptr,
            state.data_ptr<acc_t>(), grad_state.data_ptr<acc_t>(), dr.data_ptr<acc_t>(), dk.data_ptr<acc_t>(),
            dv.data_ptr<acc_t>(), dlw.data_ptr<acc_t>(), du_per_head.data_ptr<acc_t>(), dims, begin, end);
      });
    });
  });
  const auto dtype = r.scalar_type();
  // d(log-decay)/dw = -exp(w) = lw below the clamp and 0 above it, as torch's clamp
  auto dw = (dlw.transpose(1, 2) * lw).masked_fill_(w.to(acc) > std::log(60.0), 0);
  // the initial-state gradient comes back even without an initial state (the caller drops it): one fixed schema
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {dr.transpose(1, 2).to(dtype), dk.transpose(1, 2).to(dtype), dv.transpose(1, 2).to(dtype), dw.to(dtype),
          du_per_head.sum(0).to(u.scalar_type()), grad_initial_state};
}
