"""WKV6 (RWKV-6 time mixing recurrence) kernels, as kernel-builder packages them: `ops.forward` / `ops.backward`.

r, k, v, w: (B, T, H, N) fp32 / bf16 / fp16; u: (H, N); state (B, H, N, N) fp32, key-major; w is the raw log-log
decay (per-step log-decay -exp(w), clamped at -60). y and the final state are fp32. The autograd wrapper and the layer
are visualrwkv_hf's (`ops.kernels.KernelFunction`): map the model's "WKV6" layer to this build with
`visualrwkv_hf.ops.wkv6_compiled.repository("<org>/wkv6")`.
"""

from ._ops import ops

__all__ = ["ops"]
