#pragma once

#include <torch/all.h>

#include <optional>

torch::Tensor linear_forward_cpu(const torch::Tensor& x, const torch::Tensor& weight,
                                 const std::optional<torch::Tensor>& bias);
