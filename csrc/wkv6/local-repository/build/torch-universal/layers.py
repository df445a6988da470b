"""The WKV6 layer of the local repository: the compiled CPU or CUDA op, built at first use by visualrwkv_hf."""

import torch

from visualrwkv_hf.ops.kernels import wkv6_compiled


class WKV6(torch.nn.Module):
    has_backward = True
    # the op is registered through torch.library but has no fake (meta) implementation yet
    can_torch_compile = False

    def forward(self, r, k, v, w, u, initial_state=None, chunk_size=16):
        return wkv6_compiled(r, k, v, w, u, initial_state, chunk_size)
