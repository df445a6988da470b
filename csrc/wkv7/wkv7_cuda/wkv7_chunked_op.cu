// Torch side of the chunked CUDA WKV7 kernel: the dispatch rule, buffers, the sum of the per-value-tile partial
// gradients and the decay gradient's chain rule. Inputs are checked by the caller (wkv7_cuda.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/all.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "wkv7_chunked.h"
#include "wkv7_chunked_op.h"

namespace {

// Runs fn(pointer caster) for the input type, one of the three the kernels are instantiated for. (Not
// AT_DISPATCH_FLOATING_TYPES: its double case would reference a kernel that does not exist, and the library would
// fail to load with an undefined symbol; double inputs take the step kernel, see kernel_can_run.)
template <typename Fn>
void dispatch_input_type(const torch::Tensor& r, Fn&& fn) {
  auto cast = [](auto tag) {
    using T = decltype(tag);
    return [](const torch::Tensor& x) { return static_cast<const T*>(x.data_ptr()); };
  };
  switch (r.scalar_type()) {
    case torch::kFloat: fn(cast(float{})); break;
    case torch::kHalf: fn(cast(__half{})); break;
    case torch::kBFloat16: fn(cast(__nv_bfloat16{})); break;
    default: TORCH_CHECK(false, "wkv7 chunked CUDA: inputs must be fp32, fp16 or bf16, got ", r.scalar_type());
  }
}

// A float32 copy of the state the kernels may overwrite (they update it in place).
torch::Tensor state_copy(const std::optional<torch::Tensor>& s, const torch::Tensor& like, int64_t B, int64_t H,
                         int64_t N) {
  if (!s.has_value()) return torch::zeros({B, H, N, N}, like.options().dtype(torch::kFloat));
  return s->to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

bool kernel_can_run(const torch::Tensor& r) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, r.device().index()));
  return wkv7_chunked::head_size_supported(static_cast<int>(r.size(3))) && major >= 8 &&
         (r.scalar_type() == torch::kFloat || r.scalar_type() == torch::kHalf ||
          r.scalar_type() == torch::kBFloat16);
}

}  // namespace

bool wkv7_chunked_applies(const torch::Tensor& r) {
  const char* env = std::getenv("VISUALRWKV_WKV7_CUDA_FORM");
  const std::string form = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK(form == "auto" || form == "step" || form == "chunked",
              "VISUALRWKV_WKV7_CUDA_FORM must be auto, step or chunked, got '", form, "'");
  if (form == "step") return false;
  // decode steps return before any device query: they may run inside a CUDA graph capture (decode_graph.py)
  if (form == "auto" && r.size(1) < kWKV7ChunkedMinLength) return false;
  const bool can_run = kernel_can_run(r);
  if (form == "chunked") {
    TORCH_CHECK(can_run, "VISUALRWKV_WKV7_CUDA_FORM=chunked: the chunked kernel needs head size 16, 32 or 64, ",
                "fp32/fp16/bf16 inputs and an sm_80+ GPU; got head size ", r.size(3), ", ", r.scalar_type(),
                ". Use auto to fall back to the step kernel.");
    return true;
  }
  return can_run;
}

std::tuple<torch::Tensor, torch::Tensor> wkv7_chunked_forward_cuda(const torch::Tensor& r, const torch::Tensor& w,
                                                                   const torch::Tensor& k, const torch::Tensor& v,
                                                                   const torch::Tensor& a, const torch::Tensor& b,
                                                                   const std::optional<torch::Tensor>& initial_state) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rc = r.contiguous(), wc = w.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ac = a.contiguous(),
       bc = b.contiguous();
  auto y = torch::empty(r.sizes(), r.options().dtype(torch::kFloat));
  auto state = state_copy(initial_state, r, B, H, N);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_input_type(r, [&](auto ptr) {
    wkv7_chunked::forward(B, T, H, N, ptr(rc), ptr(wc), ptr(kc), ptr(vc), ptr(ac), ptr(bc), y.data_ptr<float>(),
                          state.data_ptr<float>(), nullptr, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, state};
}

WKV7Grads wkv7_chunked_backward_cuda(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                                     const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b,
                                     const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                                     const std::optional<torch::Tensor>& grad_final_state) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const int64_t tiles = N / wkv7_chunked::kValueTile, chunks = wkv7_chunked::num_chunks(static_cast<int>(T));
  auto rc = r.contiguous(), wc = w.contiguous(), kc = k.contiguous(), vc = v.contiguous(), ac = a.contiguous(),
       bc = b.contiguous();
  auto dy = grad_y.to(torch::kFloat).contiguous();
  auto options = r.options().dtype(torch::kFloat);
  // the state pass: every chunk's start state (the backward walks the chunks from the last)
  auto chunk_states = torch::empty({B * H * chunks * N * N}, options);
  auto end_state = state_copy(initial_state, r, B, H, N);
  auto grad_state = grad_final_state.has_value() ? grad_final_state->to(torch::kFloat, false, true).contiguous()
                                                 : torch::zeros({B, H, N, N}, options);
  // per value tile: r, log-decay, k, a, b (summed below)
  auto partial = torch::empty({5, tiles, B, T, H, N}, options);
  auto dv = torch::empty({B, T, H, N}, options);
  const int64_t stride = tiles * B * T * H * N;
  float* p = partial.data_ptr<float>();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_input_type(r, [&](auto ptr) {
    const auto *rp = ptr(rc), *wp = ptr(wc), *kp = ptr(kc), *vp = ptr(vc), *ap = ptr(ac), *bp = ptr(bc);
    wkv7_chunked::forward(B, T, H, N, rp, wp, kp, vp, ap, bp, nullptr, end_state.data_ptr<float>(),
                          chunk_states.data_ptr<float>(), stream);
    wkv7_chunked::backward(B, T, H, N, rp, wp, kp, vp, ap, bp, dy.data_ptr<float>(), chunk_states.data_ptr<float>(),
                           grad_state.data_ptr<float>(), p, p + stride, p + 2 * stride, p + 3 * stride,
                           p + 4 * stride, dv.data_ptr<float>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto dtype = r.scalar_type();
  auto sums = partial.sum(1);  // (5, B, T, H, N)
  // the kernel's decay gradient is d/d lw; lw = -exp(w) below the clamp, constant above it
  auto wf = w.to(torch::kFloat);
  auto lw = -torch::exp(wf.clamp_max(std::log(60.0)));
  auto dw = (sums[1] * lw).masked_fill_(wf > std::log(60.0), 0);
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {sums[0].to(dtype), dw.to(dtype), sums[2].to(dtype), dv.to(dtype), sums[3].to(dtype), sums[4].to(dtype),
          grad_initial_state};
}
