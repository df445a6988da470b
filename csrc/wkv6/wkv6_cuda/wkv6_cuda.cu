// RWKV-6 WKV recurrence on NVIDIA GPUs: forward and backward, same contract as wkv6_cpu.cpp.
//
// Layout: r, k, v, w (B, T, H, N) in fp32 / bf16 / fp16; u (H, N); state (B, H, N, N) fp32, key-major. y and the
// final state are fp32. One block of N threads per (batch, head); each thread keeps one row or one column of the
// N x N state in registers, so the head size is a template parameter (16, 24, 32, 64, 128) and T is unbounded.
//   forward:            thread j owns column j of S: y_j needs no reduction across threads.
//   backward sweep 1:   thread i owns row i of S (recomputed forward): dr_i, du_i, A_t,i = r_t,i (S_{t-1} dy_t)_i.
//   backward sweep 2a:  thread i owns row i of G = dL/dS (backward in time): dk_i and the log-decay gradient as the
//                       running difference sum_{tau > t} A_tau - sum_{s >= t} k_s,i (G_s v_s)_i (carried in fp64).
//   backward sweep 2b:  thread j owns column j of G: dv_j.
// No per-step state is stored (O(1) memory per head); the decay gradient is finished by torch (times -exp(w), zero
// above the clamp), as on the CPU.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include "../wkv6_checks.h"
#include "wkv6_cuda.h"

namespace {

constexpr float kMaxW = 4.0943445622221004f;  // ln 60: the per-step log-decay is clamped at -60

__device__ __forceinline__ float log_decay(float w) { return -__expf(fminf(w, kMaxW)); }

// Each kernel walks its head's steps in order; a thread loads the next step's inputs into registers before the
// current step's math, so global-memory latency overlaps the arithmetic instead of stalling every step, and the
// length-N dot products run as four interleaved partial sums (N is a multiple of 4) rather than one FMA chain.

// One step's inputs for one thread's channel, in fp32; a kernel passes null for the arrays it does not read.
struct StepInputs {
  float r = 0.f, k = 0.f, v = 0.f, w = 0.f, dy = 0.f, a = 0.f;
};

template <typename scalar_t>
__device__ __forceinline__ StepInputs load_step(const scalar_t* __restrict__ r, const scalar_t* __restrict__ k,
                                                const scalar_t* __restrict__ v, const scalar_t* __restrict__ w,
                                                const float* __restrict__ dy, const float* __restrict__ a,
                                                int64_t idx) {
  StepInputs in;
  in.r = static_cast<float>(r[idx]);
  in.k = static_cast<float>(k[idx]);
  if (v != nullptr) in.v = static_cast<float>(v[idx]);
  in.w = static_cast<float>(w[idx]);
  if (dy != nullptr) in.dy = dy[idx];
  if (a != nullptr) in.a = a[idx];
  return in;
}
template <typename scalar_t, int N>
__global__ void forward_kernel(int T, int H, const scalar_t* __restrict__ r, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ w,
                               const float* __restrict__ u, float* __restrict__ y, float* __restrict__ state) {
  const int bh = blockIdx.x, h = bh % H, j = threadIdx.x;
  __shared__ float r_s[N], k_s[N], u_s[N], d_s[N];
  float* S = state + static_cast<int64_t>(bh) * N * N;  // column j: S[i * N + j]
  float s_col[N];
#pragma unroll
  for (int i = 0; i < N; ++i) s_col[i] = S[i * N + j];
  u_s[j] = u[h * N + j];
  const int64_t stride = static_cast<int64_t>(H) * N;
  int64_t idx = (static_cast<int64_t>(bh / H) * T * H + h) * N + j;
  StepInputs next;
  if (T > 0) next = load_step(r, k, v, w, nullptr, nullptr, idx);
  for (int t = 0; t < T; ++t, idx += stride) {
    __syncthreads();
    r_s[j] = next.r;
    k_s[j] = next.k;
    d_s[j] = __expf(log_decay(next.w));
    const float v_j = next.v;
    __syncthreads();
    if (t + 1 < T) next = load_step(r, k, v, w, nullptr, nullptr, idx + stride);
    float y_part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float kv = k_s[i] * v_j;
      y_part[i % 4] += r_s[i] * fmaf(u_s[i], kv, s_col[i]);
      s_col[i] = fmaf(d_s[i], s_col[i], kv);
    }
    y[idx] = (y_part[0] + y_part[1]) + (y_part[2] + y_part[3]);
  }
#pragma unroll
  for (int i = 0; i < N; ++i) S[i * N + j] = s_col[i];
}

template <typename scalar_t, int N>
__global__ void backward_state_rows_kernel(int T, int H, const scalar_t* __restrict__ r,
                                           const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                           const scalar_t* __restrict__ w, const float* __restrict__ u,
                                           const float* __restrict__ dy, float* __restrict__ state,
                                           const float* __restrict__ grad_final_state, float* __restrict__ dr,
                                           float* __restrict__ dlw, float* __restrict__ du_per_head,
                                           double* __restrict__ carry_init) {
  const int bh = blockIdx.x, h = bh % H, i = threadIdx.x;
  __shared__ float v_s[N], dy_s[N];
  float* S = state + static_cast<int64_t>(bh) * N * N;  // row i: S[i * N + j]
  float s_row[N];
#pragma unroll
  for (int j = 0; j < N; ++j) s_row[j] = S[i * N + j];
  const float u_i = u[h * N + i];
  float du_i = 0.f;
  const int64_t stride = static_cast<int64_t>(H) * N;
  int64_t idx = (static_cast<int64_t>(bh / H) * T * H + h) * N + i;
  StepInputs next;
  if (T > 0) next = load_step(r, k, v, w, dy, nullptr, idx);
  for (int t = 0; t < T; ++t, idx += stride) {
    __syncthreads();
    v_s[i] = next.v;
    dy_s[i] = next.dy;
    const float r_i = next.r, k_i = next.k, d_i = __expf(log_decay(next.w));
    __syncthreads();
    if (t + 1 < T) next = load_step(r, k, v, w, dy, nullptr, idx + stride);
    float s_dy[4] = {0.f, 0.f, 0.f, 0.f}, v_dy[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < N; ++j) {
      s_dy[j % 4] = fmaf(s_row[j], dy_s[j], s_dy[j % 4]);
      v_dy[j % 4] = fmaf(v_s[j], dy_s[j], v_dy[j % 4]);
      s_row[j] = fmaf(d_i, s_row[j], k_i * v_s[j]);
    }
    const float s_dy_sum = (s_dy[0] + s_dy[1]) + (s_dy[2] + s_dy[3]);
    const float v_dy_sum = (v_dy[0] + v_dy[1]) + (v_dy[2] + v_dy[3]);
    dr[idx] = fmaf(u_i * k_i, v_dy_sum, s_dy_sum);
    dlw[idx] = r_i * s_dy_sum;  // A_t, consumed by the backward sweep
    du_i = fmaf(r_i * k_i, v_dy_sum, du_i);
  }
  du_per_head[static_cast<int64_t>(bh) * N + i] = du_i;
  double a = 0.0;  // the final-state gradient acts as one more query after the last step
  if (grad_final_state != nullptr) {
    const float* dS = grad_final_state + static_cast<int64_t>(bh) * N * N;
#pragma unroll
    for (int j = 0; j < N; ++j) a += static_cast<double>(s_row[j]) * dS[i * N + j];
  }
  carry_init[static_cast<int64_t>(bh) * N + i] = a;
}

template <typename scalar_t, int N>
__global__ void backward_grad_rows_kernel(int T, int H, const scalar_t* __restrict__ r,
                                          const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                          const scalar_t* __restrict__ w, const float* __restrict__ u,
                                          const float* __restrict__ dy, float* __restrict__ grad_state,
                                          const double* __restrict__ carry_init, float* __restrict__ dk,
                                          float* __restrict__ dlw) {
  const int bh = blockIdx.x, h = bh % H, i = threadIdx.x;
  __shared__ float v_s[N], dy_s[N];
  float* G = grad_state + static_cast<int64_t>(bh) * N * N;  // row i; ends as the initial-state gradient
  float g_row[N];
#pragma unroll
  for (int j = 0; j < N; ++j) g_row[j] = G[i * N + j];
  const float u_i = u[h * N + i];
  double carry = carry_init[static_cast<int64_t>(bh) * N + i];
  const int64_t stride = static_cast<int64_t>(H) * N;
  int64_t idx = (static_cast<int64_t>(bh / H) * T * H + h) * N + i + static_cast<int64_t>(T - 1) * stride;
  StepInputs next;
  if (T > 0) next = load_step(r, k, v, w, dy, dlw, idx);
  for (int t = T - 1; t >= 0; --t, idx -= stride) {
    __syncthreads();
    v_s[i] = next.v;
    dy_s[i] = next.dy;
    const float r_i = next.r, k_i = next.k, d_i = __expf(log_decay(next.w)), a_t = next.a;
    __syncthreads();
    if (t > 0) next = load_step(r, k, v, w, dy, dlw, idx - stride);
    float g_v[4] = {0.f, 0.f, 0.f, 0.f}, v_dy[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < N; ++j) {
      g_v[j % 4] = fmaf(g_row[j], v_s[j], g_v[j % 4]);
      v_dy[j % 4] = fmaf(v_s[j], dy_s[j], v_dy[j % 4]);
      g_row[j] = fmaf(d_i, g_row[j], r_i * dy_s[j]);
    }
    const float g_v_sum = (g_v[0] + g_v[1]) + (g_v[2] + g_v[3]);
    const float v_dy_sum = (v_dy[0] + v_dy[1]) + (v_dy[2] + v_dy[3]);
    dk[idx] = fmaf(u_i * r_i, v_dy_sum, g_v_sum);
    const double log_decay_grad = carry - static_cast<double>(k_i) * g_v_sum;
    carry = log_decay_grad + a_t;
    dlw[idx] = static_cast<float>(log_decay_grad);
  }
#pragma unroll
  for (int j = 0; j < N; ++j) G[i * N + j] = g_row[j];
}

template <typename scalar_t, int N>
__global__ void backward_grad_columns_kernel(int T, int H, const scalar_t* __restrict__ r,
                                             const scalar_t* __restrict__ k, const scalar_t* __restrict__ w,
                                             const float* __restrict__ u, const float* __restrict__ dy,
                                             const float* __restrict__ grad_final_state, float* __restrict__ dv) {
  const int bh = blockIdx.x, h = bh % H, j = threadIdx.x;
  __shared__ float r_s[N], k_s[N], d_s[N], uk_s[N];
  float g_col[N];
  const float* dS = grad_final_state == nullptr ? nullptr : grad_final_state + static_cast<int64_t>(bh) * N * N;
#pragma unroll
  for (int i = 0; i < N; ++i) g_col[i] = dS == nullptr ? 0.f : dS[i * N + j];
  const float u_j = u[h * N + j];
  const int64_t stride = static_cast<int64_t>(H) * N;
  int64_t idx = (static_cast<int64_t>(bh / H) * T * H + h) * N + j + static_cast<int64_t>(T - 1) * stride;
  StepInputs next;
  if (T > 0) next = load_step<scalar_t>(r, k, nullptr, w, dy, nullptr, idx);
  for (int t = T - 1; t >= 0; --t, idx -= stride) {
    __syncthreads();
    r_s[j] = next.r;
    k_s[j] = next.k;
    uk_s[j] = u_j * next.k;
    d_s[j] = __expf(log_decay(next.w));
    const float dy_j = next.dy;
    __syncthreads();
    if (t > 0) next = load_step<scalar_t>(r, k, nullptr, w, dy, nullptr, idx - stride);
    float g_k[4] = {0.f, 0.f, 0.f, 0.f}, ruk[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < N; ++i) {
      g_k[i % 4] = fmaf(g_col[i], k_s[i], g_k[i % 4]);
      ruk[i % 4] = fmaf(r_s[i], uk_s[i], ruk[i % 4]);
      g_col[i] = fmaf(d_s[i], g_col[i], r_s[i] * dy_j);
    }
    dv[idx] = fmaf((ruk[0] + ruk[1]) + (ruk[2] + ruk[3]), dy_j, (g_k[0] + g_k[1]) + (g_k[2] + g_k[3]));
  }
}

template <typename Fn>
void dispatch_head_size(int64_t N, Fn&& fn) {
  switch (N) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 24: fn(std::integral_constant<int, 24>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "wkv6 CUDA: head size must be 16, 24, 32, 64 or 128, got ", N);
  }
}

torch::Tensor float_state(const std::optional<torch::Tensor>& s, const torch::Tensor& like, int64_t B, int64_t H,
                          int64_t N) {
  auto options = like.options().dtype(torch::kFloat);
  return s.has_value() ? s->to(torch::kFloat, false, true).contiguous() : torch::zeros({B, H, N, N}, options);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> wkv6_forward_cuda(const torch::Tensor& r, const torch::Tensor& k,
                                                           const torch::Tensor& v, const torch::Tensor& w,
                                                           const torch::Tensor& u,
                                                           const std::optional<torch::Tensor>& initial_state) {
  wkv6_check_inputs(r, k, v, w, u, initial_state);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uf = u.to(torch::kFloat).contiguous();
  auto y = torch::empty(r.sizes(), r.options().dtype(torch::kFloat));
  auto state = float_state(initial_state, r, B, H, N);
  if (B * H == 0) return {y, state};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_forward_cuda", [&] {
    dispatch_head_size(N, [&](auto head_size) {
      constexpr int kN = decltype(head_size)::value;
      forward_kernel<scalar_t, kN><<<B * H, kN, 0, stream>>>(
          T, H, rc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(),
          uf.data_ptr<float>(), y.data_ptr<float>(), state.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, state};
}

WKV6Grads wkv6_backward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& w, const torch::Tensor& u,
                             const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                             const std::optional<torch::Tensor>& grad_final_state) {
  wkv6_check_inputs(r, k, v, w, u, initial_state);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uf = u.to(torch::kFloat).contiguous();
  auto dy = grad_y.to(torch::kFloat).contiguous();
  auto state = float_state(initial_state, r, B, H, N);
  std::optional<torch::Tensor> dsT;
  if (grad_final_state.has_value()) dsT = grad_final_state->to(torch::kFloat).contiguous();
  auto grad_state = dsT.has_value() ? dsT->clone() : torch::zeros({B, H, N, N}, r.options().dtype(torch::kFloat));
  const auto f32 = r.options().dtype(torch::kFloat);
  auto dr = torch::empty(r.sizes(), f32), dk = torch::empty(r.sizes(), f32);
  auto dv = torch::empty(r.sizes(), f32), dlw = torch::empty(r.sizes(), f32);
  auto du_per_head = torch::zeros({B, H, N}, f32);
  auto carry_init = torch::zeros({B, H, N}, r.options().dtype(torch::kDouble));
  const float* dsT_ptr = dsT.has_value() ? dsT->data_ptr<float>() : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (B * H > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv6_backward_cuda", [&] {
      dispatch_head_size(N, [&](auto head_size) {
        constexpr int kN = decltype(head_size)::value;
        const auto *rp = rc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>(),
                   *wp = wc.data_ptr<scalar_t>();
        backward_state_rows_kernel<scalar_t, kN><<<B * H, kN, 0, stream>>>(
            T, H, rp, kp, vp, wp, uf.data_ptr<float>(), dy.data_ptr<float>(), state.data_ptr<float>(), dsT_ptr,
            dr.data_ptr<float>(), dlw.data_ptr<float>(), du_per_head.data_ptr<float>(), carry_init.data_ptr<double>());
        backward_grad_rows_kernel<scalar_t, kN><<<B * H, kN, 0, stream>>>(
            T, H, rp, kp, vp, wp, uf.data_ptr<float>(), dy.data_ptr<float>(), grad_state.data_ptr<float>(),
            carry_init.data_ptr<double>(), dk.data_ptr<float>(), dlw.data_ptr<float>());
        backward_grad_columns_kernel<scalar_t, kN><<<B * H, kN, 0, stream>>>(
            T, H, rp, kp, wp, uf.data_ptr<float>(), dy.data_ptr<float>(), dsT_ptr, dv.data_ptr<float>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto dtype = r.scalar_type();
  auto lw = -torch::exp(w.to(torch::kFloat).clamp_max(std::log(60.0)));
  auto dw = (dlw * lw).masked_fill_(w.to(torch::kFloat) > std::log(60.0), 0);
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {dr.to(dtype), dk.to(dtype), dv.to(dtype), dw.to(dtype), du_per_head.sum(0).to(u.scalar_type()),
          grad_initial_state};
}
