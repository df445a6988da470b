#pragma once
// The chunked CUDA WKV7 kernel (wkv7_chunked.cu) behind the op's contract, and the rule that picks it over the step
// kernel; wkv7_cuda.cu's forward and backward hand over to it when `wkv7_chunked_applies`.
#include <torch/all.h>

#include <optional>
#include <tuple>

#include "wkv7_cuda.h"

// Sequences at least this long run chunked (auto rule); shorter ones, decode (T = 1) included, run the step kernel.
// Provisional (WKV6's value): pending `benchmarks/bench_wkv7_cuda.py --crossover` on a GPU, which measures both forms
// over T to set it.
constexpr int64_t kWKV7ChunkedMinLength = 64;

// VISUALRWKV_WKV7_CUDA_FORM: "auto" (default: chunked for T >= kWKV7ChunkedMinLength where it has an instantiation,
// on sm_80+), "step" or "chunked" (forced; "chunked" raises where the kernel cannot run).
bool wkv7_chunked_applies(const torch::Tensor& r);

std::tuple<torch::Tensor, torch::Tensor> wkv7_chunked_forward_cuda(const torch::Tensor& r, const torch::Tensor& w,
                                                                   const torch::Tensor& k, const torch::Tensor& v,
                                                                   const torch::Tensor& a, const torch::Tensor& b,
                                                                   const std::optional<torch::Tensor>& initial_state);

WKV7Grads wkv7_chunked_backward_cuda(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k,
                                     const torch::Tensor& v, const torch::Tensor& a, const torch::Tensor& b,
                                     const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                                     const std::optional<torch::Tensor>& grad_final_state);
