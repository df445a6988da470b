"""Pure tensor functions: the WKV6 recurrence in its forms (torch and compiled, with `WKV6`, the layer the model
calls) and the WKV7 recurrence in its torch forms; in `kernels`, what every compiled op shares (build, switch,
autograd); in `mixing` and `loss`, the mixing layers' elementwise parts and the training loss as autograd functions
with lean backwards. Nothing here knows about models."""

from .kernels import set_wkv_backend, wkv_backend
from .wkv6 import WKV6, wkv6, wkv6_chunked, wkv6_compiled, wkv6_recurrent
from .wkv7 import wkv7, wkv7_chunked, wkv7_recurrent, wkv7_reference

__all__ = [
    "WKV6",
    "set_wkv_backend",
    "wkv6",
    "wkv6_chunked",
    "wkv6_compiled",
    "wkv6_recurrent",
    "wkv7",
    "wkv7_chunked",
    "wkv7_recurrent",
    "wkv7_reference",
    "wkv_backend",
]
