#pragma once

#include <torch/all.h>

#include <optional>
#include <tuple>

// (dr, dk, dv, dw, du, d initial_state)
using WKV6Grads = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>;

std::tuple<torch::Tensor, torch::Tensor> wkv6_forward_cuda(const torch::Tensor& r, const torch::Tensor& k,
                                                           const torch::Tensor& v, const torch::Tensor& w,
                                                           const torch::Tensor& u,
                                                           const std::optional<torch::Tensor>& initial_state);

WKV6Grads wkv6_backward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& w, const torch::Tensor& u,
                             const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                             const std::optional<torch::Tensor>& grad_final_state);
