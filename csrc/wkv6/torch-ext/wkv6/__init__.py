"""WKV6 (RWKV-6 time mixing recurrence) kernels: `wkv6(r, k, v, w, u, initial_state=None) -> (y, final_state)`.

r, k, v, w: (B, T, H, N) fp32 / bf16 / fp16; u: (H, N); state (B, H, N, N) fp32, key-major; w is the raw log-log
decay (per-step log-decay -exp(w), clamped at -60). y and the final state are fp32. Differentiable in every input,
the initial state included.
"""

from typing import Optional, Tuple

import torch

from . import layers
from ._ops import ops


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, k, v, w, u, initial_state):
        y, state = ops.forward(r, k, v, w, u, initial_state)
        ctx.save_for_backward(r, k, v, w, u, initial_state)
        ctx.set_materialize_grads(False)
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        r, k, v, w, u, initial_state = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros(r.shape, dtype=torch.float32, device=r.device)
        dr, dk, dv, dw, du, d_initial = ops.backward(r, k, v, w, u, initial_state, grad_y, grad_state)
        return dr, dk, dv, dw, du, (d_initial if initial_state is not None else None)


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _WKV6.apply(r, k, v, w, u, initial_state)


__all__ = ["layers", "ops", "wkv6"]
