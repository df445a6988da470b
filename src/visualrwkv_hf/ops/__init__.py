"""Pure tensor functions: the WKV6 and WKV7 recurrences in their forms (torch and compiled, with `WKV6` and `WKV7`,
the layers the models call); in `linear`, `DecodeLinear`, the models' nn.Linear with a compiled few-row float32 CPU
path for decode steps; in `kernels`, what every compiled op shares (build, switch, autograd); in `mixing` and
`loss`, the mixing layers' elementwise parts and the training loss as autograd functions with lean backwards. Nothing
here knows about models."""

from .kernels import set_wkv_backend, wkv_backend
from .linear import DecodeLinear, decode_linear, linear_compiled
from .wkv6 import WKV6, wkv6, wkv6_chunked, wkv6_compiled, wkv6_recurrent
from .wkv7 import WKV7, wkv7, wkv7_chunked, wkv7_compiled, wkv7_recurrent, wkv7_reference

__all__ = [
    "DecodeLinear",
    "WKV6",
    "WKV7",
    "decode_linear",
    "linear_compiled",
    "set_wkv_backend",
    "wkv6",
    "wkv6_chunked",
    "wkv6_compiled",
    "wkv6_recurrent",
    "wkv7",
    "wkv7_chunked",
    "wkv7_compiled",
    "wkv7_recurrent",
    "wkv7_reference",
    "wkv_backend",
]
