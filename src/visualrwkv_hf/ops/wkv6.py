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


def _add_within_chunk(y, r, k, v, lw):
    """Add to y the s < t terms r_t.(decay over s+1..t-1 * k_s) v_s inside each chunk; all (..., L, N), L = 2^n.

    Dyadic blocks: at each level every key of a block's first half reaches every query of its second half through
    the halves' boundary, so the decay factorises into (query back to the boundary) x (key forward to the boundary),
    both <= 1 (never a growth exp(+x) that could overflow), and the block is two matmuls. Cumsums start at the
    half-block in hand, so a small decay is never a difference of large sums.
    """
    *lead, L, N = r.shape
    half = 1
    while half < L:
        halves = (*lead, L // (2 * half), 2, half, N)
        queries = r.reshape(halves)[..., 1, :, :]
        keys = k.reshape(halves)[..., 0, :, :]
        values = v.reshape(halves)[..., 0, :, :]
        if half == 1:
            # adjacent tokens: nothing decays between a key and the next query
            y_cross = (queries * keys).sum(-1, keepdim=True) * values
        else:
            incl = lw.reshape(halves).cumsum(-2)
            # exact shift for the exclusive prefix: the first query's factor must be exactly 1
            queries = queries * torch.exp(F.pad(incl[..., 1, :-1, :], (0, 0, 1, 0)))
            keys = keys * torch.exp(incl[..., 0, -1:, :] - incl[..., 0, :, :])
            y_cross = torch.matmul(torch.matmul(queries, keys.transpose(-1, -2)), values)
        y = y + F.pad(y_cross.unsqueeze(-3), (0, 0, 0, 0, 1, 0)).reshape(*lead, L, N)
        half *= 2
    return y


def _chunked_segment(r, k, v, lw, u, state, chunk: int):
    """One segment in (B, H, T, N) float32 layout, T a multiple of `chunk`; returns (y, state after the segment)."""
    B, H, T, N = r.shape
    n_chunks = T // chunk
    r, k, v, lw = (x.reshape(B, H, n_chunks, chunk, N) for x in (r, k, v, lw))
    bonus = (r * u.view(1, H, 1, 1, N) * k).sum(-1, keepdim=True) * v
    y = _add_within_chunk(bonus, r, k, v, lw)

    # Across chunks through the carried state: every factor is a decay (<= 1) to or from a chunk boundary; the
    # key side uses suffix sums, not total - prefix, so a small remaining decay is not a difference of large sums
    prefix = lw.cumsum(-2)
    suffix = lw.flip(-2).cumsum(-2).flip(-2)
    q_state = r * torch.exp(F.pad(prefix[..., :-1, :], (0, 0, 1, 0)))  # exact shift, as in _add_within_chunk
    k_state = k * torch.exp(suffix - lw)
    chunk_decay = torch.exp(prefix[..., -1, :])  # (B, H, C, N)
    updates = torch.matmul(k_state.transpose(-1, -2), v)  # (B, H, C, N, N)
    states = []
    for decay_c, update_c in zip(chunk_decay.unbind(2), updates.unbind(2)):
        states.append(state)
        state = decay_c.unsqueeze(-1) * state + update_c
    y = y + torch.matmul(q_state, torch.stack(states, dim=2))
    return y.reshape(B, H, T, N), state


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
        F.pad(x.transpose(1, 2), (0, 0, 0, padded - T)) for x in (r.float(), k.float(), v.float(), _log_decay(w))
    )
    segment = max(chunk, SEGMENT_LEN // chunk * chunk)
    uf = u.float()
    ys = []
    # split (not slicing in a loop) so autograd joins the segment gradients with one cat
    for parts in zip(*(x.split(segment, dim=2) for x in (r, k, v, lw))):
        y_seg, state = _chunked_segment(*parts, uf, state, chunk)
        ys.append(y_seg)
    y = torch.cat(ys, dim=2)[:, :, :T]
    return y.transpose(1, 2), state


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
