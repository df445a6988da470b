"""Pure tensor functions: the WKV6 recurrence in its forms (torch and compiled) and the WKV7 recurrence in its torch
forms; in `mixing` and `loss`, the mixing layers' elementwise parts and the training loss as autograd functions with
lean backwards. Nothing here knows about models."""

from .kernels import (
    WKV6,
    kernel_available,
    register_wkv6_kernels,
    set_wkv6_backend,
    wkv6_backend,
    wkv6_compiled,
    wkv6_kernel_mapping,
)
from .wkv6 import wkv6, wkv6_chunked, wkv6_recurrent
from .wkv7 import wkv7, wkv7_chunked, wkv7_recurrent, wkv7_reference

__all__ = [
    "WKV6",
    "kernel_available",
    "register_wkv6_kernels",
    "set_wkv6_backend",
    "wkv6",
    "wkv6_backend",
    "wkv6_chunked",
    "wkv6_compiled",
    "wkv6_kernel_mapping",
    "wkv6_recurrent",
    "wkv7",
    "wkv7_chunked",
    "wkv7_recurrent",
    "wkv7_reference",
]
