"""The RWKV-6 WKV recurrence as pure functions.

Layout (shared by every form): r, k, v, w are (B, T, H, N); u is (H, N); the state S is (B, H, N, N) in float32,
key-major (rows = key channel i, columns = value channel j). `w` is the raw "log-log" decay: decay = exp(-exp(w)).
Per head and step:
    y_t = r_t @ (diag(u) k_t^T v_t + S_{t-1})
    S_t = diag(decay_t) S_{t-1} + k_t^T v_t
Every form takes an optional initial state (zeros when None), returns (y, final_state), and computes in float32
whatever the input dtype: y is float32 so the caller's GroupNorm sees full precision.

Every form clamps the per-step log-decay -exp(w) at -60 (see `_log_decay`): a decay below e^-60 ~ 1e-26 is already
nothing next to the k^T v added in the same step, and the clamp keeps exp(w) and its gradient finite for huge w.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

LOG_DECAY_MIN = -60.0
SEGMENT_LEN = 128


def _check_inputs(r, k, v, w, u, initial_state):
    if not (r.shape == k.shape == v.shape == w.shape) or r.dim() != 4:
        raise ValueError(
            "r, k, v, w must all have shape (batch, time, heads, head_size); got "
            f"{tuple(r.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(w.shape)}."
        )
    B, _, H, N = r.shape
    if tuple(u.shape) != (H, N):
        raise ValueError(f"u must have shape (heads, head_size) = {(H, N)}, got {tuple(u.shape)}.")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, N, N):
        raise ValueError(f"initial_state must have shape {(B, H, N, N)}, got {tuple(initial_state.shape)}.")


def _log_decay(w: torch.Tensor) -> torch.Tensor:
    """Per-step log-decay -exp(w) in float32, clamped at LOG_DECAY_MIN.

    The clamp acts on w (before exp) so exp never overflows and the gradient is exactly zero past the clamp,
    instead of 0 * inf = NaN.
    """
    return -torch.exp(w.float().clamp(max=math.log(-LOG_DECAY_MIN)))


def _initial_state(r, initial_state):
    B, _, H, N = r.shape
    if initial_state is None:
        return torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)
    return initial_state.float()


def wkv6_recurrent(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step WKV6: the reference form and the decode path (O(1) work per token)."""
    _check_inputs(r, k, v, w, u, initial_state)
    B, T, H, N = r.shape
    state = _initial_state(r, initial_state)
    # (B, H, T, N) so each step's slices are contiguous
    r, k, v = (x.float().transpose(1, 2) for x in (r, k, v))
    decay = torch.exp(_log_decay(w)).transpose(1, 2)
    # the u-bonus r_t.(u*k_t) v_t needs no state: compute it for all steps at once
    bonus = (r * u.float().unsqueeze(1) * k).sum(-1, keepdim=True) * v
    ys = []
    # unbind (not x[:, :, t]) keeps autograd through the loop O(T): indexing would materialise a full-size zero
    # grad per step
    for r_t, k_t, v_t, d_t in zip(r.unbind(2), k.unbind(2), v.unbind(2), decay.unbind(2)):
        ys.append(torch.matmul(r_t.unsqueeze(-2), state))
        state = torch.addcmul(d_t.unsqueeze(-1) * state, k_t.unsqueeze(-1), v_t.unsqueeze(-2))
    if not ys:
        return r.new_zeros(B, 0, H, N), state
    y = torch.cat(ys, dim=2) + bonus
    return y.transpose(1, 2), state


def _excl_cumsum(x: torch.Tensor) -> torch.Tensor:
    """sum over p < t of x_p along dim -2; a shifted cumsum (no subtraction), so row 0 is exactly 0."""
    return F.pad(x.cumsum(-2)[..., :-1, :], (0, 0, 1, 0))


def _excl_rcumsum(x: torch.Tensor) -> torch.Tensor:
    """sum over p > t of x_p along dim -2; a shifted reverse cumsum, so the last row is exactly 0."""
    return F.pad(x.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))


def _halves(x: torch.Tensor, half: int) -> torch.Tensor:
    """(..., L, N) -> (..., L / (2 half), 2, half, N): the blocks of one dyadic level, split into their halves."""
    *lead, L, N = x.shape
    return x.view(*lead, L // (2 * half), 2, half, N)


def _levels(L: int):
    half = 1
    while half < L:
        yield half
        half *= 2


def _intra_forward(y, r, k, v, lw):
    """Add to y the s < t terms r_t.(decay over s+1..t-1 * k_s) v_s inside each chunk; all (..., L, N), L = 2^n.

    Dyadic blocks: at each level every key of a block's first half reaches every query of its second half through
    the halves' boundary, so the decay factorises into (query back to the boundary) x (key forward to the boundary),
    both <= 1 (never a growth exp(+x) that could overflow), and the block is two matmuls. The cumsums start at the
    half-block in hand, so a small decay is never a difference of large sums.
    """
    for half in _levels(r.shape[-2]):
        out, q = _halves(y, half)[..., 1, :, :], _halves(r, half)[..., 1, :, :]
        key, value = _halves(k, half)[..., 0, :, :], _halves(v, half)[..., 0, :, :]
        if half == 1:  # adjacent tokens: nothing decays between a key and the next query
            out += (q * key).sum(-1, keepdim=True) * value
            continue
        lws = _halves(lw, half)
        q = q * torch.exp(_excl_cumsum(lws[..., 1, :, :]))
        key = key * torch.exp(_excl_rcumsum(lws[..., 0, :, :]))
        out += torch.matmul(torch.matmul(q, key.transpose(-1, -2)), value)


def _intra_backward(grads, r, k, v, lw, dy):
    """Accumulate into grads = (dr, dk, dv, dlw) the gradients of `_intra_forward`'s terms.

    The decay factors are exp(cumsum of lw), so their lw-gradient is a cumsum (the opposite way) of
    grad(scaled input) * scaled input: no cancellation between large terms, unlike deriving it from dr.r - dk.k.
    """
    dr, dk, dv, dlw = grads
    for half in _levels(r.shape[-2]):
        d_out, q = _halves(dy, half)[..., 1, :, :], _halves(r, half)[..., 1, :, :]
        key, value = _halves(k, half)[..., 0, :, :], _halves(v, half)[..., 0, :, :]
        grad_q, grad_key = _halves(dr, half)[..., 1, :, :], _halves(dk, half)[..., 0, :, :]
        grad_value = _halves(dv, half)[..., 0, :, :]
        if half == 1:
            score = (q * key).sum(-1, keepdim=True)
            d_score = (d_out * value).sum(-1, keepdim=True)
            grad_value += score * d_out
            grad_q += d_score * key
            grad_key += d_score * q
            continue
        lws = _halves(lw, half)
        q_decay = torch.exp(_excl_cumsum(lws[..., 1, :, :]))
        k_decay = torch.exp(_excl_rcumsum(lws[..., 0, :, :]))
        q, key = q * q_decay, key * k_decay
        scores = torch.matmul(q, key.transpose(-1, -2))
        d_scores = torch.matmul(d_out, value.transpose(-1, -2))
        grad_value += torch.matmul(scores.transpose(-1, -2), d_out)
        d_q = torch.matmul(d_scores, key)
        d_key = torch.matmul(d_scores.transpose(-1, -2), q)
        grad_q += d_q * q_decay
        grad_key += d_key * k_decay
        dlws = _halves(dlw, half)
        dlws[..., 1, :, :] += _excl_rcumsum(d_q * q)
        dlws[..., 0, :, :] += _excl_cumsum(d_key * key)


def _state_factors(lw):
    """Decays through the chunk boundaries, all <= 1: query t back to its chunk's start (exclusive of t), key s
    forward to its chunk's end (exclusive of s), and the whole chunk. lw is (..., C, L, N)."""
    return torch.exp(_excl_cumsum(lw)), torch.exp(_excl_rcumsum(lw)), torch.exp(lw.sum(-2))


def _chunk_states(state, decay, updates):
    """States at each chunk's start (stacked on dim 2) and after the last chunk: S <- decay * S + update."""
    starts = []
    for decay_c, update_c in zip(decay.unbind(2), updates.unbind(2)):
        starts.append(state)
        state = torch.addcmul(update_c, decay_c.unsqueeze(-1), state)
    return torch.stack(starts, 2), state


def _segment_forward(r, k, v, lw, u, state):
    """One segment of chunks, all (B, H, C, L, N); returns (y, state after the segment)."""
    q_decay, k_decay, decay = _state_factors(lw)
    updates = torch.matmul((k * k_decay).transpose(-1, -2), v)  # (B, H, C, N, N)
    starts, state = _chunk_states(state, decay, updates)
    y = torch.matmul(r * q_decay, starts)
    y += (r * u * k).sum(-1, keepdim=True) * v  # the u-bonus of the current token
    _intra_forward(y, r, k, v, lw)
    return y, state


def _segment_backward(r, k, v, lw, u, state, dy, d_state):
    """Gradients of `_segment_forward` from its saved inputs (chunk states recomputed): (dr, dk, dv, dlw, du,
    gradient of the segment's initial state)."""
    q_decay, k_decay, decay = _state_factors(lw)
    q_state, k_state = r * q_decay, k * k_decay
    starts, _ = _chunk_states(state, decay, torch.matmul(k_state.transpose(-1, -2), v))
    # the state gradient runs backwards through the same recurrence: dS_start = decay * dS_end + q_state^T dy
    d_ends = []
    for decay_c, g_c in zip(decay.unbind(2)[::-1], torch.matmul(q_state.transpose(-1, -2), dy).unbind(2)[::-1]):
        d_ends.append(d_state)
        d_state = torch.addcmul(g_c, decay_c.unsqueeze(-1), d_state)
    d_ends = torch.stack(d_ends[::-1], 2)
    dq_state = torch.matmul(dy, starts.transpose(-1, -2))
    dk_state = torch.matmul(v, d_ends.transpose(-1, -2))
    dv = torch.matmul(k_state, d_ends)
    dr, dk = dq_state * q_decay, dk_state * k_decay
    dlw = _excl_rcumsum(dq_state * q_state) + _excl_cumsum(dk_state * k_state)
    dlw += (decay * (d_ends * starts).sum(-1)).unsqueeze(-2)
    # the u-bonus (r_t . (u * k_t)) v_t
    d_score = (dy * v).sum(-1, keepdim=True)
    dv += (r * u * k).sum(-1, keepdim=True) * dy
    dr += d_score * u * k
    dk += d_score * u * r
    du = (d_score * r * k).sum((0, 2, 3))
    _intra_backward((dr, dk, dv, dlw), r, k, v, lw, dy)
    return dr, dk, dv, dlw, du, d_state


class _ChunkedWKV6(torch.autograd.Function):
    """The chunked form on (B, H, C, L, N) chunks with a hand-written backward.

    Autograd through the chunked ops would keep every temporary of every segment and run hundreds of small
    backward nodes; this saves only the inputs and the state at each segment start (O(T / segment) states) and
    recomputes each segment's chunk states in the backward, one segment at a time, latest first.
    Inputs: r, k, v and the log-decay lw (<= 0) in the chunk layout, u as (H, N), the initial state, and the
    segment length in chunks. Any floating dtype (float64 for gradcheck); the public function passes float32.
    """

    @staticmethod
    def forward(ctx, r, k, v, lw, u, state, segment):
        r, k, v, lw = (x.contiguous() for x in (r, k, v, lw))  # the dyadic levels are views
        u_chunks = u.view(1, u.shape[0], 1, 1, u.shape[1])
        ys, starts = [], []
        for parts in zip(*(x.split(segment, dim=2) for x in (r, k, v, lw))):
            starts.append(state)
            y, state = _segment_forward(*parts, u_chunks, state)
            ys.append(y)
        ctx.save_for_backward(r, k, v, lw, u, torch.stack(starts))
        ctx.segment = segment
        return torch.cat(ys, 2), state

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, d_state):
        r, k, v, lw, u, starts = ctx.saved_tensors
        segments = list(zip(*(x.split(ctx.segment, dim=2) for x in (r, k, v, lw, dy.contiguous()))))
        u_chunks = u.view(1, u.shape[0], 1, 1, u.shape[1])
        grads, du = [], torch.zeros_like(u)
        for (r_s, k_s, v_s, lw_s, dy_s), state in zip(segments[::-1], starts.unbind(0)[::-1]):
            *g, du_s, d_state = _segment_backward(r_s, k_s, v_s, lw_s, u_chunks, state, dy_s, d_state)
            grads.append(g)
            du += du_s
        dr, dk, dv, dlw = (torch.cat(g[::-1], 2) for g in zip(*grads))
        return dr, dk, dv, dlw, du, d_state, None


def wkv6_chunked(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel WKV6 (matmul-heavy) for prefill and training; same result as `wkv6_recurrent`.

    `chunk_size` must be a power of two; 16 with SEGMENT_LEN = 128 measured fastest on the 2-core CPU (32 and 64
    cost 10-50% more, mostly in elementwise passes). Long inputs run in segments of SEGMENT_LEN tokens carrying
    the state, which keeps the temporaries cache-sized.
    """
    _check_inputs(r, k, v, w, u, initial_state)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}.")
    B, T, H, N = r.shape
    state = _initial_state(r, initial_state)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=torch.float32), state
    # short inputs: shrink the chunk to the next power of two rather than padding up to a full chunk
    chunk = min(chunk_size, 1 << (T - 1).bit_length())
    padded = -(-T // chunk) * chunk
    # zero-padding at the end is inert: k = 0 adds nothing to the state and log-decay 0 leaves it as it is
    r, k, v, lw = (
        F.pad(x.transpose(1, 2), (0, 0, 0, padded - T)).reshape(B, H, padded // chunk, chunk, N)
        for x in (r.float(), k.float(), v.float(), _log_decay(w))
    )
    y, state = _ChunkedWKV6.apply(r, k, v, lw, u.float(), state, max(1, SEGMENT_LEN // chunk))
    return y.reshape(B, H, padded, N)[:, :, :T].transpose(1, 2), state


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV6 through the form that suits the length: the step form for one token (decode), chunked otherwise."""
    if r.dim() == 4 and r.shape[1] == 1:
        return wkv6_recurrent(r, k, v, w, u, initial_state)
    return wkv6_chunked(r, k, v, w, u, initial_state, chunk_size)
