"""A `kernels` repository for the package's own CPU build of csrc/wkv6 (see visualrwkv_hf.ops.kernels)."""

from . import layers

__all__ = ["layers"]
