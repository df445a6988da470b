#pragma once
// The chunked CUDA WKV6 kernel (wkv6_chunked.cu) behind the op's contract, and the rule that picks it over the step
// kernel; wkv6_cuda.cu's forward and backward hand over to it when `wkv6_chunked_applies`.
#include <torch/all.h>

#include <optional>
#include <tuple>

#include "wkv6_cuda.h"

// Sequences at least this long run chunked (auto rule); shorter ones, decode (T = 1) included, run the step kernel,
// whose per-step cost has no chunk to fill and no per-chunk MMA setup. benchmarks/bench_wkv6_cuda.py --crossover
// measures both forms over T to set it.
constexpr int64_t kWKV6ChunkedMinLength = 64;

// VISUALRWKV_WKV6_CUDA_FORM: "auto" (default: chunked for T >= kWKV6ChunkedMinLength where it has an instantiation,
// on sm_80+), "step" or "chunked" (forced; "chunked" raises where the kernel cannot run).
bool wkv6_chunked_applies(const torch::Tensor& r);

std::tuple<torch::Tensor, torch::Tensor> wkv6_chunked_forward_cuda(const torch::Tensor& r, const torch::Tensor& k,
                                                                   const torch::Tensor& v, const torch::Tensor& w,
                                                                   const torch::Tensor& u,
                                                                   const std::optional<torch::Tensor>& initial_state);

WKV6Grads wkv6_chunked_backward_cuda(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& w, const torch::Tensor& u,
                                     const std::optional<torch::Tensor>& initial_state, const torch::Tensor& grad_y,
                                     const std::optional<torch::Tensor>& grad_final_state);
