#pragma once

#include <torch/all.h>

#include <optional>
#include <tuple>

// (dr, dw, dk, dv, da, db, d initial_state)
using WKV7Grads = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                             torch::Tensor>;

std::tuple<torch::Tensor, torch::Tensor> wkv7_forward_cuda(const torch::Tensor& r, const torch::Tensor& w,
                                                           const torch::Tensor& k, const torch::Tensor& v,
                                                           const torch::Tensor& a, const torch::Tensor& b,
                                                           const std::optional<torch::Tensor>& initial_state);

WKV7Grads wkv7_backward_cuda(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                             const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b,
                             const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                             const std::optional<torch::Tensor>& grad_final_state);
