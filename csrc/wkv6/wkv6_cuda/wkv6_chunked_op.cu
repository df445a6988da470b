// Torch side of the chunked CUDA WKV6 kernel: the dispatch rule, buffers, the sum of the per-value-tile partial
// gradients and the decay gradient's chain rule. Inputs are checked by the caller (wkv6_cuda.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/all.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "wkv6_chunked.h"
#include "wkv6_chunked_op.h"

namespace {

// torch's element types -> the CUDA types the kernels are instantiated for
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename CudaType<scalar_t>::type* cuda_ptr(const torch::Tensor& x) {
  return reinterpret_cast<const typename CudaType<scalar_t>::type*>(x.data_ptr<scalar_t>());
}

// Dispatches over exactly the input types the kernels are instantiated for. (Not AT_DISPATCH_FLOATING_TYPES_AND2:
// its double case would reference kernels that do not exist, and the library would fail to load with an undefined
// symbol; double inputs take the step kernel, see kernel_can_run.)
#define WKV6_DISPATCH_INPUT_TYPES(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                      \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// A float32 copy of the state the kernels may overwrite (they update it in place).
torch::Tensor state_copy(const std::optional<torch::Tensor>& s, const torch::Tensor& like, int64_t B, int64_t H,
                         int64_t N) {
  if (!s.has_value()) return torch::zeros({B, H, N, N}, like.options().dtype(torch::kFloat));
  return s->to(torch::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

bool kernel_can_run(const torch::Tensor& r) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, r.device().index()));
  return wkv6_chunked::head_size_supported(static_cast<int>(r.size(3))) && major >= 8 &&
         (r.scalar_type() == torch::kFloat || r.scalar_type() == torch::kHalf ||
          r.scalar_type() == torch::kBFloat16);
}

}  // namespace

bool wkv6_chunked_applies(const torch::Tensor& r) {
  const char* env = std::getenv("VISUALRWKV_WKV6_CUDA_FORM");
  const std::string form = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK(form == "auto" || form == "step" || form == "chunked",
              "VISUALRWKV_WKV6_CUDA_FORM must be auto, step or chunked, got '", form, "'");
  if (form == "step") return false;
  // decode steps return before any device query: they may run inside a CUDA graph capture (decode_graph.py)
  if (form == "auto" && r.size(1) < kWKV6ChunkedMinLength) return false;
  const bool can_run = kernel_can_run(r);
  if (form == "chunked") {
    TORCH_CHECK(can_run, "VISUALRWKV_WKV6_CUDA_FORM=chunked: the chunked kernel needs head size 16, 32 or 64, ",
                "fp32/fp16/bf16 inputs and an sm_80+ GPU; got head size ", r.size(3), ", ", r.scalar_type(),
                ". Use auto to fall back to the step kernel.");
    return true;
  }
  return can_run;
}

std::tuple<torch::Tensor, torch::Tensor> wkv6_chunked_forward_cuda(const torch::Tensor& r, const torch::Tensor& k,
                                                                   const torch::Tensor& v, const torch::Tensor& w,
                                                                   const torch::Tensor& u,
                                                                   const std::optional<torch::Tensor>& initial_state) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uf = u.to(torch::kFloat).contiguous();
  auto y = torch::empty(r.sizes(), r.options().dtype(torch::kFloat));
  auto state = state_copy(initial_state, r, B, H, N);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  WKV6_DISPATCH_INPUT_TYPES(r.scalar_type(), "wkv6_chunked_forward", [&] {
    wkv6_chunked::forward(B, T, H, N, cuda_ptr<scalar_t>(rc), cuda_ptr<scalar_t>(kc), cuda_ptr<scalar_t>(vc),
                          cuda_ptr<scalar_t>(wc), uf.data_ptr<float>(), y.data_ptr<float>(), state.data_ptr<float>(),
                          nullptr, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, state};
}

WKV6Grads wkv6_chunked_backward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& w, const torch::Tensor& u,
                                     const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                                     const std::optional<torch::Tensor>& grad_final_state) {
  const c10::cuda::CUDAGuard guard(r.device());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const int64_t tiles = N / wkv6_chunked::kValueTile, chunks = wkv6_chunked::num_chunks(static_cast<int>(T));
  auto rc = r.contiguous(), kc = k.contiguous(), vc = v.contiguous(), wc = w.contiguous();
  auto uf = u.to(torch::kFloat).contiguous();
  auto dy = grad_y.to(torch::kFloat).contiguous();
  auto options = r.options().dtype(torch::kFloat);
  // the state pass: every chunk's start state (the backward walks the chunks from the last)
  auto chunk_states = torch::empty({B * H * chunks * N * N}, options);
  auto end_state = state_copy(initial_state, r, B, H, N);
  auto grad_state = grad_final_state.has_value()
                        ? grad_final_state->to(torch::kFloat, false, true).contiguous()
                        : torch::zeros({B, H, N, N}, options);
  auto dr_tiles = torch::empty({tiles, B, T, H, N}, options), dk_tiles = torch::empty_like(dr_tiles);
  auto dlw_tiles = torch::empty_like(dr_tiles), du_tiles = torch::empty({tiles, B, H, N}, options);
  auto dv = torch::empty({B, T, H, N}, options);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  WKV6_DISPATCH_INPUT_TYPES(r.scalar_type(), "wkv6_chunked_backward", [&] {
    const auto *rp = cuda_ptr<scalar_t>(rc), *kp = cuda_ptr<scalar_t>(kc), *vp = cuda_ptr<scalar_t>(vc),
               *wp = cuda_ptr<scalar_t>(wc);
    wkv6_chunked::forward(B, T, H, N, rp, kp, vp, wp, uf.data_ptr<float>(), nullptr, end_state.data_ptr<float>(),
                          chunk_states.data_ptr<float>(), stream);
    wkv6_chunked::backward(B, T, H, N, rp, kp, vp, wp, uf.data_ptr<float>(), dy.data_ptr<float>(),
                           chunk_states.data_ptr<float>(), grad_state.data_ptr<float>(), dr_tiles.data_ptr<float>(),
                           dk_tiles.data_ptr<float>(), dlw_tiles.data_ptr<float>(), du_tiles.data_ptr<float>(),
                           dv.data_ptr<float>(), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto dtype = r.scalar_type();
  // the kernel's decay gradient is d/d lw; lw = -exp(w) below the clamp, constant above it
  auto wf = w.to(torch::kFloat);
  auto lw = -torch::exp(wf.clamp_max(std::log(60.0)));
  auto dw = (dlw_tiles.sum(0) * lw).masked_fill_(wf > std::log(60.0), 0);
  auto grad_initial_state = initial_state.has_value() ? grad_state.to(initial_state->scalar_type()) : grad_state;
  return {dr_tiles.sum(0).to(dtype), dk_tiles.sum(0).to(dtype), dv.to(dtype), dw.to(dtype),
          du_tiles.sum({0, 1}).to(u.scalar_type()), grad_initial_state};
}
