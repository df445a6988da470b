"""Pure tensor functions: the WKV6 recurrence in its forms. Nothing here knows about models."""

from .wkv6 import wkv6, wkv6_chunked, wkv6_recurrent

__all__ = ["wkv6", "wkv6_chunked", "wkv6_recurrent"]
