"""The decode linear kernel (y = x W^T + b for a few float32 rows, W in nn.Linear's (out, in) layout), as
kernel-builder packages it: `ops.forward(x, weight, bias)`, inference only (no backward). visualrwkv_hf's
`DecodeLinear` layers call the local build (`visualrwkv_hf.ops.linear`).
"""

from ._ops import ops

__all__ = ["ops"]
