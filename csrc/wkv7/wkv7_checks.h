#pragma once
// Input checks shared by the CPU and CUDA kernels: the contract of the binding's forward and backward.
#include <torch/all.h>

#include <optional>

inline void wkv7_check_inputs(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                              const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b,
                              const std::optional<torch::Tensor>& initial_state) {
  TORCH_CHECK(r.dim() == 4, "wkv7: r must be (batch, time, heads, head_size)");
  for (const torch::Tensor* x : {&w, &k, &v, &a, &b}) {
    TORCH_CHECK(x->sizes() == r.sizes(), "wkv7: r, w, k, v, a, b must have the same shape");
    TORCH_CHECK(x->scalar_type() == r.scalar_type(), "wkv7: r, w, k, v, a, b must have the same dtype");
    TORCH_CHECK(x->device() == r.device(), "wkv7: r, w, k, v, a, b must be on the same device");
  }
  if (initial_state.has_value()) {
    const auto& s = *initial_state;
    TORCH_CHECK(s.dim() == 4 && s.size(0) == r.size(0) && s.size(1) == r.size(2) && s.size(2) == r.size(3) &&
                    s.size(3) == r.size(3),
                "wkv7: initial_state must be (batch, heads, head_size, head_size)");
    TORCH_CHECK(s.device() == r.device(), "wkv7: initial_state must be on r's device");
  }
}

inline void wkv7_check_grad_y(const torch::Tensor& r, const torch::Tensor& grad_y) {
  TORCH_CHECK(grad_y.sizes() == r.sizes() && grad_y.device() == r.device(),
              "wkv7: grad_y must have r's shape and device");
}
