"""fla's chunk_rwkv6 behind our WKV6 contract (ops.wkv6_fla): its clear errors here, and on a GPU with fla
installed its outputs and gradients against the float64 reference (the conventions bridged: log-decay, scale, state
layout; a mistake in any of them is an O(1) error, far above these tolerances)."""

import importlib.util

import pytest
import torch

from test_ops_wkv6 import grads_of, make_inputs, oracle, rel_err
from visualrwkv_hf.ops.wkv6_fla import wkv6_fla

HAS_FLA = importlib.util.find_spec("fla") is not None


def test_without_a_gpu_or_fla_the_error_says_what_is_needed():
    r, k, v, w, u, s0 = make_inputs(1, 5, 2, 16)
    if HAS_FLA:
        with pytest.raises(ValueError, match="CUDA tensors only"):
            wkv6_fla(r, k, v, w, u, s0)
    else:
        with pytest.raises(ImportError, match="pip install flash-linear-attention"):
            wkv6_fla(r, k, v, w, u, s0)


def test_shape_errors_come_first():
    r, k, v, w, u, _ = make_inputs(1, 5, 2, 16)
    with pytest.raises(ValueError, match="r, k, v, w"):
        wkv6_fla(r, k[:, :4], v, w, u)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fla's kernels are Triton)")
@pytest.mark.skipif(not HAS_FLA, reason="needs flash-linear-attention (optional comparison backend)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_cuda_fla_matches_float64_with_gradients(dtype, tol, with_state):
    B, T, H, N = 2, 200, 2, 64
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=3, with_state=with_state)
    inputs = [x.to(dtype) for x in (r, k, v, w, u)] + [s0]
    g = torch.Generator().manual_seed(4)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    y_ref, s_ref, expected = grads_of(oracle, inputs, grad_y, grad_s, torch.float64)
    leaves = [None if x is None else x.detach().cuda().requires_grad_() for x in inputs]
    y, s = wkv6_fla(*leaves)
    ((y * grad_y.cuda()).sum() + (s * grad_s.cuda()).sum()).backward()
    assert rel_err(y.cpu(), y_ref) < tol and rel_err(s.cpu(), s_ref) < tol
    for name, x, ref in zip(["r", "k", "v", "w", "u", "initial_state"], leaves, expected):
        if x is not None:
            assert torch.isfinite(x.grad).all(), name
            assert rel_err(x.grad.cpu(), ref) < tol, (name, rel_err(x.grad.cpu(), ref))
