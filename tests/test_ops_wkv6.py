"""WKV6 forms against an independent float64 loop written from the WKV recurrence of the RWKV-6 paper (Peng et al.,
2024, "Eagle and Finch")."""

import sys

import pytest
import torch

from visualrwkv_hf.ops import wkv6, wkv6_chunked, wkv6_recurrent
from visualrwkv_hf.ops.wkv6 import LOG_DECAY_MIN, _ChunkedWKV6

wkv6_module = sys.modules["visualrwkv_hf.ops.wkv6"]  # the package re-exports the function under the same name

FP32_TOL = 2e-5  # max abs error relative to the output's max abs value; the forms reach ~5e-7


@pytest.fixture(autouse=True)
def short_segments(monkeypatch):
    """Segments of 64-256 tokens at these tests' small sizes, so the longer inputs span several of them."""
    monkeypatch.setattr(wkv6_module, "SEGMENT_ELEMENTS", 1 << 13)


def oracle(r, k, v, w, u, initial_state=None):
    """y_t = r_t.(diag(u) k_t^T v_t + S_{t-1}); S_t = diag(exp(-exp(w_t))) S_{t-1} + k_t^T v_t, in float64."""
    r, k, v, w, u = (x.double() for x in (r, k, v, w, u))
    B, T, H, N = r.shape
    S = torch.zeros(B, H, N, N, dtype=torch.float64) if initial_state is None else initial_state.double()
    ys = []
    for r_t, k_t, v_t, w_t in zip(r.unbind(1), k.unbind(1), v.unbind(1), w.unbind(1)):
        kv = k_t[..., :, None] * v_t[..., None, :]
        ys.append(torch.einsum("bhi,bhij->bhj", r_t, u[None, :, :, None] * kv + S))
        S = torch.exp(-torch.exp(w_t))[..., None] * S + kv
    return torch.stack(ys, 1), S


def make_inputs(B, T, H, N, seed=0, w_low=-6.0, w_high=3.0, with_state=True):
    """Per-channel decays (a fixed w per head channel, as in trained checkpoints) with a little time variation."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    base = w_low + (w_high - w_low) * torch.rand(H, N, generator=g)
    w = (base + 0.3 * torch.randn(B, T, H, N, generator=g)).clamp(w_low, w_high)
    u = torch.randn(H, N, generator=g)
    state = torch.randn(B, H, N, N, generator=g) if with_state else None
    return r, k, v, w, u, state


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_close(result, expected, tol=FP32_TOL):
    (y, s), (y_ref, s_ref) = result, expected
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert y.shape == y_ref.shape and s.shape == s_ref.shape
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol


SHAPES = [  # B, T, H, N, chunk_size
    (1, 1, 2, 8, 64),  # T = 1
    (2, 7, 3, 16, 64),  # T < chunk
    (2, 37, 2, 8, 16),  # odd, several chunks
    (1, 64, 2, 64, 64),  # exactly one chunk, head size 64
    (1, 130, 1, 64, 32),  # head size 64, several chunks, ragged end
    (2, 600, 2, 8, 16),  # several segments, ragged end
    (1, 300, 2, 16, 1),  # chunk of one token: state path only
]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,H,N,chunk", SHAPES)
def test_forms_match_oracle(B, T, H, N, chunk, with_state):
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=T + N, with_state=with_state)
    expected = oracle(r, k, v, w, u, s0)
    assert_close(wkv6_recurrent(r, k, v, w, u, s0), expected)
    assert_close(wkv6_chunked(r, k, v, w, u, s0, chunk_size=chunk), expected)
    assert_close(wkv6(r, k, v, w, u, s0, chunk_size=chunk), expected)


@pytest.mark.parametrize("chunk", [16, 64])
def test_extreme_decays_stay_finite_and_exact(chunk):
    # per channel: w = +100 (exp(w) overflows fp32; decay 0), w = -20 (decay 1 - 2e-9), and the realistic range
    B, T, H, N = 2, 150, 2, 16
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=3)
    w[..., 0:4] = 100.0
    w[..., 4:8] = -20.0
    w[:, 40:45, :, 8:12] = 100.0  # a full reset in the middle of otherwise slow channels
    expected = oracle(r, k, v, w, u, s0)
    assert_close(wkv6_recurrent(r, k, v, w, u, s0), expected)
    assert_close(wkv6_chunked(r, k, v, w, u, s0, chunk_size=chunk), expected)


def test_segment_length_does_not_change_the_result(monkeypatch):
    r, k, v, w, u, s0 = make_inputs(1, 700, 2, 16, seed=15)
    leaves = [x.requires_grad_() for x in (r, k, v, w, u, s0)]
    results = []
    for elements in (1 << 10, 1 << 17):  # 32-token segments, one segment
        monkeypatch.setattr(wkv6_module, "SEGMENT_ELEMENTS", elements)
        y, s = wkv6_chunked(*leaves)
        grads = torch.autograd.grad((y.sin().sum() + s.sum()), leaves)
        results.append((y, s, *grads))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-5


def test_all_decays_zero_is_finite():
    r, k, v, w, u, s0 = make_inputs(1, 70, 2, 8, seed=4)
    w = torch.full_like(w, 100.0)
    expected = oracle(r, k, v, w, u, s0)
    assert_close(wkv6_chunked(r, k, v, w, u, s0), expected)


@pytest.mark.parametrize("form", [wkv6_chunked, wkv6_recurrent, wkv6])
def test_prefix_then_continuation_equals_full_run(form):
    r, k, v, w, u, s0 = make_inputs(2, 90, 2, 16, seed=5)
    y_full, s_full = form(r, k, v, w, u, s0)
    y_a, s_a = form(r[:, :41], k[:, :41], v[:, :41], w[:, :41], u, s0)
    y_b, s_b = form(r[:, 41:], k[:, 41:], v[:, 41:], w[:, 41:], u, s_a)
    assert_close((torch.cat([y_a, y_b], 1), s_b), (y_full, s_full), tol=1e-5)


def test_decode_steps_continue_a_chunked_prefill():
    r, k, v, w, u, _ = make_inputs(1, 40, 2, 64, seed=6)
    y_full, s_full = wkv6_chunked(r, k, v, w, u)
    y_pre, state = wkv6(r[:, :35], k[:, :35], v[:, :35], w[:, :35], u)
    ys = [y_pre]
    for t in range(35, 40):
        y_t, state = wkv6(r[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], w[:, t : t + 1], u, state)
        ys.append(y_t)
    assert_close((torch.cat(ys, 1), state), (y_full, s_full), tol=1e-5)


def test_dispatcher_uses_step_form_for_one_token():
    r, k, v, w, u, s0 = make_inputs(2, 1, 2, 8, seed=7)
    y, s = wkv6(r, k, v, w, u, s0)
    y_ref, s_ref = wkv6_recurrent(r, k, v, w, u, s0)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def extreme_decays(w):
    """Per channel: w = +100 (past the clamp, decay 0), w = -20 (decay 1 - 2e-9), a reset amid slow channels."""
    w = w.clone()
    w[..., 0:2] = 100.0
    w[..., 2:4] = -20.0
    w[:, w.shape[1] // 3 : w.shape[1] // 3 + 3, :, 4:6] = 100.0
    return w


def grads_of(fn, inputs, grad_y, grad_s, dtype):
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
    y, s = fn(*leaves)
    ((y * grad_y.to(y.dtype)).sum() + (s * grad_s.to(s.dtype)).sum()).backward()
    return y, s, [None if x is None else x.grad for x in leaves]


GRAD_CASES = [  # T, chunk, decays, with_state
    (1, 16, "per_channel", True),  # T = 1
    (7, 64, "per_channel", False),  # T < chunk, no initial state
    (45, 16, "per_channel", True),  # odd, several chunks
    (45, 16, "extreme", True),
    (21, 64, "extreme", False),
    (300, 16, "per_channel", True),  # several segments, ragged end
    (300, 16, "extreme", True),
    (40, 1, "per_channel", True),  # chunk of one token: state path only
]


@pytest.mark.parametrize("T,chunk,decays,with_state", GRAD_CASES)
def test_gradients_match_float64_oracle(T, chunk, decays, with_state):
    B, H, N = 2, 2, 8
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=8 + T, with_state=with_state)
    inputs = [r, k, v, extreme_decays(w) if decays == "extreme" else w, u, s0]
    g = torch.Generator().manual_seed(9)
    grad_y = torch.randn(B, T, H, N, generator=g)
    grad_s = torch.randn(B, H, N, N, generator=g)
    *_, expected = grads_of(oracle, inputs, grad_y, grad_s, torch.float64)
    names = ["r", "k", "v", "w", "u", "initial_state"]
    for form in (lambda *a: wkv6_chunked(*a, chunk_size=chunk), wkv6_recurrent):
        *_, got = grads_of(form, inputs, grad_y, grad_s, torch.float32)
        for name, g_got, g_ref in zip(names, got, expected):
            if g_ref is None:
                continue
            assert g_got is not None and torch.isfinite(g_got).all(), name
            assert rel_err(g_got, g_ref) < 1e-4, (name, rel_err(g_got, g_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(dtype):
    # the same float32 math on the rounded inputs; the gradients come back in the inputs' dtype
    B, T, H, N = 2, 50, 2, 16
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=13)
    inputs = [x.to(dtype) for x in (r, k, v, w, u)] + [s0]
    g = torch.Generator().manual_seed(14)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    *_, expected = grads_of(oracle, inputs, grad_y, grad_s, torch.float64)
    leaves = [x.detach().requires_grad_() for x in inputs]
    y, s = wkv6_chunked(*leaves)
    ((y * grad_y).sum() + (s * grad_s).sum()).backward()
    for x, ref in zip(leaves, expected):
        assert x.grad.dtype == x.dtype
        assert rel_err(x.grad, ref) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("L,segment", [(1, 2), (2, 2), (4, 3), (8, 1), (16, 2)])
def test_chunked_function_gradcheck_float64(L, segment):
    """Finite differences in float64 against the hand-written backward: every level layout (chunk 1 to 16), segments
    with a ragged last one, log-decays from ~0 (decay ~1) to the clamp (decay e^-60)."""
    B, H, C, N = 1, 2, 5, 3
    g = torch.Generator().manual_seed(L)
    r, k, v = (torch.randn(C, B, H, L, N, generator=g, dtype=torch.float64) for _ in range(3))
    lw = -torch.exp(torch.rand(C, B, H, L, N, generator=g, dtype=torch.float64) * 8 - 6)
    lw[..., 0] = LOG_DECAY_MIN
    lw[..., 1] = -1e-9
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (r, k, v, lw, u, state)]
    assert torch.autograd.gradcheck(lambda *a: _ChunkedWKV6.apply(*a, segment), inputs)


def test_gradients_finite_past_the_decay_clamp():
    r, k, v, w, u, s0 = make_inputs(1, 33, 2, 8, seed=10)
    w[..., :3] = 100.0
    w = w.requires_grad_()
    y, s = wkv6_chunked(r, k, v, w, u, s0, chunk_size=16)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(w.grad).all()
    assert (w.grad[..., :3] == 0).all()  # past the clamp the decay is constant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", [wkv6_chunked, wkv6_recurrent])
def test_half_precision_inputs_compute_in_fp32(dtype, form):
    r, k, v, w, u, s0 = make_inputs(2, 50, 2, 16, seed=11)
    low = [x.to(dtype) for x in (r, k, v, w, u)]
    y, s = form(*low, s0)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    # same as the fp32 run on the rounded inputs: nothing is computed in the low precision
    assert_close((y, s), form(*(x.float() for x in low), s0), tol=1e-6)
    # and close to the unrounded fp32 result, within the inputs' rounding
    y32, _ = form(r, k, v, w, u, s0)
    assert rel_err(y, y32) < (5e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("form", [wkv6_chunked, wkv6_recurrent, wkv6])
def test_shape_mismatch_raises(form):
    r, k, v, w, u, s0 = make_inputs(2, 5, 2, 8, seed=12)
    with pytest.raises(ValueError, match="r, k, v, w"):
        form(r, k[:, :4], v, w, u)
    with pytest.raises(ValueError, match="r, k, v, w"):
        form(r[0], k[0], v[0], w[0], u)
    with pytest.raises(ValueError, match="u must"):
        form(r, k, v, w, u[:, :4])
    with pytest.raises(ValueError, match="initial_state"):
        form(r, k, v, w, u, s0[:1])


def test_chunk_size_must_be_power_of_two():
    r, k, v, w, u, _ = make_inputs(1, 5, 1, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        wkv6_chunked(r, k, v, w, u, chunk_size=48)


def test_empty_sequence_returns_initial_state():
    r, k, v, w, u, s0 = make_inputs(1, 0, 2, 8)
    for form in (wkv6_chunked, wkv6_recurrent):
        y, s = form(r, k, v, w, u, s0)
        assert y.shape == (1, 0, 2, 8) and torch.equal(s, s0)
