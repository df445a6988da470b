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

The chunked form is an autograd.Function (`_ChunkedWKV6`) with a hand-written backward: autograd through its many
small ops was slower than the forward itself by 3-4x and kept every temporary alive.

`wkv6_compiled` is the same op through the compiled kernels of csrc/wkv6 (CPU, and CUDA for the head sizes in
`CUDA_HEAD_SIZES`), with `wkv6` as its fallback (see `ops.kernels`); `WKV6` is the stateless layer the model calls it
through, so `kernels.kernelize` can replace it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.integrations import use_kernel_forward_from_hub

from .kernels import BINDING, CompiledOp

LOG_DECAY_MIN = -60.0
# Segment length: the power of two of tokens that gives about this many elements per (B, H, segment, N) tensor.
# Large enough that elementwise ops run on two threads (torch splits work above 32768 elements), small enough to
# stay in cache: on the 2-core CPU 2^17 beat 2^15 by 20-25% on two threads and matched it on one.
SEGMENT_ELEMENTS = 1 << 17


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


def _levels(L: int) -> list[int]:
    """Half-lengths of the dyadic levels of a chunk of L = 2^n tokens that need decay factors: 2, 4, .., L/2 (at
    half-length 1 a key is the token right before its query: nothing decays in between)."""
    return [1 << i for i in range(1, L.bit_length() - 1)]


@functools.lru_cache(maxsize=None)
def _decay_exponents(L: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0/1 matrix (R, L): its product with a chunk's log-decays (L, N) gives every exponent the chunk needs.

    Rows, L per group: one group per dyadic level of half-length h = 2, 4, .., L/2 (position t in the second half
    of its 2h-block: the sum over the half before t, as a query; in the first half: the sum over the half after t,
    as a key), then the query and key groups of the state path (before t from the chunk start; after t to the
    chunk end), then one row summing the whole chunk. Every exponent is a sum of clamped (finite) log-decays <= 0
    over a span that starts at its own boundary: no exp of a positive sum, no difference of large sums, and an
    empty span is exactly 0 (factor exactly 1).
    """
    t, p = torch.arange(L).unsqueeze(1), torch.arange(L).unsqueeze(0)
    groups = []
    for half in _levels(L):
        start = t // half * half
        before = (p >= start) & (p < t)
        after = (p > t) & (p < start + half)
        groups.append(torch.where(t // half % 2 == 1, before, after))
    groups += [p < t, p > t, torch.ones(1, L, dtype=torch.bool)]
    return torch.cat(groups).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _level_masks(L: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0/1 masks (levels, L, L): mask[i][t, s] = 1 where key s reaches query t through the boundary of the level
    of half-length h = `_levels(L)[i]`: same 2h-block, s in its first half, t in its second."""
    t, s, h = torch.arange(L).view(1, L, 1), torch.arange(L).view(1, 1, L), torch.tensor(_levels(L)).view(-1, 1, 1)
    masks = (t // (2 * h) == s // (2 * h)) & (t // h % 2 == 1) & (s // h % 2 == 0)
    return masks.to(dtype=dtype, device=device)


def _factors(lw: torch.Tensor):
    """exp of `_decay_exponents` for chunks lw (..., L, N), all <= 1: (level factors (..., levels, L, N), state-path
    query factors (..., L, N), state-path key factors (..., L, N), whole-chunk decay (..., N))."""
    *lead, L, N = lw.shape
    factors = torch.exp(torch.matmul(_decay_exponents(L, lw.dtype, lw.device), lw))
    levels = len(_levels(L))
    return (
        factors[..., : levels * L, :].view(*lead, levels, L, N),
        factors[..., levels * L : (levels + 1) * L, :],
        factors[..., (levels + 1) * L : (levels + 2) * L, :],
        factors[..., -1, :],
    )


@functools.lru_cache(maxsize=None)
def _level_queries(L: int, device: torch.device) -> torch.Tensor:
    """(levels, L, 1): True where position t is a query at the level of half-length h (the second half of its
    2h-block), False where it is a key."""
    t, h = torch.arange(L).view(1, L, 1), torch.tensor(_levels(L)).view(-1, 1, 1)
    return (t // h % 2 == 1).to(device)


def _intra_scores(r, k, u, level_factors):
    """Score matrix of each chunk (..., L, L): A[t, s] = r_t.(decay over s+1..t-1 * k_s) for s < t, and the
    u-bonus r_t.(u * k_t) on the diagonal, so y = A v + (state path). Also returns the scaled queries and keys z.

    Dyadic levels: at each level every key of a block's first half reaches every query of its second half through
    the halves' boundary, so the decay factorises into (query back to the boundary) x (key forward to the boundary),
    both <= 1 (never a growth exp(+x) that could overflow). At each level a position is either a query or a key,
    so one tensor z holds both (r_t * factor at queries, k_t * factor at keys). All levels go through one batched
    matmul of full (L, L) products z z^T, masked to each level's (query, key) pairs: wasteful in flops, but a few
    large ops beat many tiny ones. The first level (a key right before its query, no decay) and the bonus are two
    diagonals.
    """
    z = torch.where(_level_queries(r.shape[-2], r.device), r.unsqueeze(-3), k.unsqueeze(-3)).mul_(level_factors)
    masks = _level_masks(r.shape[-2], r.dtype, r.device)
    scores = (torch.matmul(z, z.transpose(-1, -2)) * masks).sum(-3)
    scores.diagonal(dim1=-2, dim2=-1).copy_((r * u * k).sum(-1))
    _adjacent(scores).copy_((r[..., 1::2, :] * k[..., :-1:2, :]).sum(-1))
    return scores, z


def _adjacent(scores):
    """The entries (t, t - 1) of the score matrices for odd t: key and query in one 2-token block."""
    return scores.diagonal(offset=-1, dim1=-2, dim2=-1)[..., ::2]


def _run_states(states, decay, reverse=False):
    """The chunk recurrence over dim 0 of `states` (C + 1, ...), in place: forwards, states[0] is the state before
    the first chunk and states[c + 1] holds chunk c's update on entry, its state after that chunk on return
    (S_c+1 = decay_c * S_c + update_c); `reverse` runs the same recurrence from states[C] back to states[0]."""
    steps = range(decay.shape[0])
    for c in reversed(steps) if reverse else steps:
        target, source = (c, c + 1) if reverse else (c + 1, c)
        states[target].addcmul_(decay[c].unsqueeze(-1), states[source])
    return states


def _flat(x):
    """A contiguous (C, B, H, rows, cols) tensor as the (C * B * H, rows, cols) batch of `bmm`."""
    return x.view(-1, *x.shape[-2:])


def _chunk_states(state, decay, k_state, v):
    """The states at every chunk boundary, (C + 1, B, H, N, N), from `state` before the first chunk: chunk c starts
    from [c] and ends at [c + 1] (contiguous views, so nothing is concatenated)."""
    states = state.new_empty(k_state.shape[0] + 1, *state.shape)
    states[0] = state
    torch.bmm(_flat(k_state).transpose(1, 2), _flat(v), out=_flat(states[1:]))
    return _run_states(states, decay)


def _segment_forward(r, k, v, lw, u, state, y):
    """One segment of chunks, all (C, B, H, L, N): writes the output into `y` and returns the state after it."""
    level_factors, q_decay, k_decay, decay = _factors(lw)
    states = _chunk_states(state, decay, k * k_decay, v)
    scores, _ = _intra_scores(r, k, u, level_factors)
    torch.bmm(_flat(r * q_decay), _flat(states[:-1]), out=_flat(y))
    _flat(y).baddbmm_(_flat(scores), _flat(v))
    return states[-1]


def _segment_backward(r, k, v, lw, u, state, dy, d_state, grads):
    """Gradients of `_segment_forward` from its saved inputs (chunk states recomputed): writes dr, dk, dv and dlw
    into `grads` and returns (du, gradient of the segment's initial state).

    Each decay factor is exp(e) with e a sum of log-decays (`_decay_exponents`); for a factor scaling x, the
    gradient of e is grad(x * exp(e)) * x * exp(e), and the exponents' matrix transposed sums those onto lw: no
    cancellation between large terms, unlike deriving the decay gradient from dr.r - dk.k.
    """
    dr, dk, dv, dlw = grads
    level_factors, q_decay, k_decay, decay = _factors(lw)
    q_state, k_state = r * q_decay, k * k_decay
    states = _chunk_states(state, decay, k_state, v)
    # the state gradient runs backwards through the same recurrence: dS_start = decay * dS_end + q_state^T dy
    d_states = torch.empty_like(states)
    d_states[-1] = d_state
    torch.bmm(_flat(q_state).transpose(1, 2), _flat(dy), out=_flat(d_states[:-1]))
    _run_states(d_states, decay, reverse=True)
    d_ends = d_states[1:]
    dq_state = torch.matmul(dy, states[:-1].transpose(-1, -2))
    dk_state = torch.matmul(v, d_ends.transpose(-1, -2))
    # within the chunks: y = scores v
    scores, z = _intra_scores(r, k, u, level_factors)
    d_scores = torch.matmul(dy, v.transpose(-1, -2))
    torch.bmm(_flat(k_state), _flat(d_ends), out=_flat(dv))
    _flat(dv).baddbmm_(_flat(scores).transpose(1, 2), _flat(dy))
    # scores = sum over levels of masked z z^T: a query row and a key column meet only in (query, key) entries,
    # so the symmetrised masked gradient gives both z gradients in one product
    d_levels = d_scores.unsqueeze(-3) * _level_masks(lw.shape[-2], lw.dtype, lw.device)
    d_z = torch.matmul(d_levels + d_levels.transpose(-1, -2), z)
    d_scaled = d_z * level_factors
    # each level's share goes to r where the position is that level's query, to k where it is its key
    d_queries = (d_scaled * _level_queries(lw.shape[-2], lw.device)).sum(-3)
    d_bonus = d_scores.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    torch.addcmul(dq_state * q_decay, d_bonus * u, k, out=dr)
    dr += d_queries
    torch.addcmul(dk_state * k_decay, d_bonus * u, r, out=dk)
    dk += d_scaled.sum(-3)
    dk -= d_queries
    du = (d_bonus * r * k).sum((0, 1, 3))
    d_adjacent = _adjacent(d_scores).unsqueeze(-1)
    dr[..., 1::2, :].addcmul_(d_adjacent, k[..., :-1:2, :])
    dk[..., :-1:2, :].addcmul_(d_adjacent, r[..., 1::2, :])
    # exponent gradients, in `_decay_exponents`' row order (one row per level serves queries and keys, as z does)
    *lead, L, N = lw.shape
    exponents = _decay_exponents(L, lw.dtype, lw.device)
    d_exponents = lw.new_empty(*lead, exponents.shape[0], N)
    levels = d_levels.shape[-3]
    torch.mul(d_z, z, out=d_exponents[..., : levels * L, :].view(*lead, levels, L, N))
    torch.mul(dq_state, q_state, out=d_exponents[..., levels * L : (levels + 1) * L, :])
    torch.mul(dk_state, k_state, out=d_exponents[..., (levels + 1) * L : (levels + 2) * L, :])
    torch.mul(decay, (d_ends * states[:-1]).sum(-1), out=d_exponents[..., -1, :])
    torch.matmul(exponents.transpose(0, 1), d_exponents, out=dlw)
    return du, d_states[0]


class _ChunkedWKV6(torch.autograd.Function):
    """The chunked form on (C, B, H, L, N) chunks (chunk-major, so a segment of chunks is one contiguous block)
    with a hand-written backward.

    Autograd through the chunked ops would keep every temporary of every segment and run hundreds of small
    backward nodes; this saves only the inputs and the state at each segment start (O(T / segment) states) and
    recomputes each segment's chunk states in the backward, one segment at a time, latest first. Outputs and
    gradients are written segment by segment into tensors allocated once.
    Inputs: r, k, v and the log-decay lw (<= 0) in the chunk layout, u as (H, N), the initial state, and the
    segment length in chunks. Any floating dtype (float64 for gradcheck); the public function passes float32.
    """

    @staticmethod
    def forward(ctx, r, k, v, lw, u, state, segment):
        r, k, v, lw = (x.contiguous() for x in (r, k, v, lw))
        u_chunks = u.view(u.shape[0], 1, u.shape[1])
        y, starts = torch.empty_like(v), []
        for parts in zip(*(x.split(segment) for x in (r, k, v, lw, y))):
            starts.append(state)
            state = _segment_forward(*parts[:4], u_chunks, state, parts[4])
        ctx.save_for_backward(r, k, v, lw, u, torch.stack(starts))
        ctx.segment = segment
        return y, state

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, d_state):
        r, k, v, lw, u, starts = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (r, k, v, lw)]
        segments = list(zip(*(x.split(ctx.segment) for x in (r, k, v, lw, dy.contiguous(), *grads))))
        u_chunks = u.view(u.shape[0], 1, u.shape[1])
        du = torch.zeros_like(u)
        for (r_s, k_s, v_s, lw_s, dy_s, *grads_s), state in zip(segments[::-1], starts.unbind(0)[::-1]):
            du_s, d_state = _segment_backward(r_s, k_s, v_s, lw_s, u_chunks, state, dy_s, d_state, grads_s)
            du += du_s
        return *grads, du, d_state, None


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

    `chunk_size` must be a power of two; 16 measured fastest on the 2-core CPU (8 and 32 cost 5-15% more in
    forward + backward). Long inputs run in segments (see SEGMENT_ELEMENTS) carrying the state, which keeps the
    temporaries cache-sized and lets the backward keep only one state per segment.
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
    # (B, T, H, N) -> chunk-major (C, B, H, L, N): one copy each (two when T is padded to whole chunks)
    r, k, v, lw = (
        F.pad(x, (0, 0, 0, 0, 0, padded - T)).view(B, padded // chunk, chunk, H, N).permute(1, 0, 3, 2, 4).contiguous()
        for x in (r.float(), k.float(), v.float(), _log_decay(w))
    )
    segment = 1 << max(0, (SEGMENT_ELEMENTS // (B * H * N)).bit_length() - 1)  # tokens
    y, state = _ChunkedWKV6.apply(r, k, v, lw, u.float(), state, max(1, segment // chunk))
    return y.permute(1, 0, 3, 2, 4).reshape(B, padded, H, N)[:, :T], state


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


# head sizes the CUDA kernel is instantiated for (its per-thread state row lives in registers); others use torch
CUDA_HEAD_SIZES = (16, 24, 32, 64, 128)

wkv6_compiled = CompiledOp(
    "wkv6",
    sources={"cpu": ["wkv6/wkv6_cpu/wkv6_cpu.cpp", f"wkv6/{BINDING}"],
             "cuda": ["wkv6/wkv6_cuda/wkv6_cuda.cu", f"wkv6/{BINDING}"]},
    headers=["wkv6/wkv6_checks.h", "wkv6/wkv6_cpu/wkv6_cpu.h", "wkv6/wkv6_cuda/wkv6_cuda.h"],
    fallback=wkv6,
    check_inputs=_check_inputs,
    layer_name="WKV6",
    cuda_head_sizes=CUDA_HEAD_SIZES,
)


@use_kernel_forward_from_hub("WKV6")
class WKV6(nn.Module):
    """The WKV6 recurrence as a stateless layer, so `kernels.kernelize` can swap its forward per device and mode."""

    def forward(
        self,
        r: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        w: torch.Tensor,
        u: torch.Tensor,
        initial_state: torch.Tensor | None = None,
        chunk_size: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv6_compiled(r, k, v, w, u, initial_state, chunk_size=chunk_size)
