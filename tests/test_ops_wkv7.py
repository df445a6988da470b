"""WKV7 forms against the float64 step reference `wkv7_reference`, and the reference itself against two independent
oracles: a value-major loop written from BlinkDL's statement of the recurrence, and BlinkDL's `rwkv` package.

The package has no stand-alone WKV7 function on the CPU: its recurrence sits inline in the per-layer function
`RWKV_x070_TMix_seq` (with RWKV_CUDA_ON unset, a per-step loop). The package test runs that layer function and
reproduces the layer's projections around the op (token shift, decay, kk, a, the GroupNorm and r_k bonus, as read in
its source) to compare the final state and the layer output.

The compiled kernels (csrc/wkv7, through `wkv7_compiled`) are held to the same reference: the CPU kernel here, the
CUDA kernel wherever there is a GPU (those tests skip otherwise); the CUDA source is compile-checked wherever nvcc is
on the PATH, GPU or not.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from visualrwkv_hf.ops import WKV7, set_wkv_backend, wkv7, wkv7_chunked, wkv7_compiled, wkv7_recurrent, wkv7_reference
from visualrwkv_hf.ops.kernels import BACKEND_ENV, CSRC, KernelFunction
from visualrwkv_hf.ops.wkv7 import LOG_FACTOR_MAX, _chunk_size_for, _ChunkedWKV7

from cuda_compile import NVCC, compile_torch_source, undefined_launchers

# WKV6's checks (max abs error relative to the output's max abs value) hold for every WKV7 form too
from test_ops_wkv6 import assert_close, rel_err

GRAD_TOL = 1e-4
NAMES = ["r", "w", "k", "v", "a", "b", "initial_state"]
FASTEST_W = -0.5  # RWKV-7's w = -softplus(-x) - 0.5 <= -0.5: decay >= exp(-e^-0.5) ~ 0.545 per step


def make_inputs(B, T, H, N, seed=0, decays="rwkv7", with_state=True):
    """Inputs as an RWKV-7 layer makes them: a = -kk, b = kk * iclr (kk unit-norm per head, iclr in [0, 1]),
    w = -softplus(-x) - 0.5 with a fixed x per head channel (as in trained checkpoints) plus time variation.

    decays "rwkv7": the whole RWKV-7 range; "extreme": RWKV-7's limits per channel (fastest decay exp(-e^-0.5) at
    every step, slowest 1 - 1e-9), iclr 0 and 1; "general": w from -6 to 3 as in RWKV-6 (decays far below RWKV-7's
    range) with w = +100 channels and a full reset amid slow channels."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    if decays == "general":
        base = -6 + 9 * torch.rand(H, N, generator=g)
        w = (base + 0.3 * torch.randn(B, T, H, N, generator=g)).clamp(-6, 3)
        w[..., 0:2] = 100.0
        w[:, T // 3 : T // 3 + 3, :, 2:4] = 100.0
        w[..., 4:6] = -6.0
    else:
        x = -8 + 14 * torch.rand(H, N, generator=g) + torch.randn(B, T, H, N, generator=g)
        w = -F.softplus(-x) - 0.5
        if decays == "extreme":
            w[..., 0:2] = FASTEST_W
            w[..., 2:4] = -21.0  # decay 1 - 7.6e-10
            iclr[..., 0::3] = 1.0
            iclr[..., 1::3] = 0.0
    state = torch.randn(B, H, N, N, generator=g) if with_state else None
    return r, w, k, v, -kk, kk * iclr, state


def value_major_loop(r, w, k, v, a, b, initial_state=None):
    """BlinkDL's statement, per head, with M the value-major state (rows = values) and column vectors:
    M_t = M_{t-1} (diag(exp(-exp(w_t))) + a_t b_t^T) + v_t k_t^T, y_t = M_t r_t. Returns the key-major state."""
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    B, T, H, N = r.shape
    M = torch.zeros(B, H, N, N, dtype=torch.float64)
    if initial_state is not None:
        M = initial_state.double().transpose(-1, -2)
    ys = []
    for t in range(T):
        col = lambda x: x[:, t].unsqueeze(-1)  # noqa: E731 - (B, H, N, 1)
        transition = torch.diag_embed(torch.exp(-torch.exp(w[:, t]))) + col(a) @ col(b).transpose(-1, -2)
        M = M @ transition + col(v) @ col(k).transpose(-1, -2)
        ys.append((M @ col(r)).squeeze(-1))
    return torch.stack(ys, 1), M.transpose(-1, -2)


@pytest.mark.parametrize("decays", ["rwkv7", "extreme", "general"])
def test_reference_is_the_value_major_recurrence(decays):
    inputs = make_inputs(2, 23, 2, 8, seed=1, decays=decays)
    y, s = wkv7_reference(*inputs)
    y_ref, s_ref = value_major_loop(*inputs)
    assert y.dtype == s.dtype == torch.float64
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def load_rwkv_x070():
    """BlinkDL's rwkv.model executed afresh with RWKV_V7_ON=1, outside sys.modules: the switch is read at import, and
    the test session may already hold rwkv.model imported for RWKV-6. The global torch flags its import sets are put
    back."""
    spec = importlib.util.find_spec("rwkv.model")
    module = importlib.util.module_from_spec(spec)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    autocast = torch._C._jit_set_autocast_mode(True)  # returns the previous setting
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RWKV_V7_ON", "1")
            patch.setenv("RWKV_CUDA_ON", "0")
            spec.loader.exec_module(module)
    finally:
        torch._C._jit_set_autocast_mode(autocast)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    return module


@pytest.mark.filterwarnings("ignore:`torch.jit.script")  # the package scripts its functions
def test_reference_matches_rwkv_package_x070_layer():
    rwkv_model = load_rwkv_x070()
    T, H, N, D = 19, 2, 16, 8
    C = H * N
    g = torch.Generator().manual_seed(2)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    x, x_prev, state = rand(T, C), rand(C), rand(H, N, N, scale=0.5)  # state value-major, as the package keeps it
    mixes = [torch.rand(C, generator=g) for _ in range(6)]  # x_r, x_w, x_k, x_v, x_a, x_g
    w0, w1, w2 = rand(C, scale=2.0), rand(C, D, scale=0.5), rand(D, C, scale=0.5)
    a0, a1, a2 = rand(C), rand(C, D, scale=0.5), rand(D, C, scale=0.5)
    v0, v1, v2 = rand(C), rand(C, D), rand(D, C)  # value residual: unused in layer 0
    g1, g2 = rand(C, D, scale=0.5), rand(D, C, scale=0.5)
    k_k, k_a, r_k = rand(C), rand(C), rand(H, N)
    R, K, V, O = (rand(C, C, scale=C**-0.5) for _ in range(4))  # applied as x @ W
    ln_w, ln_b = 1 + rand(C, scale=0.1), rand(C, scale=0.1)
    out, _, state_out, _ = rwkv_model.RWKV_x070_TMix_seq(
        0, H, N, x, x_prev, torch.zeros(C), state.clone(), *mixes, w0, w1, w2, a0, a1, a2, v0, v1, v2, g1, g2,
        k_k, k_a, r_k.flatten(), R, K, V, O, ln_w, ln_b,
    )
    # the same layer around our op: the package hands its CUDA op w = -softplus(-x) - 0.5 (its CPU loop uses the
    # equal decay exp(-e^-0.5 sigmoid(x))), a = -kk, b = kk * a
    shifted = torch.cat([x_prev.unsqueeze(0), x[:-1]]) - x
    xr, xw, xk, xv, xa, xg = (x + shifted * mix for mix in mixes)
    r, k, v = xr @ R, xk @ K, xv @ V
    w = -F.softplus(-(w0 + torch.tanh(xw @ w1) @ w2)) - 0.5
    a = torch.sigmoid(a0 + (xa @ a1) @ a2)
    gate = torch.sigmoid(xg @ g1) @ g2
    kk = F.normalize((k * k_k).view(T, H, N), dim=-1).view(T, C)
    k = k * (1 + (a - 1) * k_a)
    heads = lambda t: t.view(1, T, H, N)  # noqa: E731
    y, s = wkv7_reference(heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a), state.mT.unsqueeze(0))
    y = F.group_norm(y.float().view(T, C), H, ln_w, ln_b, eps=64e-5)
    y = y + ((r * k).view(T, H, N) * r_k).sum(-1, keepdim=True).mul(v.view(T, H, N)).view(T, C)
    assert rel_err(s[0].mT, state_out) < 1e-5
    assert rel_err((y * gate) @ O, out) < 1e-5


SHAPES = [  # B, T, H, N, chunk_size
    (1, 1, 2, 8, 32),  # T = 1
    (2, 7, 3, 16, 32),  # T < chunk
    (2, 37, 2, 8, 16),  # odd, several chunks
    (1, 64, 2, 64, 64),  # exactly one chunk, head size 64
    (1, 130, 1, 64, 32),  # head size 64, several chunks, ragged end
    (2, 600, 2, 8, 32),  # long, ragged end
    (1, 300, 2, 16, 1),  # chunk of one step: the chunk maps only
]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,H,N,chunk", SHAPES)
def test_forms_match_reference(B, T, H, N, chunk, with_state):
    inputs = make_inputs(B, T, H, N, seed=T + N, with_state=with_state)
    expected = wkv7_reference(*inputs)
    assert_close(wkv7_recurrent(*inputs), expected)
    assert_close(wkv7_chunked(*inputs, chunk_size=chunk), expected)
    assert_close(wkv7(*inputs, chunk_size=chunk), expected)


@pytest.mark.parametrize("chunk", [16, 64, 128])
def test_rwkv7_decay_and_iclr_extremes(chunk):
    inputs = make_inputs(2, 300, 2, 16, seed=3, decays="extreme")
    expected = wkv7_reference(*inputs)
    assert_close(wkv7_recurrent(*inputs), expected)
    assert_close(wkv7_chunked(*inputs, chunk_size=chunk), expected)


def test_decays_beyond_rwkv7_shrink_the_chunk_and_stay_exact():
    inputs = make_inputs(2, 150, 2, 16, seed=4, decays="general")
    expected = wkv7_reference(*inputs)
    assert_close(wkv7_recurrent(*inputs), expected)
    assert_close(wkv7_chunked(*inputs, chunk_size=64), expected)


def test_repeated_key_with_full_erasure():
    """The delta rule at its sharpest: one unit key kk at every step, iclr = 1 and decays ~1, so each step removes the
    state's kk component before writing (every entry of A_ab below the diagonal is ~1 in size)."""
    B, T, H, N = 1, 100, 2, 16
    r, w, k, v, _, _, s0 = make_inputs(B, T, H, N, seed=15)
    kk = F.normalize(torch.randn(B, 1, H, N, generator=torch.Generator().manual_seed(16)), dim=-1).expand(B, T, H, N)
    inputs = [r, torch.full_like(w, -21.0), k, v, -kk, kk, s0]
    expected = wkv7_reference(*inputs)
    assert_close(wkv7_recurrent(*inputs), expected)
    assert_close(wkv7_chunked(*inputs, chunk_size=64), expected)
    g = torch.Generator().manual_seed(17)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    got = grads_of(lambda *x: wkv7_chunked(*x, chunk_size=64), inputs, grad_y, grad_s, torch.float32)
    for name, g_got, g_ref in zip(NAMES, got, grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)):
        assert rel_err(g_got, g_ref) < GRAD_TOL, (name, rel_err(g_got, g_ref))


def test_chunk_size_for_decay_range():
    fastest_rwkv7 = -torch.exp(torch.tensor(FASTEST_W)).item()  # per-step log-decay -e^-0.5
    assert _chunk_size_for(fastest_rwkv7, 64, 2048) == 64  # 64 * 0.61 = 39 <= LOG_FACTOR_MAX
    assert _chunk_size_for(fastest_rwkv7, 128, 2048) == 64
    assert _chunk_size_for(-torch.exp(torch.tensor(3.0)).item(), 64, 2048) == 2  # w = 3: -20 per step
    assert _chunk_size_for(-LOG_FACTOR_MAX, 64, 2048) == 1  # at the clamp
    assert _chunk_size_for(-0.1, 64, 5) == 8  # short input: next power of two


@pytest.mark.parametrize("form", [wkv7_chunked, wkv7_recurrent, wkv7])
@pytest.mark.parametrize("split", [41, 32])  # odd, and on a chunk boundary
def test_prefix_then_continuation_equals_full_run(form, split):
    r, w, k, v, a, b, s0 = make_inputs(2, 90, 2, 16, seed=5)
    y_full, s_full = form(r, w, k, v, a, b, s0)
    first = [x[:, :split] for x in (r, w, k, v, a, b)]
    rest = [x[:, split:] for x in (r, w, k, v, a, b)]
    y_a, s_a = form(*first, s0)
    y_b, s_b = form(*rest, s_a)
    assert_close((torch.cat([y_a, y_b], 1), s_b), (y_full, s_full), tol=1e-5)


def test_decode_steps_continue_a_chunked_prefill():
    inputs = make_inputs(1, 40, 2, 64, seed=6, with_state=False)[:6]
    y_full, s_full = wkv7_chunked(*inputs)
    y_pre, state = wkv7(*(x[:, :35] for x in inputs))
    ys = [y_pre]
    for t in range(35, 40):
        y_t, state = wkv7(*(x[:, t : t + 1] for x in inputs), state)
        ys.append(y_t)
    assert_close((torch.cat(ys, 1), state), (y_full, s_full), tol=1e-5)


def test_dispatcher_uses_step_form_for_one_token():
    inputs = make_inputs(2, 1, 2, 8, seed=7)
    y, s = wkv7(*inputs)
    y_ref, s_ref = wkv7_recurrent(*inputs)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def grads_of(fn, inputs, grad_y, grad_s, dtype):
    leaves = [None if x is None else x.detach().to(dtype).requires_grad_() for x in inputs]
    y, s = fn(*leaves)
    ((y * grad_y.to(y.dtype)).sum() + (s * grad_s.to(s.dtype)).sum()).backward()
    return [None if x is None else x.grad for x in leaves]


GRAD_CASES = [  # T, chunk, decays, with_state
    (1, 32, "rwkv7", True),  # T = 1
    (7, 32, "rwkv7", False),  # T < chunk, no initial state
    (45, 16, "rwkv7", True),  # odd, several chunks
    (45, 16, "extreme", True),
    (21, 64, "extreme", False),
    (300, 32, "rwkv7", True),  # long, ragged end
    (300, 64, "extreme", True),
    (60, 64, "general", True),  # chunks shrunk to 1-2 steps
    (40, 1, "rwkv7", True),  # chunk of one step
]


@pytest.mark.parametrize("T,chunk,decays,with_state", GRAD_CASES)
def test_gradients_match_float64_reference(T, chunk, decays, with_state):
    B, H, N = 2, 2, 8
    inputs = make_inputs(B, T, H, N, seed=8 + T, decays=decays, with_state=with_state)
    g = torch.Generator().manual_seed(9)
    grad_y = torch.randn(B, T, H, N, generator=g)
    grad_s = torch.randn(B, H, N, N, generator=g)
    expected = grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)
    for form in (lambda *x: wkv7_chunked(*x, chunk_size=chunk), wkv7_recurrent):
        got = grads_of(form, inputs, grad_y, grad_s, torch.float32)
        for name, g_got, g_ref in zip(NAMES, got, expected):
            if g_ref is None:
                continue
            assert g_got is not None and torch.isfinite(g_got).all(), name
            assert rel_err(g_got, g_ref) < GRAD_TOL, (name, rel_err(g_got, g_ref))


def test_gradients_finite_past_the_decay_clamp():
    r, w, k, v, a, b, s0 = make_inputs(1, 33, 2, 8, seed=10)
    w[..., :3] = 100.0
    w = w.requires_grad_()
    y, s = wkv7_chunked(r, w, k, v, a, b, s0)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(w.grad).all()
    assert (w.grad[..., :3] == 0).all()  # past the clamp the decay is constant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(dtype):
    # the same float32 math on the rounded inputs; the gradients come back in the inputs' dtype
    B, T, H, N = 2, 50, 2, 16
    *inputs, s0 = make_inputs(B, T, H, N, seed=13)
    inputs = [x.to(dtype) for x in inputs] + [s0]
    g = torch.Generator().manual_seed(14)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    expected = grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)
    leaves = [x.detach().requires_grad_() for x in inputs]
    y, s = wkv7_chunked(*leaves)
    ((y * grad_y).sum() + (s * grad_s).sum()).backward()
    for x, ref in zip(leaves, expected):
        assert x.grad.dtype == x.dtype
        assert rel_err(x.grad, ref) < (2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", [wkv7_chunked, wkv7_recurrent])
def test_half_precision_inputs_compute_in_fp32(dtype, form):
    *inputs, s0 = make_inputs(2, 50, 2, 16, seed=11)
    low = [x.to(dtype) for x in inputs]
    y, s = form(*low, s0)
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    # same as the fp32 run on the rounded inputs: nothing is computed in the low precision
    assert_close((y, s), form(*(x.float() for x in low), s0), tol=1e-6)
    # and close to the unrounded fp32 result, within the inputs' rounding
    y32, _ = form(*inputs, s0)
    assert rel_err(y, y32) < (5e-2 if dtype == torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("L", [1, 2, 4, 8])
def test_chunked_function_gradcheck_float64(L):
    """Finite differences in float64 against the hand-written backward: several chunks, per-step log-decays from ~0
    (decay ~1) to the fastest a chunk of L allows (chunk sum -LOG_FACTOR_MAX), a and b as RWKV-7 makes them."""
    C, BH, N = 3, 1, 3
    g = torch.Generator().manual_seed(L)
    r, k, v = (torch.randn(C, BH, L, N, generator=g, dtype=torch.float64) for _ in range(3))
    lw = -torch.rand(C, BH, L, N, generator=g, dtype=torch.float64) * 2
    lw[..., 0] = -LOG_FACTOR_MAX / L
    lw[..., 1] = -1e-9
    kk = F.normalize(torch.randn(C, BH, L, N, generator=g, dtype=torch.float64), dim=-1)
    a, b = -kk, kk * torch.rand(C, BH, L, N, generator=g, dtype=torch.float64)
    state = torch.randn(BH, N, N, generator=g, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (r, lw, k, v, a, b, state)]
    assert torch.autograd.gradcheck(_ChunkedWKV7.apply, inputs)


@pytest.mark.parametrize("form", [wkv7_chunked, wkv7_recurrent, wkv7, wkv7_reference, wkv7_compiled])
def test_bad_inputs_raise(form):
    r, w, k, v, a, b, s0 = make_inputs(2, 5, 2, 8, seed=12)
    with pytest.raises(ValueError, match="r, w, k, v, a, b must all have shape"):
        form(r, w, k[:, :4], v, a, b)
    with pytest.raises(ValueError, match="r, w, k, v, a, b must all have shape"):
        form(r[0], w[0], k[0], v[0], a[0], b[0])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        form(r, w, k, v, a, b, s0[:1])
    with pytest.raises(TypeError, match=r"floating point; got a \(torch.int64\)"):
        form(r, w, k, v, a.long(), b)
    with pytest.raises(TypeError, match="initial_state"):
        form(r, w, k, v, a, b, s0.long())
    with pytest.raises(ValueError, match="one device"):
        form(r, w, k, v, a, b.to("meta"))


def test_chunk_size_must_be_power_of_two():
    inputs = make_inputs(1, 5, 1, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        wkv7_chunked(*inputs, chunk_size=48)


@pytest.mark.parametrize("form", [wkv7_chunked, wkv7_recurrent, wkv7_reference])
def test_empty_sequence_returns_initial_state(form):
    *inputs, s0 = make_inputs(1, 0, 2, 8)
    y, s = form(*inputs, s0)
    assert y.shape == (1, 0, 2, 8) and torch.equal(s.float(), s0)


# --- the compiled kernels (csrc/wkv7): CPU here, CUDA wherever a GPU is present ---------------------------------------

def kernel_form(ops):
    """The kernel `ops` with the package's autograd wrapper (whatever device its inputs are on)."""
    return lambda *inputs: KernelFunction.apply(ops, *inputs)


@pytest.fixture(scope="module")
def cpu_ops():
    set_wkv_backend("auto")
    compiled = wkv7_compiled.kernel_for("cpu", 64)
    set_wkv_backend(None)
    if compiled is None:
        pytest.skip("the WKV7 CPU kernel cannot be built here")
    return compiled


KERNEL_CASES = [  # B, T, H, N, decays, with_state
    (1, 1, 2, 64, "rwkv7", False),  # T = 1
    (2, 1, 2, 8, "extreme", True),
    (2, 7, 3, 16, "rwkv7", True),  # T < chunk
    (2, 16, 2, 16, "extreme", False),  # exactly one chunk of the backward
    (2, 37, 2, 64, "rwkv7", True),  # odd, ragged last chunk
    (2, 45, 2, 16, "extreme", True),
    (1, 60, 2, 16, "general", True),  # RWKV-6-like decays, w = +100, a full reset
    (2, 33, 3, 5, "rwkv7", True),  # head size of no vector width
    (1, 600, 2, 32, "rwkv7", True),  # long
]


def assert_kernel_matches_reference(ops, B, T, H, N, decays, with_state, device="cpu"):
    inputs = make_inputs(B, T, H, N, seed=20 + T + N, decays=decays, with_state=with_state)
    g = torch.Generator().manual_seed(21)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    on_device = [None if x is None else x.to(device) for x in inputs]
    y, s = kernel_form(ops)(*on_device)
    assert y.device.type == device
    assert_close((y.cpu(), s.cpu()), wkv7_reference(*inputs))
    got = grads_of(kernel_form(ops), on_device, grad_y.to(device), grad_s.to(device), torch.float32)
    for name, g_got, g_ref in zip(NAMES, got, grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)):
        if g_ref is None:
            assert g_got is None
            continue
        assert torch.isfinite(g_got).all(), name
        assert rel_err(g_got.cpu(), g_ref) < GRAD_TOL, (name, rel_err(g_got.cpu(), g_ref))


@pytest.mark.parametrize("B,T,H,N,decays,with_state", KERNEL_CASES)
def test_cpu_kernel_matches_float64_reference(cpu_ops, B, T, H, N, decays, with_state):
    assert_kernel_matches_reference(cpu_ops, B, T, H, N, decays, with_state)


def test_cpu_kernel_repeated_key_with_full_erasure(cpu_ops):
    # singular transitions (iclr = 1 on one unit key, decays ~1): the backward never inverts a step
    B, T, H, N = 1, 70, 2, 16
    r, w, k, v, _, _, s0 = make_inputs(B, T, H, N, seed=15)
    kk = F.normalize(torch.randn(B, 1, H, N, generator=torch.Generator().manual_seed(16)), dim=-1).expand(B, T, H, N)
    inputs = [r, torch.full_like(w, -21.0), k, v, -kk, kk.contiguous(), s0]
    assert_close(kernel_form(cpu_ops)(*inputs), wkv7_reference(*inputs))
    g = torch.Generator().manual_seed(17)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    got = grads_of(kernel_form(cpu_ops), inputs, grad_y, grad_s, torch.float32)
    for name, g_got, g_ref in zip(NAMES, got, grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)):
        assert rel_err(g_got, g_ref) < GRAD_TOL, (name, rel_err(g_got, g_ref))


@pytest.mark.parametrize("N", [4, 16])
def test_cpu_kernel_gradcheck_float64(cpu_ops, N):
    # float64 inputs run the kernel in float64: finite differences against its backward, across two chunks
    inputs = make_inputs(2, 19, 1, N, seed=22, decays="extreme")
    leaves = [x.double().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(kernel_form(cpu_ops), leaves, fast_mode=True)


def test_cpu_kernel_gradients_finite_past_the_decay_clamp(cpu_ops):
    r, w, k, v, a, b, s0 = make_inputs(1, 33, 2, 8, seed=10)
    w[..., :3] = 100.0
    w = w.requires_grad_()
    y, s = kernel_form(cpu_ops)(r, w, k, v, a, b, s0)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(w.grad).all()
    assert (w.grad[..., :3] == 0).all()  # past the clamp the decay is constant, as in the torch forms


def test_cpu_kernel_matches_chunked_form(cpu_ops):
    inputs = make_inputs(2, 90, 2, 64, seed=23)
    assert_close(kernel_form(cpu_ops)(*inputs), wkv7_chunked(*inputs), tol=1e-5)


def test_cpu_kernel_prefix_then_continuation_equals_full_run(cpu_ops):
    r, w, k, v, a, b, s0 = make_inputs(2, 90, 2, 16, seed=5)
    run = kernel_form(cpu_ops)
    y_full, s_full = run(r, w, k, v, a, b, s0)
    y_a, s_a = run(*(x[:, :41] for x in (r, w, k, v, a, b)), s0)
    y_b, s_b = run(*(x[:, 41:] for x in (r, w, k, v, a, b)), s_a)
    assert_close((torch.cat([y_a, y_b], 1), s_b), (y_full, s_full), tol=1e-5)


def test_cpu_kernel_gradient_of_final_state_only(cpu_ops):
    # y unused (a prefill whose outputs are dropped): the backward gets no y gradient
    inputs = make_inputs(1, 20, 2, 16, seed=24)
    grad_s = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(25))
    leaves = [x.detach().requires_grad_() for x in inputs]
    (kernel_form(cpu_ops)(*leaves)[1] * grad_s).sum().backward()
    ref = [x.detach().double().requires_grad_() for x in inputs]
    (wkv7_reference(*ref)[1] * grad_s.double()).sum().backward()
    assert ref[0].grad is None and not leaves[0].grad.any()  # r reaches only y
    for name, x, x_ref in zip(NAMES[1:], leaves[1:], ref[1:]):
        assert rel_err(x.grad, x_ref.grad) < GRAD_TOL, name


def test_cpu_kernel_empty_sequence_passes_the_state_through(cpu_ops):
    inputs = make_inputs(2, 0, 2, 8)
    leaves = [x.requires_grad_() for x in inputs]
    y, s = kernel_form(cpu_ops)(*leaves)
    assert y.shape == (2, 0, 2, 8) and torch.equal(s, inputs[-1])
    grad_s = torch.randn_like(s)
    (s * grad_s).sum().backward()
    assert torch.equal(leaves[-1].grad, grad_s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernel_half_inputs(cpu_ops, dtype):
    # fp32 math and state on the rounded inputs: the reference sees exactly those; gradients in the inputs' dtype
    B, T, H, N = 2, 40, 2, 16
    *low, s0 = make_inputs(B, T, H, N, seed=13)
    inputs = [x.to(dtype) for x in low] + [s0]
    y, s = kernel_form(cpu_ops)(*inputs)
    assert y.dtype == s.dtype == torch.float32
    assert_close((y, s), wkv7_reference(*inputs))
    g = torch.Generator().manual_seed(14)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    leaves = [x.detach().requires_grad_() for x in inputs]
    y, s = kernel_form(cpu_ops)(*leaves)
    ((y * grad_y).sum() + (s * grad_s).sum()).backward()
    for name, x, ref in zip(NAMES, leaves, grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)):
        assert x.grad.dtype == x.dtype, name
        # rounding the gradient itself to 8 / 11 bits
        assert rel_err(x.grad, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), name



def test_compiled_op_and_layer_run_the_cpu_kernel(cpu_ops):
    # the public op and the model's layer: the kernel's result (bit for bit), within fp32 rounding of the torch form
    *inputs, s0 = make_inputs(2, 50, 2, 64, seed=26)
    expected = kernel_form(cpu_ops)(*inputs, s0)
    for result in (wkv7_compiled(*inputs, s0), WKV7()(*inputs, initial_state=s0)):
        assert all(torch.equal(x, x_ref) for x, x_ref in zip(result, expected))
    assert_close(expected, wkv7(*inputs, s0), tol=1e-5)


def test_backend_switch_runs_the_torch_form_without_building(monkeypatch):
    def unexpected_build(device_type, cflags=None):
        raise AssertionError("the torch backend must not build anything")

    monkeypatch.setattr(wkv7_compiled, "build", unexpected_build)
    monkeypatch.setattr(wkv7_compiled, "_loaded", {})
    monkeypatch.setenv(BACKEND_ENV, "torch")
    inputs = make_inputs(1, 9, 2, 16)
    result = wkv7_compiled(*inputs, chunk_size=8)
    assert all(torch.equal(x, x_ref) for x, x_ref in zip(result, wkv7(*inputs, chunk_size=8)))
    assert not wkv7_compiled.available("cpu")

@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    """The torch-facing CUDA source compiles (every dtype and head size, for sm_80) where there is nvcc but maybe no
    GPU, with the flags torch's extension builder adds."""
    result = compile_torch_source(CSRC / "wkv7" / "wkv7_cuda" / "wkv7_cuda.cu", tmp_path / "kernel.o", tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_chunked_op_calls_only_instantiated_launchers(tmp_path):
    """wkv7_chunked_op.cu compiles, and every kernel launcher it calls is instantiated in wkv7_chunked.cu."""
    folder = CSRC / "wkv7" / "wkv7_cuda"
    assert not undefined_launchers(folder / "wkv7_chunked_op.cu", folder / "wkv7_chunked.cu", "wkv7_chunked", tmp_path)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_ops():
    set_wkv_backend("auto")
    compiled = wkv7_compiled.kernel_for("cuda", 64)
    set_wkv_backend(None)
    # on a machine with a GPU the CUDA build is part of the package: a failure fails, never skips
    assert compiled is not None, "the CUDA WKV7 kernel failed to build (see the warning)"
    return compiled


CUDA_CASES = [  # B, T, H, N, decays, with_state: head sizes the kernel is instantiated for
    (1, 1, 2, 64, "rwkv7", False),
    (2, 7, 3, 16, "rwkv7", True),
    (2, 16, 2, 32, "extreme", False),
    (2, 37, 2, 64, "rwkv7", True),
    (2, 45, 2, 16, "extreme", True),
    (1, 60, 2, 16, "general", True),
    (1, 600, 2, 32, "rwkv7", True),
    (1, 50, 1, 128, "rwkv7", True),
]


@needs_cuda
@pytest.mark.parametrize("B,T,H,N,decays,with_state", CUDA_CASES)
def test_cuda_kernel_matches_float64_reference(cuda_ops, B, T, H, N, decays, with_state):
    assert_kernel_matches_reference(cuda_ops, B, T, H, N, decays, with_state, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_half_inputs(cuda_ops, dtype):
    B, T, H, N = 2, 40, 2, 64
    *low, s0 = make_inputs(B, T, H, N, seed=13)
    inputs = [x.to(dtype) for x in low] + [s0]
    y, s = kernel_form(cuda_ops)(*(x.cuda() for x in inputs))
    assert y.dtype == s.dtype == torch.float32
    assert_close((y.cpu(), s.cpu()), wkv7_reference(*inputs))
    g = torch.Generator().manual_seed(14)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    leaves = [x.cuda().requires_grad_() for x in inputs]
    y, s = kernel_form(cuda_ops)(*leaves)
    ((y * grad_y.cuda()).sum() + (s * grad_s.cuda()).sum()).backward()
    for name, x, ref in zip(NAMES, leaves, grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)):
        assert x.grad.dtype == x.dtype, name
        assert rel_err(x.grad.cpu(), ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), name


@needs_cuda
def test_cuda_kernel_prefix_then_continuation_and_empty(cuda_ops):
    r, w, k, v, a, b, s0 = (x.cuda() for x in make_inputs(2, 90, 2, 64, seed=5))
    run = kernel_form(cuda_ops)
    y_full, s_full = run(r, w, k, v, a, b, s0)
    y_a, s_a = run(*(x[:, :41] for x in (r, w, k, v, a, b)), s0)
    y_b, s_b = run(*(x[:, 41:] for x in (r, w, k, v, a, b)), s_a)
    assert_close((torch.cat([y_a, y_b], 1).cpu(), s_b.cpu()), (y_full.cpu(), s_full.cpu()), tol=1e-5)
    y0, s0_out = run(*(x[:, :0] for x in (r, w, k, v, a, b)), s0)
    assert y0.shape == (2, 0, 2, 64) and torch.equal(s0_out, s0)


@needs_cuda
def test_cuda_dispatch_and_torch_fallback(cuda_ops):
    inputs = [x.cuda() for x in make_inputs(2, 30, 2, 64, seed=27)]
    result = wkv7_compiled(*inputs)
    assert all(torch.equal(x, x_ref) for x, x_ref in zip(result, kernel_form(cuda_ops)(*inputs)))
    assert_close(tuple(x.cpu() for x in result), wkv7_reference(*(x.cpu() for x in inputs)))
    # a head size the kernel has no instance for runs the torch form; the kernel itself refuses it
    odd = [x.cuda() for x in make_inputs(1, 4, 2, 8, seed=1)]
    assert not wkv7_compiled.available("cuda", 8)
    assert all(torch.equal(x, x_ref) for x, x_ref in zip(wkv7_compiled(*odd), wkv7(*odd)))
    with pytest.raises(RuntimeError, match="head size must be 16, 32, 64 or 128"):
        kernel_form(cuda_ops)(*odd)
