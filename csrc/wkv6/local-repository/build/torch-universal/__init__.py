"""A `kernels` repository for the package's own builds of csrc/wkv6, CPU and CUDA (see visualrwkv_hf.ops.kernels).

A noarch "torch-universal" variant, so `kernels` accepts it whatever the system backend; `metadata.json` must name
a backend and says "cpu", but the layer dispatches on the tensors' device.
"""

from . import layers

__all__ = ["layers"]
