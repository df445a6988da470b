"""CPU emulation, in torch, of the chunk algebra of the chunked CUDA WKV7 kernel (csrc/wkv7/wkv7_cuda/wkv7_chunked.cu).

It runs the kernel's algorithm step for step so its math can be debugged and tested without a GPU: the same chunk
(16 tokens) and value tile (16 channels), the same segmentation of a chunk whose decays are too fast to factor, the
same decay factoring, the same 3xTF32 tensor-core products (`mma`, shared with the WKV6 emulation), the same
forward-substitution inverse, and the same backward order with per-value-tile partial gradients summed at the end.
Where the kernel reduces in another order (the MMA's internal sums, one accumulator for several products) the
emulation uses torch's fp32 order; nothing else differs.

The algebra, per (batch, head) and pass over the steps of one segment of a chunk of L = 16 (steps outside the
segment are inert: r = w-term = k = v = a = b = 0), from the state S (key-major, N x value tile):
    G_t  = sum_{p<=t} lw_p      (cumulative log-decay from the segment start; G_{-1} = 0)   D = exp(G_{L-1})
    rows = [r_t e^{G_t} ; a_t e^{G_{t-1}}]      (2L x N: "queries", seen from the chunk start)
    cols = [b_s e^{-G_s} ; k_s e^{-G_s}]        (2L x N: "keys", scaled back to the chunk start)
    [[A_rb, A_rk], [A_ab, A_ak]] = rows @ cols^T, masked: r rows see s <= t (y reads the updated state),
                                                          a rows see s < t (sa_t reads the state before step t)
    sa  = (I - A_ab)^{-1} (a_in S + A_ak v)      (the WY/UT form: sa_t = a_t S_{t-1}, all t of the chunk at once)
    y   = r_in S + A_rk v + A_rb sa
    S'  = D * (S + cols^T [sa; v])               (b_end = b_out * D: the end factors are the start factors times D)
Each product of a row factor and a column factor is one decayed term exp(G_t - G_s) <= 1, so nothing cancels; each
factor must stay a normal fp32 number, so a chunk is split into segments whose summed log-decay stays >= -60 on
every channel (greedy, from the chunk start; one step is always a segment since the log-decay is clamped at -60).
RWKV-7's decays (>= exp(-e^-0.5) ~ 0.545 per step) sum to >= -9.8 over 16 steps: a chunk is always one segment and
the factors stay within [e^-9.8, e^9.8]; only inputs outside RWKV-7's range take several passes.

Backward of a pass, with dE the gradient of S' (per value tile) and dE' = D * dE:
    d_sa = A_rb^T dy + b_out dE'          g = (I - A_ab)^{-T} d_sa
    dv   = A_rk^T dy + k_out dE' + A_ak^T g
    dA   = [dy; g] [sa; v]^T (masked)     P = cols^T [sa; v]
    dS   = D * dE + rows^T [dy; g]                            (the gradient of the pass's start state)
    d_rows = dA cols + [dy; g] S^T        d_cols = dA^T rows + [sa; v] dE'^T
    dr = d_r_in e^{G_t}, da = d_a_in e^{G_{t-1}}, db = d_b_out e^{-G_t}, dk = d_k_out e^{-G_t}
    dG_t = d_r_in r_in - d_b_out b_out - d_k_out k_out + d_a_in[t+1] a_in[t+1]  (+ D rowsum(dE (S + P)) at t = L-1)
    d_lw_p = sum_{t>=p} dG_t  (written for the pass's steps only)
Every sum over value channels (dA, d_rows, d_cols, the D term) is partial per value tile; all later steps are linear
in them, so the kernel writes per-tile partial dr, dk, da, db, d_lw and the host adds the N / 16 tiles.
A chunk of several segments walks them backwards, recomputing each segment's start state from the chunk's.
"""

from __future__ import annotations

import math

import torch

from wkv6_chunked_emulation import mma

CHUNK = 16
VALUE_TILE = 16
LOG_DECAY_MIN = -60.0
LOG_FACTOR_MAX = 60.0  # largest |summed log-decay| within a segment: factors within [e^-60, e^60]


def to_chunks(x, dtype):
    """(B, T, H, N) -> (B, H, C, L, N) chunks in `dtype`, zero-padded at the end as the kernel's masked loads."""
    B, T, H, N = x.shape
    C = -(-T // CHUNK)
    x = torch.cat([x.to(dtype), x.new_zeros(B, C * CHUNK - T, H, N, dtype=dtype)], 1)
    return x.view(B, C, CHUNK, H, N).permute(0, 3, 1, 2, 4)


def from_chunks(x, T):
    B, H, C, L, N = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, C * L, H, N)[:, :T]


def log_decays(w, dtype):
    """The per-step log-decay -exp(w), clamped at -60."""
    return -torch.exp(w.to(dtype).clamp(max=math.log(-LOG_DECAY_MIN)))


def segments(lw):
    """Segment index of every step of chunks lw (..., L, N): greedy from the chunk start, a new segment where the
    running sum of some channel's log-decay would drop below -LOG_FACTOR_MAX (never at a segment's first step).
    Same order of fp32 additions as the kernel's."""
    L = lw.shape[-2]
    run = torch.zeros_like(lw[..., 0, :])
    seg = torch.zeros(lw.shape[:-2] + (L,), dtype=torch.long)
    start = torch.zeros(lw.shape[:-2], dtype=torch.long)
    current = torch.zeros(lw.shape[:-2], dtype=torch.long)
    for t in range(L):
        run = run + lw[..., t, :]
        split = (run.amin(-1) < -LOG_FACTOR_MAX) & (start < t)
        run = torch.where(split.unsqueeze(-1), lw[..., t, :], run)
        start = torch.where(split, t, start)
        current = current + split.long()
        seg[..., t] = current
    return seg


def unit_lower_inverse(A):
    """(I - A)^{-1} for strictly lower-triangular A (..., L, L), by forward substitution row by row, as the kernel
    (one thread per column): X[t] = e_t + sum_{s<t} A[t, s] X[s]."""
    L = A.shape[-1]
    X = torch.zeros_like(A)
    for t in range(L):
        X[..., t, :] = (A[..., t : t + 1, :t] @ X[..., :t, :]).squeeze(-2)
        X[..., t, t] = 1
    return X


def masks(L, device):
    """(2L, 2L) mask of the score blocks [[A_rb, A_rk], [A_ab, A_ak]]."""
    t, s = torch.arange(2 * L, device=device).view(-1, 1), torch.arange(2 * L, device=device).view(1, -1) % L
    return torch.where(t < L, s <= t, s < t - L)


def pass_parts(r, lw, k, a, b, active):
    """The state-independent part of one pass: inputs (..., L, N) masked to the `active` steps (..., L)."""
    m = active.unsqueeze(-1).to(r.dtype)
    r, lw, k, a, b = (x * m for x in (r, lw, k, a, b))
    L = r.shape[-2]
    G = lw.cumsum(-2)
    G_prev = torch.cat([torch.zeros_like(G[..., :1, :]), G[..., :-1, :]], -2)
    p = {"G": G, "G_prev": G_prev, "D": torch.exp(G[..., -1, :])}
    p["rows"] = torch.cat([r * torch.exp(G), a * torch.exp(G_prev)], -2)
    p["cols"] = torch.cat([b * torch.exp(-G), k * torch.exp(-G)], -2)
    scores = mma(p["rows"], p["cols"].transpose(-1, -2)) * masks(L, r.device)
    p["A_rb"], p["A_rk"] = scores[..., :L, :L], scores[..., :L, L:]
    p["A_ab"], p["A_ak"] = scores[..., L:, :L], scores[..., L:, L:]
    p["inv"] = unit_lower_inverse(p["A_ab"])
    return p


def pass_forward(p, S, v):
    """(y, sa, S') of one pass from its start state S (..., N, V) and its masked values v (..., L, V)."""
    L = v.shape[-2]
    rhs = mma(p["rows"][..., L:, :], S) + mma(p["A_ak"], v)
    sa = mma(p["inv"], rhs)
    y = (mma(p["rows"][..., :L, :], S) + mma(p["A_rk"], v)) + mma(p["A_rb"], sa)
    S_end = p["D"].unsqueeze(-1) * (S + mma(p["cols"].transpose(-1, -2), torch.cat([sa, v], -2)))
    return y, sa, S_end


def chunk_inputs(r, w, k, v, a, b, dtype):
    """Chunks of every input, the log-decays lw (0 on padding: decay 1), each step's segment and the valid mask."""
    B, T, H, N = r.shape
    lw = to_chunks(log_decays(w, dtype), dtype)
    valid = to_chunks(torch.ones(B, T, H, 1, dtype=dtype), dtype)[..., 0] > 0
    chunks = {name: to_chunks(x, dtype) for name, x in zip("rkvab", (r, k, v, a, b))}
    return chunks, lw, segments(lw), valid


def forward(r, w, k, v, a, b, initial_state=None, dtype=torch.float32, keep_states=False):
    """The kernel's forward: (y (B, T, H, N), final state (B, H, N, N)) in `dtype`, and with keep_states the state at
    every chunk start (B, H, C, N, N), as the backward's state pass writes them."""
    B, T, H, N = r.shape
    x, lw, seg, valid = chunk_inputs(r, w, k, v, a, b, dtype)
    S = torch.zeros(B, H, N, N, dtype=dtype) if initial_state is None else initial_state.to(dtype).clone()
    ys, starts = [], []
    for c in range(lw.shape[2]):
        starts.append(S)
        y = torch.zeros(B, H, CHUNK, N, dtype=dtype)
        for s in range(int(seg[:, :, c].max()) + 1):
            active = valid[:, :, c] & (seg[:, :, c] == s)
            p = pass_parts(x["r"][:, :, c], lw[:, :, c], x["k"][:, :, c], x["a"][:, :, c], x["b"][:, :, c], active)
            y_pass, _, S = pass_forward(p, S, x["v"][:, :, c] * active.unsqueeze(-1))
            y = torch.where(active.unsqueeze(-1), y_pass, y)
        ys.append(y)
    y = from_chunks(torch.stack(ys, 2), T) if ys else r.new_zeros(B, 0, H, N, dtype=dtype)
    if keep_states:
        return y, S, (torch.stack(starts, 2) if starts else S.new_zeros(B, H, 0, N, N))
    return y, S


def pass_backward(p, S, v, dy, dE):
    """Gradients of one pass (one value tile): (d_rows, d_cols, dD, dv, dS) from its start state S, values v, the
    output gradient dy and the end state's gradient dE; d_rows, d_cols and dD are partial sums over value channels."""
    L = v.shape[-2]
    D = p["D"].unsqueeze(-1)
    dEs = D * dE
    rows, cols = p["rows"], p["cols"]
    y, sa, _ = pass_forward(p, S, v)
    d_sa = mma(p["A_rb"].transpose(-1, -2), dy) + mma(cols[..., :L, :], dEs)
    g = mma(p["inv"].transpose(-1, -2), d_sa)
    dv = (mma(p["A_rk"].transpose(-1, -2), dy) + mma(cols[..., L:, :], dEs)) + mma(p["A_ak"].transpose(-1, -2), g)
    dyg, sav = torch.cat([dy, g], -2), torch.cat([sa, v], -2)
    dA = mma(dyg, sav.transpose(-1, -2)) * masks(L, v.device)
    P = mma(cols.transpose(-1, -2), sav)
    dS = D * dE + mma(rows.transpose(-1, -2), dyg)
    d_rows = mma(dA, cols) + mma(dyg, S.transpose(-1, -2))
    d_cols = mma(dA.transpose(-1, -2), rows) + mma(sav, dEs.transpose(-1, -2))
    dD = p["D"] * (dE * (S + P)).sum(-1)
    return d_rows, d_cols, dD, dv, dS


def pass_input_grads(p, d_rows, d_cols, dD, active):
    """Per-step gradients (dr, da, db, dk, d_lw) of a pass from the (partial) row / column gradients."""
    L = d_rows.shape[-2] // 2
    e_r, e_a, e_c = torch.exp(p["G"]), torch.exp(p["G_prev"]), torch.exp(-p["G"])
    dr, da = d_rows[..., :L, :] * e_r, d_rows[..., L:, :] * e_a
    db, dk = d_cols[..., :L, :] * e_c, d_cols[..., L:, :] * e_c
    de_rows, de_cols = d_rows * p["rows"], d_cols * p["cols"]
    dG = de_rows[..., :L, :] - de_cols[..., :L, :] - de_cols[..., L:, :]
    dG = dG + torch.cat([de_rows[..., L + 1 :, :], torch.zeros_like(dG[..., :1, :])], -2)
    dG[..., L - 1, :] += dD
    d_lw = dG.flip(-2).cumsum(-2).flip(-2)
    m = active.unsqueeze(-1)
    return [torch.where(m, x, torch.zeros_like(x)) for x in (dr, da, db, dk, d_lw)]


def backward(r, w, k, v, a, b, initial_state, grad_y, grad_state, dtype=torch.float32):
    """The kernel's backward: (dr, dw, dk, dv, da, db, d initial_state), each value tile's partial dr, dk, da, db and
    d_lw computed separately and summed at the end as the kernel's host code does."""
    B, T, H, N = r.shape
    tiles = N // VALUE_TILE if N % VALUE_TILE == 0 else 1
    width = N // tiles
    x, lw, seg, valid = chunk_inputs(r, w, k, v, a, b, dtype)
    dyc = to_chunks(torch.zeros(r.shape, dtype=dtype) if grad_y is None else grad_y, dtype)
    C = lw.shape[2]
    _, _, starts = forward(r, w, k, v, a, b, initial_state, dtype, keep_states=True)
    partial = {name: torch.zeros(tiles, B, H, C, CHUNK, N, dtype=dtype) for name in ("r", "a", "b", "k", "lw")}
    dv = torch.zeros(B, H, C, CHUNK, N, dtype=dtype)
    widths = [slice(j * width, (j + 1) * width) for j in range(tiles)]
    dE_tiles = [torch.zeros(B, H, N, width, dtype=dtype) if grad_state is None else grad_state.to(dtype)[..., cols]
                for cols in widths]
    for c in reversed(range(C)):
        inputs = (x["r"][:, :, c], lw[:, :, c], x["k"][:, :, c], x["a"][:, :, c], x["b"][:, :, c])
        n = int(seg[:, :, c].max()) + 1
        actives = [valid[:, :, c] & (seg[:, :, c] == s) for s in range(n)]
        parts = [pass_parts(*inputs, active) for active in actives]  # the same for every value tile
        for j, cols in enumerate(widths):
            values = [x["v"][:, :, c, :, cols] * active.unsqueeze(-1) for active in actives]
            # each segment's start state: the chunk's, carried through the segments before it (the kernel
            # recomputes them the same way, segment by segment, before each backward pass)
            seg_starts = [starts[:, :, c, :, cols]]
            for p, v_ in zip(parts[:-1], values[:-1]):
                seg_starts.append(pass_forward(p, seg_starts[-1], v_)[2])
            for s in reversed(range(n)):
                m = actives[s].unsqueeze(-1)
                d_rows, d_cols, dD, dv_pass, dE_tiles[j] = pass_backward(
                    parts[s], seg_starts[s], values[s], dyc[:, :, c, :, cols] * m, dE_tiles[j]
                )
                dv[:, :, c, :, cols] += torch.where(m, dv_pass, torch.zeros_like(dv_pass))
                grads = pass_input_grads(parts[s], d_rows, d_cols, dD, actives[s])
                for name, g in zip(("r", "a", "b", "k", "lw"), grads):
                    partial[name][j, :, :, c] += g
    grads = {name: from_chunks(g.sum(0), T) for name, g in partial.items()}
    # dw = d_lw * d lw / dw = d_lw * lw, exactly zero past the clamp (lw constant there)
    dw = (grads["lw"] * log_decays(w, dtype)).masked_fill(w.to(dtype) > math.log(-LOG_DECAY_MIN), 0)
    return grads["r"], dw, grads["k"], from_chunks(dv, T), grads["a"], grads["b"], torch.cat(dE_tiles, -1)


class ChunkedWKV7Emulation(torch.autograd.Function):
    """The emulated forward and backward as one autograd op, same contract as `ops.wkv7` (gradients in the inputs'
    dtypes; float64 inputs compute in float64 for gradcheck)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, initial_state):
        dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
        ctx.save_for_backward(r, w, k, v, a, b, initial_state)
        ctx.dtype = dtype
        return forward(r, w, k, v, a, b, initial_state, dtype)

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        *inputs, initial_state = ctx.saved_tensors
        grads = backward(*inputs, initial_state, grad_y, grad_state, ctx.dtype)
        d_inputs = [g.to(x.dtype) for g, x in zip(grads[:6], inputs)]
        return *d_inputs, (grads[6] if initial_state is not None else None)

def wkv7_chunked_emulation(r, w, k, v, a, b, initial_state=None):
    """(y, final state) of the chunked kernel's algorithm, with its backward."""
    return ChunkedWKV7Emulation.apply(r, w, k, v, a, b, initial_state)
