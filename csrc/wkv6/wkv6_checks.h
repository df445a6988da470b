#pragma once
// Input checks shared by the CPU and CUDA kernels: the contract of the binding's forward and backward.
#include <torch/all.h>

#include <optional>

inline void wkv6_check_inputs(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& w, const torch::Tensor& u,
                              const std::optional<torch::Tensor>& initial_state) {
  TORCH_CHECK(r.dim() == 4, "wkv6: r must be (batch, time, heads, head_size)");
  TORCH_CHECK(k.sizes() == r.sizes() && v.sizes() == r.sizes() && w.sizes() == r.sizes(),
              "wkv6: r, k, v, w must have the same shape");
  TORCH_CHECK(k.scalar_type() == r.scalar_type() && v.scalar_type() == r.scalar_type() &&
                  w.scalar_type() == r.scalar_type(),
              "wkv6: r, k, v, w must have the same dtype");
  TORCH_CHECK(k.device() == r.device() && v.device() == r.device() && w.device() == r.device() &&
                  u.device() == r.device(),
              "wkv6: r, k, v, w, u must be on the same device");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == r.size(2) && u.size(1) == r.size(3), "wkv6: u must be (heads, head_size)");
  if (initial_state.has_value()) {
    const auto& s = *initial_state;
    TORCH_CHECK(s.dim() == 4 && s.size(0) == r.size(0) && s.size(1) == r.size(2) && s.size(2) == r.size(3) &&
                    s.size(3) == r.size(3),
                "wkv6: initial_state must be (batch, heads, head_size, head_size)");
    TORCH_CHECK(s.device() == r.device(), "wkv6: initial_state must be on r's device");
  }
}
