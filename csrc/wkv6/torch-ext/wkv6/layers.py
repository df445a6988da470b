"""`kernels` layer: replaces the forward of a module declared with use_kernel_forward_from_hub("WKV6")."""

import torch


class WKV6(torch.nn.Module):
    has_backward = True
    can_torch_compile = False

    def forward(self, r, k, v, w, u, initial_state=None, chunk_size=16):
        from . import wkv6

        # chunk_size belongs to the torch fallback's signature; the kernel has no chunks
        return wkv6(r, k, v, w, u, initial_state)
