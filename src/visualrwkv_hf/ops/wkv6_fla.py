"""fla's `chunk_rwkv6` (flash-linear-attention: Triton kernels, CUDA only) behind the WKV6 contract of `ops.wkv6`.

The independent implementation benchmarks/bench_wkv6_cuda.py compares our CUDA kernels with (speed and error against
float64, side by side), validated against the float64 reference, gradients included, by tests/test_ops_wkv6_fla.py
on a GPU. It is not a model backend: fla's RWKV-6 layers still carry a "potentially buggy" warning and its bf16
gradients lose far more precision than our fp32-state kernels.

Conventions bridged here: fla takes the per-step log-decay itself (so w becomes -exp(w), clamped as every form of
ours), scales r.k by K^-0.5 unless told scale=1, and keeps the state key-major (B, H, K, V) like ours.
"""

from __future__ import annotations

import math

import torch

from .wkv6 import LOG_DECAY_MIN, _check_inputs


def fla_chunk_rwkv6():
    """fla's `chunk_rwkv6`, or an ImportError saying what to install."""
    try:
        from fla.ops.rwkv6 import chunk_rwkv6
    except ImportError as error:
        raise ImportError(
            "wkv6_fla needs flash-linear-attention (pip install flash-linear-attention; it runs on CUDA GPUs through "
            f"Triton): {error}"
        ) from error
    return chunk_rwkv6


def wkv6_fla(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, final state) of WKV6 through fla's `chunk_rwkv6`, y and state in float32; differentiable."""
    _check_inputs(r, k, v, w, u, initial_state)
    chunk_rwkv6 = fla_chunk_rwkv6()
    if r.device.type != "cuda":
        raise ValueError(f"wkv6_fla runs on CUDA tensors only (fla's kernels are Triton), got device {r.device}.")
    log_decay = -torch.exp(w.float().clamp(max=math.log(-LOG_DECAY_MIN)))
    state = None if initial_state is None else initial_state.float()
    y, final_state = chunk_rwkv6(r, k, v, log_decay, u, scale=1.0, initial_state=state, output_final_state=True)
    return y.float(), final_state.float()
