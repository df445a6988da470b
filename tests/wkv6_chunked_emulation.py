"""CPU emulation, in torch, of the chunk algebra of the chunked CUDA WKV6 kernel (csrc/wkv6/wkv6_cuda/wkv6_chunked.cu).

It runs the kernel's algorithm step for step so its math can be debugged and tested without a GPU: the same chunk
(16 tokens) and value tile (16 channels), the same decay factoring, the same 3xTF32 tensor-core products and the same
split of the backward into per-value-tile partial gradients that are summed at the end. Where the kernel reduces in
another order (warp shuffles, the MMA's internal sums) the emulation uses torch's fp32 order; nothing else differs.

The algebra, per (batch, head) and chunk of L = 16 tokens (d_p = exp(lw_p) <= 1 the per-step decay, lw clamped at -60):
    qf_t = prod_{p<t} d_p         (query factor: the chunk-start state seen from step t)
    kf_s = prod_{p>s} d_p         (key factor: step s's update seen from the chunk end)
    D    = prod_p d_p             (whole-chunk decay)
    F(t, s) = prod_{s<p<t} d_p    (s < t: key s seen from query t)
    A[t, s] = sum_c r_tc k_sc F(t, s, c)  (s < t),   A[t, t] = sum_c r_tc u_c k_tc
    y  = (r * qf) @ S + A @ V
    S' = D * S + (k * kf)^T @ V
Every factor is a running product of decays (each <= 1) over the exact span it covers: never a ratio of products or
an exp of a difference of cumulative sums, so nothing overflows, nothing cancels, and a clamped decay (e^-60) simply
underflows the products that contain it to the zero they stand for. The products with S, V and A are tensor-core
matrix products in the kernel, each operand split into a TF32 high part and a TF32 remainder (3 MMAs: hi*hi + hi*lo +
lo*hi), which keeps fp32 accuracy; A and the factors are scalar FMA work (O(L^2 N) per chunk).

Backward, per chunk from the last, with dS' the gradient of the chunk's end state (per value tile, so the sums over
value channels below are partial and summed over tiles at the end):
    dV   = A^T @ dy + (k * kf) @ dS'
    dA   = dy @ V^T  (lower triangle);   d_rq = dy @ S^T;   d_kk = V @ dS'^T
    dr_tc = d_rq_tc qf_tc + sum_{s<t} dA[t, s] k_sc F(t, s, c) + dA[t, t] u_c k_tc
    dk_sc = d_kk_sc kf_sc + sum_{t>s} dA[t, s] r_tc F(t, s, c) + dA[s, s] u_c r_sc
    du_c  = sum_t dA[t, t] r_tc k_tc
    dlw_p = sum_{t>p} d_rq_t r_t qf_t + sum_{s<p} d_kk_s k_s kf_s + D rowsum(dS' * S) + sum_{s<p<t} M(t, s)
            with M(t, s, c) = dA[t, s] r_tc k_sc F(t, s, c)  (every factor's log-derivative is the factor itself)
    dS   = D * dS' + (r * qf)^T @ dy
The kernel gets the pair term of dlw in O(L^2) per channel from row and column sums of M:
C_p = C_{p-1} + sum_{t>p} M(t, p-1) - sum_{s<p-1} M(p, s).
"""

from __future__ import annotations

import math

import torch

CHUNK = 16
VALUE_TILE = 16
LOG_DECAY_MIN = -60.0


def tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10 mantissa bits) to nearest, ties away from zero, as the kernel's __float_to_tf32."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def mma(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as the kernel's 3xTF32 tensor-core product (fp32 accumulate); plain matmul for float64 (gradcheck)."""
    if a.dtype == torch.float64:
        return a @ b
    a_hi, b_hi = tf32(a), tf32(b)
    a_lo, b_lo = tf32(a - a_hi), tf32(b - b_hi)
    # the kernel accumulates the small terms first, then hi*hi, into one fp32 accumulator
    return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi


def chunk_factors(d: torch.Tensor):
    """Decay factors of chunks d (..., L, N) as running products: (qf, kf, D, F) with F (..., L, L, N), F[t, s] =
    prod_{s<p<t} d_p for s < t (garbage-free 1 elsewhere is never used: every use is masked to s < t)."""
    L = d.shape[-2]
    ones = torch.ones_like(d[..., :1, :])
    qf = torch.cumprod(torch.cat([ones, d[..., :-1, :]], -2), -2)
    kf = torch.cumprod(torch.cat([ones, d.flip(-2)[..., :-1, :]], -2), -2).flip(-2)
    D = qf[..., -1, :] * d[..., -1, :]
    # F[t, s] = F[t, s + 1] * d[s + 1], from F[t, t - 1] = 1: the kernel's running product, query by query
    t = torch.arange(L, device=d.device).view(L, 1)
    p = torch.arange(L, device=d.device).view(1, L)
    z = torch.where((p < t).unsqueeze(-1), d.unsqueeze(-3), torch.ones_like(d).unsqueeze(-3))  # (..., t, p, N)
    # exclusive reverse cumprod over p: F[t, s] = prod_{p > s} z[t, p] = prod_{s<p<t} d_p
    inclusive = torch.cumprod(z.flip(-2), -2).flip(-2)
    F = torch.cat([inclusive[..., 1:, :], torch.ones_like(inclusive[..., :1, :])], -2)
    return qf, kf, D, F


def strictly_lower(L: int, device) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)


def scores(r, k, u, F):
    """A (..., L, L): the decayed pair scores below the diagonal, the u-bonus on it, zeros above."""
    L = r.shape[-2]
    A = torch.einsum("...tc,...sc,...tsc->...ts", r, k, F) * strictly_lower(L, r.device)
    return A + torch.diag_embed((r * u * k).sum(-1))


def to_chunks(x, dtype):
    """(B, T, H, N) -> (B, H, C, L, N) chunks in `dtype`, padded at the end with zeros, as the kernel's masked loads."""
    B, T, H, N = x.shape
    C = -(-T // CHUNK)
    x = torch.cat([x.to(dtype), x.new_zeros(B, C * CHUNK - T, H, N, dtype=dtype)], 1)
    return x.view(B, C, CHUNK, H, N).permute(0, 3, 1, 2, 4)


def chunk_inputs(r, k, v, w, dtype):
    """r, k, v, the log-decays lw and the decays d in chunks; the padding steps are inert (r = k = v = 0, lw = 0:
    decay 1)."""
    lw = to_chunks(-torch.exp(w.to(dtype).clamp(max=math.log(-LOG_DECAY_MIN))), dtype)
    return to_chunks(r, dtype), to_chunks(k, dtype), to_chunks(v, dtype), lw, torch.exp(lw)


def from_chunks(x, T):
    B, H, C, L, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, C * L, H, N)[:, :T]


def forward(r, k, v, w, u, initial_state=None, dtype=torch.float32, keep_states=False):
    """The kernel's forward: (y (B, T, H, N), final state (B, H, N, N)) in `dtype` (float32, or float64 for
    gradcheck), and with keep_states the state at every chunk start (B, H, C, N, N), as the backward's state pass
    writes them."""
    B, T, H, N = r.shape
    rc, kc, vc, _, d = chunk_inputs(r, k, v, w, dtype)
    S = torch.zeros(B, H, N, N, dtype=dtype) if initial_state is None else initial_state.to(dtype).clone()
    qf, kf, D, F = chunk_factors(d)
    A = scores(rc, kc, u.to(dtype).view(1, H, 1, 1, N), F)
    ys, starts = [], []
    for c in range(rc.shape[2]):
        starts.append(S)
        ys.append(mma(rc[:, :, c] * qf[:, :, c], S) + mma(A[:, :, c], vc[:, :, c]))
        S = D[:, :, c].unsqueeze(-1) * S + mma((kc[:, :, c] * kf[:, :, c]).transpose(-1, -2), vc[:, :, c])
    y = from_chunks(torch.stack(ys, 2), T) if ys else r.new_zeros(B, 0, H, N, dtype=dtype)
    if keep_states:
        return y, S, (torch.stack(starts, 2) if starts else S.new_zeros(B, H, 0, N, N))
    return y, S


def pair_decay_gradient(M):
    """sum_{s<p<t} M(t, s) for every p, from M (..., L, L, N) masked to s < t, by the kernel's recursion
    C_p = C_{p-1} + sum_{t>p} M(t, p-1) - sum_{s<p-1} M(p, s)."""
    L = M.shape[-3]
    t = torch.arange(L, device=M.device).view(L, 1)
    s = torch.arange(L, device=M.device).view(1, L)
    # column s without its first entry below the diagonal (t = s + 1); row t without its last (s = t - 1)
    col = (M * (t > s + 1).unsqueeze(-1)).sum(-3)  # indexed by s
    row = (M * (s < t - 1).unsqueeze(-1)).sum(-2)  # indexed by t
    step = torch.cat([torch.zeros_like(col[..., :1, :]), col[..., :-1, :] - row[..., 1:, :]], -2)
    return torch.cumsum(step, -2)


def backward(r, k, v, w, u, initial_state, grad_y, grad_state, dtype=torch.float32):
    """The kernel's backward: (dr, dk, dv, dw, du, d initial_state), each value tile's partial dr, dk, dw, du
    computed separately and summed at the end as the kernel's host code does."""
    B, T, H, N = r.shape
    tiles = N // VALUE_TILE if N % VALUE_TILE == 0 else 1
    width = N // tiles
    rc, kc, vc, lw, d = chunk_inputs(r, k, v, w, dtype)
    dyc = to_chunks(torch.zeros(r.shape, dtype=dtype) if grad_y is None else grad_y, dtype)
    C = rc.shape[2]
    _, _, starts = forward(r, k, v, w, u, initial_state, dtype, keep_states=True)
    uc = u.to(dtype).view(1, H, 1, N)
    qf, kf, D, F = chunk_factors(d)
    lower = strictly_lower(CHUNK, r.device)
    dr, dk, dlw = (torch.zeros(tiles, B, H, C, CHUNK, N, dtype=dtype) for _ in range(3))
    du = torch.zeros(tiles, B, H, N, dtype=dtype)
    dv = torch.zeros(B, H, C, CHUNK, N, dtype=dtype)
    dS_tiles = []
    for j in range(tiles):
        cols = slice(j * width, (j + 1) * width)
        dS = torch.zeros(B, H, N, width, dtype=dtype) if grad_state is None else grad_state.to(dtype)[..., cols]
        for c in reversed(range(C)):
            r_, k_, q_, kf_, F_ = rc[:, :, c], kc[:, :, c], qf[:, :, c], kf[:, :, c], F[:, :, c]
            v_, dy_, S = vc[:, :, c, :, cols], dyc[:, :, c, :, cols], starts[:, :, c, :, cols]
            rq, kk = r_ * q_, k_ * kf_
            A = scores(r_, k_, uc, F_)
            dv[:, :, c, :, cols] = mma(A.transpose(-1, -2), dy_) + mma(kk, dS)
            dA = mma(dy_, v_.transpose(-1, -2))
            d_rq = mma(dy_, S.transpose(-1, -2))
            d_kk = mma(v_, dS.transpose(-1, -2))
            dA_low = (dA * lower).unsqueeze(-1)
            diag = dA.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
            dr[j, :, :, c] = d_rq * q_ + (dA_low * k_.unsqueeze(-3) * F_).sum(-2) + diag * uc * k_
            dk[j, :, :, c] = d_kk * kf_ + (dA_low * r_.unsqueeze(-2) * F_).sum(-3) + diag * uc * r_
            du[j] += (diag * r_ * k_).sum(-2)
            M = dA_low * r_.unsqueeze(-2) * k_.unsqueeze(-3) * F_
            q_term = d_rq * rq  # reaches every p < t: exclusive suffix sum over t
            k_term = d_kk * kk  # reaches every p > s: exclusive prefix sum over s
            q_suffix = q_term.flip(-2).cumsum(-2).flip(-2) - q_term
            k_prefix = k_term.cumsum(-2) - k_term
            state_term = D[:, :, c] * (dS * S).sum(-1)
            dlw[j, :, :, c] = q_suffix + k_prefix + state_term.unsqueeze(-2) + pair_decay_gradient(M)
            dS = D[:, :, c].unsqueeze(-1) * dS + mma(rq.transpose(-1, -2), dy_)
        dS_tiles.append(dS)
    lw_tokens = from_chunks(lw, T)
    # dw = dlw * d lw / dw = dlw * lw, exactly zero past the clamp (lw constant there)
    dw = from_chunks(dlw.sum(0), T) * lw_tokens
    dw = dw.masked_fill(w.to(dtype) > math.log(-LOG_DECAY_MIN), 0)
    d_initial = torch.cat(dS_tiles, -1)
    return from_chunks(dr.sum(0), T), from_chunks(dk.sum(0), T), from_chunks(dv, T), dw, du.sum((0, 1)), d_initial


class ChunkedWKV6Emulation(torch.autograd.Function):
    """The emulated forward and backward as one autograd op, same contract as `ops.wkv6` (gradients in float32,
    or float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, r, k, v, w, u, initial_state):
        dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
        ctx.save_for_backward(r, k, v, w, u, initial_state)
        ctx.dtype = dtype
        return forward(r, k, v, w, u, initial_state, dtype)

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        r, k, v, w, u, initial_state = ctx.saved_tensors
        grads = backward(r, k, v, w, u, initial_state, grad_y, grad_state, ctx.dtype)
        grads = [g.to(x.dtype) for g, x in zip(grads[:5], (r, k, v, w, u))] + [grads[5]]
        return *grads[:5], (grads[5] if initial_state is not None else None)


def wkv6_chunked_emulation(r, k, v, w, u, initial_state=None):
    """(y, final state) of the chunked kernel's algorithm, with its backward."""
    return ChunkedWKV6Emulation.apply(r, k, v, w, u, initial_state)
