// RWKV-7 WKV recurrence (the generalised delta rule) on NVIDIA GPUs: forward and backward, same contract as
// wkv7_cpu.cpp (whose header has the math).
//
// Layout: r, w, k, v, a, b (B, T, H, N) in fp32 / bf16 / fp16 (fp64 inputs compute in fp32); state (B, H, N, N)
// fp32, key-major. y and the final state are fp32. One block of N threads per (batch, head), step by step; the head
// size is a template parameter (16, 32, 64, 128: a thread's rows live in registers) and T is unbounded.
//   forward:   thread j owns column j of S: sa_j = (a S)_j and y_j = (r S)_j need no reduction across threads.
//   backward:  a forward sweep (the forward kernel, saving sa_t and the state entering every chunk of kChunk steps),
//              then one kernel that walks the chunks backwards: thread i recomputes row i of the chunk's states from
//              the checkpoint (into a per-head scratch, [step][j][i] so that the threads' accesses coalesce), then
//              walks the chunk's steps backwards holding row i and column i of G = dL/dS: the row gives
//              dr_i, dk_i, db_i, da_i and dd_i, the column dsa_i = (b G)_i and dv_i = (k G)_i, shared with the block
//              through shared memory. States are never recovered by inverting a step (the transition may be
//              singular). Memory while the backward runs: (T / kChunk + kChunk + 1) N^2 + T N floats per head.
// Long sequences go to the chunked kernel instead where it runs (the rule: wkv7_chunked_op.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>

#include <cmath>

#include "../wkv7_checks.h"
#include "wkv7_chunked_op.h"
#include "wkv7_cuda.h"

namespace {

constexpr float kMaxW = 4.0943445622221004f;  // ln 60: the per-step log-decay is clamped at -60
constexpr int kChunk = 16;                    // steps between the backward's checkpoints

__device__ __forceinline__ float log_decay(float w) { return -__expf(fminf(w, kMaxW)); }

// Row sums as four interleaved partial sums (N is a multiple of 4) rather than one FMA chain.
#define WKV7_SUM4(acc) (((acc)[0] + (acc)[1]) + ((acc)[2] + (acc)[3]))

// Forward; with kSave (the backward's sweep) it also writes sa_t (B, T, H, N) and the state entering each chunk
// (B * H, chunks, N, N).
template <typename scalar_t, int N, bool kSave>
__global__ void forward_kernel(int T, int H, const scalar_t* __restrict__ r, const scalar_t* __restrict__ w,
                               const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                               const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, float* __restrict__ y,
                               float* __restrict__ state, float* __restrict__ sa_out,
                               float* __restrict__ checkpoints) {
  const int bh = blockIdx.x, h = bh % H, j = threadIdx.x;
  __shared__ float r_s[N], d_s[N], k_s[N], a_s[N], b_s[N];
  float* S = state + static_cast<int64_t>(bh) * N * N;
  float s_col[N];  // column j: S[i * N + j]
#pragma unroll
  for (int i = 0; i < N; ++i) s_col[i] = S[i * N + j];
  const int64_t stride = static_cast<int64_t>(H) * N;
  int64_t idx = (static_cast<int64_t>(bh / H) * T * H + h) * N + j;
  const int chunks = (T + kChunk - 1) / kChunk;
  for (int t = 0; t < T; ++t, idx += stride) {
    __syncthreads();  // the previous step's readers are done with the shared rows
    r_s[j] = static_cast<float>(r[idx]);
    d_s[j] = __expf(log_decay(static_cast<float>(w[idx])));
    k_s[j] = static_cast<float>(k[idx]);
    a_s[j] = static_cast<float>(a[idx]);
    b_s[j] = static_cast<float>(b[idx]);
    const float v_j = static_cast<float>(v[idx]);
    __syncthreads();
    if (kSave && t % kChunk == 0) {
      float* C = checkpoints + (static_cast<int64_t>(bh) * chunks + t / kChunk) * N * N;
#pragma unroll
      for (int i = 0; i < N; ++i) C[i * N + j] = s_col[i];
    }
    float sa[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < N; ++i) sa[i % 4] = fmaf(a_s[i], s_col[i], sa[i % 4]);
    const float sa_j = WKV7_SUM4(sa);
    if (kSave) sa_out[idx] = sa_j;
    float y_part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < N; ++i) {
      s_col[i] = fmaf(d_s[i], s_col[i], fmaf(b_s[i], sa_j, k_s[i] * v_j));
      y_part[i % 4] = fmaf(r_s[i], s_col[i], y_part[i % 4]);
    }
    if (!kSave) y[idx] = WKV7_SUM4(y_part);
  }
  if (!kSave) {
#pragma unroll
    for (int i = 0; i < N; ++i) S[i * N + j] = s_col[i];
  }
}

// The backward walk (see the header). grad_state holds the final-state gradient (or zeros) on entry and the
// initial-state gradient on return; dlw receives the log-decay gradient dd * d (torch finishes dw).
template <typename scalar_t, int N>
__global__ void backward_kernel(int T, int H, const scalar_t* __restrict__ r, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                const float* __restrict__ dy, const float* __restrict__ sa_all,
                                const float* __restrict__ checkpoints, float* __restrict__ scratch,
                                float* __restrict__ grad_state, float* __restrict__ dr, float* __restrict__ dlw,
                                float* __restrict__ dk, float* __restrict__ dv, float* __restrict__ da,
                                float* __restrict__ db) {
  const int bh = blockIdx.x, h = bh % H, i = threadIdx.x;
  __shared__ float r_s[N], d_s[N], k_s[N], v_s[N], a_s[N], b_s[N], sa_s[N], dy_s[N], dsa_s[N];
  float* G = grad_state + static_cast<int64_t>(bh) * N * N;
  float g_row[N], g_col[N];  // G[i, :] and G[:, i]
#pragma unroll
  for (int j = 0; j < N; ++j) {
    g_row[j] = G[i * N + j];
    g_col[j] = G[j * N + i];
  }
  // slot s holds the state before step s of the chunk, element (i, j) at [s][j][i]
  float* states = scratch + static_cast<int64_t>(bh) * (kChunk + 1) * N * N;
  const int64_t stride = static_cast<int64_t>(H) * N;
  const int64_t base = (static_cast<int64_t>(bh / H) * T * H + h) * N + i;
  const int chunks = (T + kChunk - 1) / kChunk;
  for (int c = chunks - 1; c >= 0; --c) {
    const int first = c * kChunk, n = min(kChunk, T - first);
    {
      const float* C = checkpoints + (static_cast<int64_t>(bh) * chunks + c) * N * N;
      float s_row[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        s_row[j] = C[i * N + j];
        states[j * N + i] = s_row[j];
      }
      for (int s = 0; s < n; ++s) {
        const int64_t idx = base + (first + s) * stride;
        __syncthreads();
        sa_s[i] = sa_all[idx];
        v_s[i] = static_cast<float>(v[idx]);
        dy_s[i] = dy[idx];
        __syncthreads();
        const float d_i = __expf(log_decay(static_cast<float>(w[idx]))), b_i = static_cast<float>(b[idx]),
                    k_i = static_cast<float>(k[idx]);
        float* next = states + static_cast<int64_t>(s + 1) * N * N;
        float s_dy[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < N; ++j) {
          s_row[j] = fmaf(d_i, s_row[j], fmaf(b_i, sa_s[j], k_i * v_s[j]));
          next[j * N + i] = s_row[j];
          s_dy[j % 4] = fmaf(s_row[j], dy_s[j], s_dy[j % 4]);
        }
        dr[idx] = WKV7_SUM4(s_dy);
      }
    }
    for (int s = n - 1; s >= 0; --s) {
      const int64_t idx = base + (first + s) * stride;
      const float w_i = static_cast<float>(w[idx]), lw_i = log_decay(w_i);
      __syncthreads();
      r_s[i] = static_cast<float>(r[idx]);
      d_s[i] = __expf(lw_i);
      k_s[i] = static_cast<float>(k[idx]);
      v_s[i] = static_cast<float>(v[idx]);
      a_s[i] = static_cast<float>(a[idx]);
      b_s[i] = static_cast<float>(b[idx]);
      sa_s[i] = sa_all[idx];
      dy_s[i] = dy[idx];
      __syncthreads();
      const float r_i = r_s[i], d_i = d_s[i], a_i = a_s[i], dy_i = dy_s[i];
      // G_t = (G from the later steps) + r_t^T dy_t, in both copies; then column i's sums
      float col_b[4] = {0.f, 0.f, 0.f, 0.f}, col_k[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int m = 0; m < N; ++m) {
        g_row[m] = fmaf(r_i, dy_s[m], g_row[m]);
        g_col[m] = fmaf(r_s[m], dy_i, g_col[m]);
        col_b[m % 4] = fmaf(b_s[m], g_col[m], col_b[m % 4]);
        col_k[m % 4] = fmaf(k_s[m], g_col[m], col_k[m % 4]);
      }
      const float dsa_i = WKV7_SUM4(col_b);
      dsa_s[i] = dsa_i;
      dv[idx] = WKV7_SUM4(col_k);
      __syncthreads();
      const float* prev = states + static_cast<int64_t>(s) * N * N;
      float row_v[4] = {0.f, 0.f, 0.f, 0.f}, row_sa[4] = {0.f, 0.f, 0.f, 0.f};
      float row_s[4] = {0.f, 0.f, 0.f, 0.f}, row_dsa[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float s_prev = prev[j * N + i], g = g_row[j];
        row_v[j % 4] = fmaf(g, v_s[j], row_v[j % 4]);
        row_sa[j % 4] = fmaf(g, sa_s[j], row_sa[j % 4]);
        row_s[j % 4] = fmaf(g, s_prev, row_s[j % 4]);
        row_dsa[j % 4] = fmaf(s_prev, dsa_s[j], row_dsa[j % 4]);
        g_row[j] = fmaf(d_i, g, a_i * dsa_s[j]);
        g_col[j] = fmaf(d_s[j], g_col[j], a_s[j] * dsa_i);
      }
      dk[idx] = WKV7_SUM4(row_v);
      db[idx] = WKV7_SUM4(row_sa);
      da[idx] = WKV7_SUM4(row_dsa);
      dlw[idx] = WKV7_SUM4(row_s) * d_i;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) G[i * N + j] = g_row[j];
}

#undef WKV7_SUM4

template <typename Fn>
void dispatch_head_size(int64_t N, Fn&& fn) {
  switch (N) {
    case 16: fn(std::integral_constant<int, 16>{}); break;
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "wkv7 CUDA: head size must be 16, 32, 64 or 128, got ", N);
  }
}

torch::Tensor float_state(const std::optional<torch::Tensor>& s, const torch::Tensor& like, int64_t B, int64_t H,
                          int64_t N) {
  auto options = like.options().dtype(torch::kFloat);
  return s.has_value() ? s->to(torch::kFloat, false, true).contiguous() : torch::zeros({B, H, N, N}, options);
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> wkv7_forward_cuda(const torch::Tensor& r, const torch::Tensor& w,
                                                           const torch::Tensor& k, const torch::Tensor& v,
                                                           const torch::Tensor& a, const torch::Tensor& b,
                                                           const std::optional<torch::Tensor>& initial_state) {
  wkv7_check_inputs(r, w, k, v, a, b, initial_state);
  if (wkv7_chunked_applies(r)) return wkv7_chunked_forward_cuda(r, w, k, v, a, b, initial_state);
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rc = r.contiguous(), wc = w.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ac = a.contiguous(),
       bc = b.contiguous();
  auto y = torch::empty(r.sizes(), r.options().dtype(torch::kFloat));
  auto state = float_state(initial_state, r, B, H, N);
  if (B * H == 0) return {y, state};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv7_forward_cuda", [&] {
    dispatch_head_size(N, [&](auto head_size) {
      constexpr int kN = decltype(head_size)::value;
      forward_kernel<scalar_t, kN, false><<<B * H, kN, 0, stream>>>(
          T, H, rc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
          ac.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), y.data_ptr<float>(), state.data_ptr<float>(), nullptr,
          nullptr);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, state};
}

WKV7Grads wkv7_backward_cuda(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                             const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b,
                             const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                             const std::optional<torch::Tensor>& grad_final_state) {
  wkv7_check_inputs(r, w, k, v, a, b, initial_state);
  wkv7_check_grad_y(r, grad_y);
  if (wkv7_chunked_applies(r)) {
    return wkv7_chunked_backward_cuda(r, w, k, v, a, b, initial_state, grad_y, grad_final_state);
  }
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  auto rc = r.contiguous(), wc = w.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ac = a.contiguous(),
       bc = b.contiguous();
  const auto f32 = r.options().dtype(torch::kFloat);
  auto dy = grad_y.to(torch::kFloat).contiguous();
  auto state = float_state(initial_state, r, B, H, N);
  auto grad_state = grad_final_state.has_value() ? grad_final_state->to(torch::kFloat, false, true).contiguous()
                                                 : torch::zeros({B, H, N, N}, f32);
  auto sa = torch::empty(r.sizes(), f32);
  auto checkpoints = torch::empty({B * H, chunks, N, N}, f32);
  auto scratch = torch::empty({B * H, kChunk + 1, N, N}, f32);
  auto dr = torch::empty(r.sizes(), f32), dlw = torch::empty(r.sizes(), f32), dk = torch::empty(r.sizes(), f32);
  auto dv = torch::empty(r.sizes(), f32), da = torch::empty(r.sizes(), f32), db = torch::empty(r.sizes(), f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (B * H > 0 && T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "wkv7_backward_cuda", [&] {
      dispatch_head_size(N, [&](auto head_size) {
        constexpr int kN = decltype(head_size)::value;
        const auto *rp = rc.data_ptr<scalar_t>(), *wp = wc.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(),
                   *vp = vc.data_ptr<scalar_t>(), *ap = ac.data_ptr<scalar_t>(), *bp = bc.data_ptr<scalar_t>();
        forward_kernel<scalar_t, kN, true><<<B * H, kN, 0, stream>>>(
            T, H, rp, wp, kp, vp, ap, bp, nullptr, state.data_ptr<float>(), sa.data_ptr<float>(),
            checkpoints.data_ptr<float>());
        backward_kernel<scalar_t, kN><<<B * H, kN, 0, stream>>>(
            T, H, rp, wp, kp, vp, ap, bp, dy.data_ptr<float>(), sa.data_ptr<float>(), checkpoints.data_ptr<float>(),
            scratch.data_ptr<float>(), grad_state.data_ptr<float>(), dr.data_ptr<float>(), dlw.data_ptr<float>(),
            dk.data_ptr<float>(), dv.data_ptr<float>(), da.data_ptr<float>(), db.data_ptr<float>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto dtype = r.scalar_type();
  // dw = d(log-decay) * d(log-decay)/dw: the log-decay below the clamp, 0 above it (as torch's clamp)
  const auto w32 = w.to(torch::kFloat);
  auto dw = (dlw * -torch::exp(w32.clamp_max(std::log(60.0)))).masked_fill_(w32 > std::log(60.0), 0);
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {dr.to(dtype), dw.to(dtype), dk.to(dtype), dv.to(dtype), da.to(dtype), db.to(dtype), grad_initial_state};
}
