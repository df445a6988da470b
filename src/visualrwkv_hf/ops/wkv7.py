"""The RWKV-7 WKV recurrence (the generalised delta rule) as pure functions.

Layout (shared by every form, as for WKV6): r, w, k, v, a, b are (B, T, H, N); the state S is (B, H, N, N) in
float32, key-major (rows = key channel i, columns = value channel j). `w` is the raw "log-log" decay:
decay = exp(-exp(w)). Per head and step, with row vectors:
    S_t = (diag(decay_t) + b_t^T a_t) S_{t-1} + k_t^T v_t
    y_t = r_t S_t                                   (the updated state: RWKV-7 has no bonus u)
i.e. S_t[i, j] = decay_t[i] S_{t-1}[i, j] + b_t[i] (a_t S_{t-1})[j] + k_t[i] v_t[j]. BlinkDL's kernels keep the
transposed (value-major) state M = S^T, M_t = M_{t-1} (diag(decay_t) + a_t^T b_t) + v_t^T k_t, y_t = M_t r_t^T;
transpose at that boundary. An RWKV-7 layer calls it with a = -kk and b = kk * iclr (kk the L2-normalised key,
iclr = sigmoid(..) in [0, 1]) and w = -softplus(-x) - 0.5 <= -0.5, so each decay lies in (exp(-e^-0.5), 1) ~
(0.545, 1). The op itself accepts any a, b and w.

Forms: `wkv7_reference` (float64, step by step: the readable definition and the tests' oracle),
`wkv7_recurrent` (float32 steps: decode), `wkv7_chunked` (matmul-heavy: prefill and training) and `wkv7`, which
picks one by length. All but the reference compute in float32 whatever the input dtype and return (y, final_state)
in float32; every input, the initial state included, gets a gradient (autograd through the step forms, a
hand-written backward for the chunked one, `_ChunkedWKV7`). Like WKV6 they clamp the per-step log-decay -exp(w) at
LOG_DECAY_MIN.

Chunked form: a chunk of L steps starting from S_0, with D_t = decay_1 * .. * decay_t (elementwise) and
sa_t = a_t S_{t-1} (the delta rule's "state times a" row), unrolls to
    sa_t = (a_t D_{t-1}) S_0 + sum_{s<t} <a_t D_{t-1} / D_s, b_s> sa_s + <a_t D_{t-1} / D_s, k_s> v_s
    y_t  = (r_t D_t) S_0     + sum_{s<=t} <r_t D_t / D_s, b_s> sa_s + <r_t D_t / D_s, k_s> v_s
    S_L  = D_L S_0           + sum_s (b_s D_L / D_s)^T sa_s + (k_s D_L / D_s)^T v_s
The first line is a unit lower-triangular system in the sa rows (the WY/UT representation of a product of
identity-plus-rank-one transitions): one triangular solve per chunk gives sa = W S_0 + U, all chunks at once.
What is left sequential is one (N, N) product per chunk: S_{c+1} = (diag(D_L) + (b D_L / D)^T W) S_c + const.
The pairwise decays D_{t-1} / D_s are factorised as exp(G_{t-1}) * exp(-G_s), G = cumulative log-decay from the
chunk start. That is exact up to rounding (each product of factors is one decayed term: no difference of large
numbers) but each factor must stay representable: `wkv7_chunked` shrinks the chunk so that no chunk's summed
log-decay exceeds LOG_FACTOR_MAX (e^60 ~ 1e26 is far inside float32's range, products included).

`wkv7_compiled` is the same op through the compiled kernels of csrc/wkv7 (CPU, and CUDA for the head sizes in
`CUDA_HEAD_SIZES`: the step kernel, or for T >= 64 on sm_80+ with head size 16, 32 or 64 the chunked tensor-core
kernel, chosen in C++ by wkv7_chunked_op.h's rule), with `wkv7` as its fallback and WKV6's switch (see
`ops.kernels`); `WKV7` is the stateless layer a model calls it through, so `kernels.kernelize` can replace it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations import use_kernel_forward_from_hub

from .kernels import BINDING, CompiledOp
from .wkv6 import LOG_DECAY_MIN, _initial_state, _log_decay

# Largest |summed log-decay| over one chunk: the factors exp(-G) and exp(G) stay within [e^-60, e^60], normal
# float32 numbers with ample room for the inputs' magnitudes. RWKV-7's fastest decay (per-step log-decay
# -e^-0.5 ~ -0.61) allows chunks of 64.
LOG_FACTOR_MAX = -LOG_DECAY_MIN

NAMES = ("r", "w", "k", "v", "a", "b")


def _check_inputs(r, w, k, v, a, b, initial_state):
    inputs = (r, w, k, v, a, b)
    if r.dim() != 4 or any(x.shape != r.shape for x in inputs):
        raise ValueError(
            "r, w, k, v, a, b must all have shape (batch, time, heads, head_size); got "
            + ", ".join(str(tuple(x.shape)) for x in inputs)
            + "."
        )
    not_float = [f"{name} ({x.dtype})" for name, x in zip(NAMES, inputs) if not x.is_floating_point()]
    if initial_state is not None and not initial_state.is_floating_point():
        not_float.append(f"initial_state ({initial_state.dtype})")
    if not_float:
        raise TypeError(f"WKV7 inputs must be floating point; got {', '.join(not_float)}.")
    devices = {x.device for x in inputs} | ({initial_state.device} if initial_state is not None else set())
    if len(devices) > 1:
        raise ValueError(f"WKV7 inputs must all be on one device; got {sorted(map(str, devices))}.")
    B, _, H, N = r.shape
    if initial_state is not None and tuple(initial_state.shape) != (B, H, N, N):
        raise ValueError(f"initial_state must have shape {(B, H, N, N)}, got {tuple(initial_state.shape)}.")


def wkv7_reference(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV7 by its definition, one step at a time in float64 (no clamp): the oracle the other forms and kernels are
    tested against. Returns (y, final_state) in float64."""
    _check_inputs(r, w, k, v, a, b, initial_state)
    B, T, H, N = r.shape
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if initial_state is None else initial_state.double()
    ys = []
    for t in range(T):
        decay = torch.exp(-torch.exp(w[:, t]))
        sa = torch.einsum("bhi,bhij->bhj", a[:, t], S)
        S = decay[..., :, None] * S + b[:, t, :, :, None] * sa[..., None, :] + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], S))
    y = torch.stack(ys, 1) if ys else r.new_zeros(B, 0, H, N)
    return y, S


def wkv7_recurrent(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step WKV7 in float32: the decode path (O(1) work per token), three products per step."""
    _check_inputs(r, w, k, v, a, b, initial_state)
    B, T, H, N = r.shape
    state = _initial_state(r, initial_state)
    # (B, H, T, N) so each step's slices are contiguous
    r, a = (x.float().transpose(1, 2) for x in (r, a))
    decay = torch.exp(_log_decay(w)).transpose(1, 2)
    # b and k as the two columns of one (N, 2) factor, so the rank-2 update is one batched product
    bk = torch.stack([b.float(), k.float()], -1).transpose(1, 2)
    v = v.float().transpose(1, 2)
    ys = []
    # unbind (not x[:, :, t]) keeps autograd through the loop O(T): indexing would materialise a full-size zero
    # grad per step
    for r_t, d_t, a_t, bk_t, v_t in zip(*(x.unbind(2) for x in (r, decay, a, bk, v))):
        sa = torch.matmul(a_t.unsqueeze(-2), state)
        state = torch.baddbmm(
            (d_t.unsqueeze(-1) * state).flatten(0, 1),
            bk_t.flatten(0, 1),
            torch.cat([sa, v_t.unsqueeze(-2)], -2).flatten(0, 1),
        ).view(B, H, N, N)
        ys.append(torch.matmul(r_t.unsqueeze(-2), state))
    if not ys:
        return r.new_zeros(B, 0, H, N), state
    return torch.cat(ys, dim=2).transpose(1, 2), state


def _chunk_size_for(log_decay_min: float, chunk_size: int, T: int) -> int:
    """The chunk length: `chunk_size`, shrunk to a power of two whose chunks sum to no less than -LOG_FACTOR_MAX at
    the fastest decay (`log_decay_min` <= 0) and to the next power of two >= T for short inputs."""
    chunk = min(chunk_size, 1 << max(0, (T - 1).bit_length()))
    while chunk > 1 and chunk * -log_decay_min > LOG_FACTOR_MAX:
        chunk //= 2
    return chunk


@functools.lru_cache(maxsize=None)
def _score_mask(L: int, device: torch.device) -> torch.Tensor:
    """(2L, 2L) mask of the score blocks [[A_rb, A_rk], [A_ab, A_ak]]: a query row t sees keys s <= t (y reads the
    updated state), an `a` row sees s < t (sa_t reads the state before step t)."""
    t, s = torch.arange(2 * L).view(-1, 1), torch.arange(2 * L).view(1, -1) % L
    return torch.where(t < L, s <= t, s < t - L).to(device)


def _chunk_parts(r, lw, k, v, a, b):
    """Everything of the chunks (C, B * H, L, N) that does not depend on the state entering them, as a namespace:
    the scaled rows, the score blocks, the inverse of (I - A_ab), [W, U] and the chunk's maps
    y = query S_0 + y_intra, S_end = transition S_0 + offset."""
    L, N = r.shape[-2:]
    G = lw.cumsum(-2)  # log D_t
    G_end = G[..., -1:, :]  # log D_L
    # queries scaled from the chunk start (r by D_t, a by D_{t-1}), keys scaled back to it (by 1 / D_s): their
    # products are the pairwise decays; keys scaled forward to the chunk end (D_L / D_s <= 1) build the next state
    p = SimpleNamespace(decay_end=torch.exp(G_end.squeeze(-2)))
    p.to_r, p.to_a, p.to_start, p.to_end = torch.exp(torch.stack([G, G - lw, -G, G_end - G])).unbind(0)
    # r_in; a_in and b_out; k_out stacked on the step axis: all four score blocks come from one product
    p.rows_in, p.cols_out, p.cols_end = (r.new_empty(*r.shape[:-2], 2 * L, N) for _ in range(3))
    for out, x, factor in (
        (p.rows_in[..., :L, :], r, p.to_r), (p.rows_in[..., L:, :], a, p.to_a),
        (p.cols_out[..., :L, :], b, p.to_start), (p.cols_out[..., L:, :], k, p.to_start),
        (p.cols_end[..., :L, :], b, p.to_end), (p.cols_end[..., L:, :], k, p.to_end),
    ):
        torch.mul(x, factor, out=out)
    scores = p.rows_in @ p.cols_out.transpose(-1, -2)
    scores.masked_fill_(~_score_mask(L, r.device), 0)
    p.A_rb, p.A_rk, p.A_ab, p.A_ak = scores[..., :L, :L], scores[..., :L, L:], scores[..., L:, :L], scores[..., L:, L:]
    # sa = A_ab sa + a_in S_0 + A_ak v is unit lower-triangular: sa = W S_0 + U with [W, U] = inverse [a_in, A_ak v].
    # Solving for the (L, L) inverse is cheap (against the (L, 2N) right-hand sides it took 8x longer, torch 2.13).
    eye = torch.eye(L, dtype=r.dtype, device=r.device)
    p.inverse = torch.linalg.solve_triangular(eye - p.A_ab, eye.expand_as(p.A_ab), upper=False, unitriangular=True)
    p.WU = p.inverse @ torch.cat([p.rows_in[..., L:, :], p.A_ak @ v], -1)
    from_rb = p.A_rb @ p.WU  # [A_rb W, A_rb U]
    from_b = p.cols_end[..., :L, :].transpose(-1, -2) @ p.WU  # [b_end^T W, b_end^T U]
    p.query = from_rb[..., :N].add_(p.rows_in[..., :L, :])
    p.y_intra = from_rb[..., N:].add_(p.A_rk @ v)
    p.transition = from_b[..., :N]
    p.transition.diagonal(dim1=-2, dim2=-1).add_(p.decay_end)
    p.offset = from_b[..., N:].add_(p.cols_end[..., L:, :].transpose(-1, -2) @ v)
    return p


def _flat(x):
    """A (C, B * H, rows, cols) tensor as the (C * B * H, rows, cols) batch of `bmm`."""
    return x.flatten(0, 1)


class _ChunkedWKV7(torch.autograd.Function):
    """The chunked form on (C, B * H, L, N) chunks (chunk-major: the sequential loop over chunks unbinds dim 0), with
    log-decays lw <= 0 whose chunk sums are >= -LOG_FACTOR_MAX and the state (B * H, N, N), with a hand-written
    backward: it saves the inputs and the state entering each chunk (N^2 / L floats per token and head), and
    recomputes the chunks' parts. Autograd through the same ops took about twice as long in forward + backward (its
    slice and cat backwards fill and copy full-size tensors) and kept every temporary. Any floating dtype (float64 for
    gradcheck); the public function passes float32.
    """

    @staticmethod
    def forward(ctx, r, lw, k, v, a, b, state):
        p = _chunk_parts(r, lw, k, v, a, b)
        starts = state.new_empty(r.shape[0], *state.shape)
        for c, (transition_c, offset_c) in enumerate(zip(p.transition.unbind(0), p.offset.unbind(0))):
            starts[c] = state
            state = torch.baddbmm(offset_c, transition_c, state)
        y = torch.baddbmm(_flat(p.y_intra), _flat(p.query), _flat(starts)).view_as(v)
        ctx.save_for_backward(r, lw, k, v, a, b, starts)
        return y, state

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, d_state):
        r, lw, k, v, a, b, starts = ctx.saved_tensors
        p = _chunk_parts(r, lw, k, v, a, b)
        L, N = r.shape[-2:]
        # the state gradient runs backwards through the chunk maps: dS_start = transition^T dS_end + query^T dy
        from_y = torch.bmm(_flat(p.query).transpose(1, 2), _flat(dy)).view_as(starts)
        d_ends = torch.empty_like(starts)
        for c in reversed(range(r.shape[0])):
            d_ends[c] = d_state
            d_state = torch.baddbmm(from_y[c], p.transition[c].transpose(-1, -2), d_state)
        # every chunk at once, from its entering state S_0 and the gradient dE of its final state
        S0, dE = starts, d_ends
        sa = torch.matmul(p.WU[..., :N], S0).add_(p.WU[..., N:])
        b_end, k_end = p.cols_end.split(L, -2)
        d_sa = p.A_rb.transpose(-1, -2) @ dy + b_end @ dE
        g = p.inverse.transpose(-1, -2) @ d_sa  # gradient of sa's right-hand side a_in S_0 + A_ak v
        # gradients of the score blocks [[A_rb, A_rk], [A_ab, A_ak]] (A_ab's through the inverse: g sa^T)
        sa_v = torch.cat([sa, v], -2)
        d_scores = torch.cat([dy, g], -2) @ sa_v.transpose(-1, -2)
        d_scores.masked_fill_(~_score_mask(L, r.device), 0)
        d_rows_in = d_scores @ p.cols_out  # [d r_in; d a_in]
        d_rows_in[..., :L, :] += dy @ S0.transpose(-1, -2)
        d_rows_in[..., L:, :] += g @ S0.transpose(-1, -2)
        d_cols_out = d_scores.transpose(-1, -2) @ p.rows_in  # [d b_out; d k_out]
        d_cols_end = sa_v @ dE.transpose(-1, -2)  # [d b_end; d k_end]
        dv = p.A_rk.transpose(-1, -2) @ dy + p.A_ak.transpose(-1, -2) @ g + k_end @ dE
        # each factor exp(e) scales x: d e = d(x exp(e)) * x exp(e), no difference of large terms
        d_r_in, d_a_in = d_rows_in.split(L, -2)
        d_b_out, d_k_out = d_cols_out.split(L, -2)
        d_b_end, d_k_end = d_cols_end.split(L, -2)
        dr, da = d_r_in * p.to_r, d_a_in * p.to_a
        db = torch.addcmul(d_b_out * p.to_start, d_b_end, p.to_end)
        dk = torch.addcmul(d_k_out * p.to_start, d_k_end, p.to_end)
        d_exponents = d_rows_in * p.rows_in  # [d G as r's exponent; d G_prev]
        d_to_start = (d_cols_out * p.cols_out).view(*lw.shape[:-2], 2, L, N).sum(-3)
        d_to_end = (d_cols_end * p.cols_end).view(*lw.shape[:-2], 2, L, N).sum(-3)
        d_G_prev = d_exponents[..., L:, :]
        d_G = d_exponents[..., :L, :] - d_to_start - d_to_end + d_G_prev
        d_G[..., -1, :] += d_to_end.sum(-2) + p.decay_end * (dE * S0).sum(-1)
        # G = cumsum(lw), G_prev = G - lw
        d_lw = d_G.flip(-2).cumsum(-2).flip(-2) - d_G_prev
        return dr, d_lw, dk, dv, da, db, d_state


def wkv7_chunked(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel WKV7 for prefill and training; same result as `wkv7_recurrent`.

    `chunk_size` must be a power of two; the chunk shrinks for short inputs and, so that every decay factor stays
    within [e^-60, e^60], for fast decays (reading the fastest one costs one device sync): RWKV-7's decays keep
    chunks of up to 64, WKV6-like decays (w up to 3) get chunks of 2, and a decay at the clamp one step per chunk.
    """
    _check_inputs(r, w, k, v, a, b, initial_state)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}.")
    B, T, H, N = r.shape
    state = _initial_state(r, initial_state)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=torch.float32), state
    lw = _log_decay(w)
    chunk = _chunk_size_for(lw.min().item(), chunk_size, T)
    padded = -(-T // chunk) * chunk
    # zero-padding at the end is inert: log-decay 0 and a = b = k = 0 leave the state as it is
    # (B, T, H, N) -> chunk-major (C, B * H, L, N)
    r, lw, k, v, a, b = (
        F.pad(x, (0, 0, 0, 0, 0, padded - T)).view(B, padded // chunk, chunk, H, N).permute(1, 0, 3, 2, 4)
        .reshape(padded // chunk, B * H, chunk, N)
        for x in (r.float(), lw, k.float(), v.float(), a.float(), b.float())
    )
    y, state = _ChunkedWKV7.apply(r, lw, k, v, a, b, state.reshape(B * H, N, N))
    y = y.view(padded // chunk, B, H, chunk, N).permute(1, 0, 3, 2, 4).reshape(B, padded, H, N)[:, :T]
    return y, state.view(B, H, N, N)


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV7 through the form that suits the length: the step form for one token (decode), chunked otherwise."""
    if r.dim() == 4 and r.shape[1] == 1:
        return wkv7_recurrent(r, w, k, v, a, b, initial_state)
    return wkv7_chunked(r, w, k, v, a, b, initial_state, chunk_size)


# head sizes the CUDA kernel is instantiated for (a thread's rows of the state live in registers); others use torch
CUDA_HEAD_SIZES = (16, 32, 64, 128)

wkv7_compiled = CompiledOp(
    "wkv7",
    sources={"cpu": ["wkv7/wkv7_cpu/wkv7_cpu.cpp", f"wkv7/{BINDING}"],
             "cuda": ["wkv7/wkv7_cuda/wkv7_cuda.cu", "wkv7/wkv7_cuda/wkv7_chunked.cu",
                      "wkv7/wkv7_cuda/wkv7_chunked_op.cu", f"wkv7/{BINDING}"]},
    headers=["wkv7/wkv7_checks.h", "wkv7/wkv7_cpu/wkv7_cpu.h", "wkv7/wkv7_cuda/wkv7_cuda.h",
             "wkv7/wkv7_cuda/wkv7_chunked.h", "wkv7/wkv7_cuda/wkv7_chunked_op.h"],
    fallback=wkv7,
    check_inputs=_check_inputs,
    layer_name="WKV7",
    cuda_head_sizes=CUDA_HEAD_SIZES,
)


@use_kernel_forward_from_hub("WKV7")
class WKV7(nn.Module):
    """The WKV7 recurrence as a stateless layer, so `kernels.kernelize` can swap its forward per device and mode."""

    def forward(
        self,
        r: torch.Tensor,
        w: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        chunk_size: int = 32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv7_compiled(r, w, k, v, a, b, initial_state, chunk_size=chunk_size)
