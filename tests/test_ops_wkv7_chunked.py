"""The chunked CUDA WKV7 kernel: its algorithm emulated on the CPU against the float64 reference, its source
compile-checked with nvcc, and on a GPU the kernel itself against the reference and the step kernel.

The emulation (tests/wkv7_chunked_emulation.py) runs the kernel's chunk algebra step for step in torch; it is how
the math is debugged without a GPU. The CUDA tests skip where there is no GPU; the compile check where there is no
nvcc.
"""

import math
import re
import subprocess

import pytest
import torch

from test_ops_wkv6 import assert_close, rel_err
from test_ops_wkv6_chunked import NVCC
from test_ops_wkv7 import FASTEST_W, GRAD_TOL, NAMES, grads_of, make_inputs
from visualrwkv_hf.ops import wkv7_reference
from visualrwkv_hf.ops.kernels import CSRC
from wkv7_chunked_emulation import (
    CHUNK,
    LOG_FACTOR_MAX,
    ChunkedWKV7Emulation,
    log_decays,
    segments,
    unit_lower_inverse,
    wkv7_chunked_emulation,
)

HALF_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # the gradient's own rounding to the input dtype


def output_grads(B, T, H, N, seed=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)


def assert_grads_match(got, expected, tol=GRAD_TOL):
    for name, g_got, g_ref in zip(NAMES, got, expected):
        if g_ref is None:
            assert g_got is None, name
            continue
        assert g_got is not None and torch.isfinite(g_got).all(), name
        assert rel_err(g_got.cpu().double(), g_ref) < tol, (name, rel_err(g_got.cpu().double(), g_ref))


# B, T, H, N: T = 1, shorter than a chunk, exactly one, one past it, ragged ends, long; head sizes 16 (one value
# tile) to 64 (four)
SHAPES = [(1, 1, 2, 16), (2, 7, 3, 16), (1, 16, 2, 32), (2, 17, 2, 16), (2, 37, 2, 16), (1, 130, 1, 64),
          (1, 333, 2, 16)]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,H,N", SHAPES)
def test_emulation_forward_matches_float64(B, T, H, N, with_state):
    inputs = make_inputs(B, T, H, N, seed=T + N, with_state=with_state)
    y, s = wkv7_chunked_emulation(*inputs)
    assert y.dtype == s.dtype == torch.float32
    assert_close((y, s), wkv7_reference(*inputs))


@pytest.mark.parametrize("decays", ["extreme", "general"])
def test_emulation_decay_extremes_stay_finite_and_exact(decays):
    # "extreme": RWKV-7's fastest decay on every step, decays of 1 - 7.6e-10, iclr 0 and 1; "general": RWKV-6-like
    # decays (w up to 3), w = +100 (past the clamp) and a full reset: chunks split into segments
    inputs = make_inputs(1, 70, 2, 32, seed=3, decays=decays)
    y, s = wkv7_chunked_emulation(*inputs)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_close((y, s), wkv7_reference(*inputs))


def test_emulation_all_decays_at_the_clamp():
    # every step its own segment (each log-decay is -60): sixteen passes per chunk
    r, w, k, v, a, b, s0 = make_inputs(1, 40, 2, 16, seed=4)
    w = torch.full_like(w, 100.0)
    assert (segments(log_decays(w[:, :CHUNK].permute(0, 2, 1, 3), torch.float32)) == torch.arange(CHUNK)).all()
    assert_close(wkv7_chunked_emulation(r, w, k, v, a, b, s0), wkv7_reference(r, w, k, v, a, b, s0))


def test_emulation_prefix_then_continuation_equals_full_run():
    r, w, k, v, a, b, s0 = make_inputs(2, 90, 2, 16, seed=5)
    y_full, s_full = wkv7_chunked_emulation(r, w, k, v, a, b, s0)
    y_a, s_a = wkv7_chunked_emulation(*(x[:, :41] for x in (r, w, k, v, a, b)), s0)
    y_b, s_b = wkv7_chunked_emulation(*(x[:, 41:] for x in (r, w, k, v, a, b)), s_a)
    assert_close((torch.cat([y_a, y_b], 1), s_b), (y_full, s_full), tol=1e-5)


def test_rwkv7_decays_never_split_a_chunk():
    """RWKV-7's decays (per-step log-decay >= -e^-0.5) sum to >= -16 e^-0.5 ~ -9.7 over a chunk: one segment, and
    the factors e^{+-G} stay within [6e-5, 1.6e4], far inside fp32 (the check the chunk size of 16 rests on)."""
    w = torch.full((3, 4, CHUNK, 64), FASTEST_W)
    lw = log_decays(w, torch.float32)
    assert (segments(lw) == 0).all()
    G = lw.cumsum(-2)
    assert torch.exp(G).min() > 6e-5 and torch.exp(-G).max() < 1.7e4
    assert math.exp(CHUNK * -math.exp(-0.5)) > 6e-5


def test_segments_keep_every_factor_representable():
    g = torch.Generator().manual_seed(6)
    lw = log_decays(torch.rand(5, 7, CHUNK, 32, generator=g) * 12 - 6, torch.float32)  # w from -6 to 6 (clamped)
    seg = segments(lw)
    assert (seg[..., 1:] >= seg[..., :-1]).all() and (seg[..., 1:] - seg[..., :-1] <= 1).all()
    for index in range(int(seg.max()) + 1):
        G = (lw * (seg == index).unsqueeze(-1)).cumsum(-2)
        assert G.min() >= -LOG_FACTOR_MAX - 1e-3
        # greedy: a segment ends only where one more step would have crossed the bound
        nxt = (seg == index + 1).float().argmax(-1)
        has_next = (seg == index + 1).any(-1)
        crossing = G.gather(-2, (nxt - 1).clamp(min=0)[..., None, None].expand(*nxt.shape, 1, 32)).squeeze(-2)
        step = lw.gather(-2, nxt[..., None, None].expand(*nxt.shape, 1, 32)).squeeze(-2)
        assert ((crossing + step).amin(-1)[has_next] < -LOG_FACTOR_MAX).all()


def test_unit_lower_inverse():
    A = torch.randn(3, CHUNK, CHUNK, dtype=torch.float64).tril(-1) * 0.3
    eye = torch.eye(CHUNK, dtype=torch.float64)
    assert torch.allclose(unit_lower_inverse(A) @ (eye - A), eye.expand_as(A), atol=1e-12)


GRAD_CASES = [  # B, T, N, decays, with_state
    (2, 1, 16, "rwkv7", True),  # T = 1
    (2, 7, 16, "rwkv7", False),  # shorter than a chunk, no initial state
    (1, 32, 32, "extreme", True),  # two full chunks, two value tiles: their partial gradients are summed
    (2, 45, 16, "extreme", True),
    (1, 24, 32, "general", True),  # segmented chunks
    (1, 21, 64, "rwkv7", False),  # four value tiles
    (1, 200, 16, "rwkv7", True),  # long
]


@pytest.mark.parametrize("B,T,N,decays,with_state", GRAD_CASES)
def test_emulation_gradients_match_float64(B, T, N, decays, with_state):
    H = 2
    inputs = make_inputs(B, T, H, N, seed=8 + T, decays=decays, with_state=with_state)
    grad_y, grad_s = output_grads(B, T, H, N)
    expected = grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)
    assert_grads_match(grads_of(wkv7_chunked_emulation, inputs, grad_y, grad_s, torch.float32), expected)


def test_emulation_gradients_past_the_decay_clamp():
    r, w, k, v, a, b, s0 = make_inputs(1, 20, 2, 16, seed=10)
    w[..., :3] = 100.0
    w = w.requires_grad_()
    y, s = wkv7_chunked_emulation(r, w, k, v, a, b, s0)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(w.grad).all() and (w.grad[..., :3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulation_half_inputs_compute_in_fp32(dtype):
    B, T, H, N = 2, 40, 2, 16
    *low, s0 = make_inputs(B, T, H, N, seed=13)
    inputs = [x.to(dtype) for x in low] + [s0]
    y, s = wkv7_chunked_emulation(*inputs)
    # against float64 on the rounded inputs: the fp32 accuracy, not the inputs' precision
    assert y.dtype == s.dtype == torch.float32
    assert_close((y, s), wkv7_reference(*inputs))
    grad_y, grad_s = output_grads(B, T, H, N, seed=14)
    leaves = [x.detach().requires_grad_() for x in inputs]
    y, s = wkv7_chunked_emulation(*leaves)
    ((y * grad_y).sum() + (s * grad_s).sum()).backward()
    for name, x, ref in zip(NAMES, leaves, grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)):
        assert x.grad.dtype == x.dtype, name
        assert rel_err(x.grad, ref) < HALF_TOL[dtype], name


def test_emulation_gradcheck_float64():
    """Finite differences in float64 against the hand-written backward: two chunks with a ragged end, the second
    split into segments (w = 3 on some channels), two value tiles."""
    B, T, H, N = 1, 21, 1, 32
    r, w, k, v, a, b, s0 = (x.double() for x in make_inputs(B, T, H, N, seed=1))
    w[:, 16:, :, :4] = 3.0  # e^-20 per step: segments of 3 steps
    inputs = [x.requires_grad_() for x in (r, w, k, v, a, b, s0)]
    assert torch.autograd.gradcheck(ChunkedWKV7Emulation.apply, inputs, fast_mode=True)


# --- the CUDA source: compile check (wherever nvcc is) ---

KERNEL = CSRC / "wkv7" / "wkv7_cuda" / "wkv7_chunked.cu"


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_chunked_kernel_compiles_for_hopper_ampere_and_below(tmp_path):
    """nvcc builds the kernels for sm_90 (H100) and sm_80 (the first with TF32 tensor cores), and the guarded stub
    for sm_75, without warnings; ptxas reports at most a few dozen bytes of spills (a spilled register tile would run
    at local-memory speed)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("75", "80", "90")]
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", "--use_fast_math", *gencode, "-Xptxas=-v", "-c", str(KERNEL), "-o",
         str(tmp_path / "wkv7_chunked.o")],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert spills and max(spills) <= 64, result.stderr


# --- the CUDA kernel itself (needs a GPU) ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the chunked kernel is CUDA)")
FORM_ENV = "VISUALRWKV_WKV7_CUDA_FORM"
CHUNKED_MIN_LENGTH = 64  # kWKV7ChunkedMinLength in wkv7_chunked_op.h


@pytest.fixture(scope="module")
def cuda_build():
    from visualrwkv_hf.ops import wkv7_compiled

    # on a machine with a GPU the CUDA build is part of the package: a failure fails (with nvcc's output), never skips
    wkv7_compiled.build("cuda")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the chunked kernel needs an sm_80+ GPU (TF32 tensor cores)")


def cuda_run(form, monkeypatch, inputs, grad_y, grad_s):
    """y, final state and the input gradients (None for an absent initial state) of the CUDA op with
    VISUALRWKV_WKV7_CUDA_FORM=form."""
    from visualrwkv_hf.ops import wkv7_compiled

    monkeypatch.setenv(FORM_ENV, form)
    leaves = [None if x is None else x.detach().cuda().requires_grad_() for x in inputs]
    y, s = wkv7_compiled(*leaves)
    ((y * grad_y.cuda()).sum() + (s * grad_s.cuda()).sum()).backward()
    return y.detach().cpu(), s.detach().cpu(), [None if x is None else x.grad.cpu() for x in leaves]

CUDA_CASES = [  # B, T, H, N, decays, dtype, with_state
    (1, 1, 2, 64, "rwkv7", torch.float32, True),  # T = 1
    (2, 15, 3, 16, "rwkv7", torch.float32, False),  # shorter than a chunk
    (2, 16, 2, 32, "extreme", torch.float32, True),  # exactly one chunk
    (1, 333, 4, 64, "rwkv7", torch.float32, True),  # ragged end, four value tiles
    (2, 200, 2, 64, "extreme", torch.float32, True),
    (1, 150, 2, 32, "general", torch.float32, True),  # segmented chunks, w = +100
    (1, 1000, 2, 64, "rwkv7", torch.float32, False),  # long
    (2, 100, 2, 64, "rwkv7", torch.bfloat16, True),
    (2, 100, 2, 32, "extreme", torch.float16, True),
]


@needs_cuda
@pytest.mark.parametrize("B,T,H,N,decays,dtype,with_state", CUDA_CASES)
def test_cuda_chunked_matches_float64(cuda_build, monkeypatch, B, T, H, N, decays, dtype, with_state):
    *low, s0 = make_inputs(B, T, H, N, seed=T + N, decays=decays, with_state=with_state)
    inputs = [x.to(dtype) for x in low] + [s0]
    grad_y, grad_s = output_grads(B, T, H, N)
    expected = grads_of(wkv7_reference, inputs, grad_y, grad_s, torch.float64)
    y, s, got = cuda_run("chunked", monkeypatch, inputs, grad_y, grad_s)
    # float64 on the same (rounded) inputs: the kernel computes in fp32 whatever the input dtype
    assert y.dtype == s.dtype == torch.float32
    assert_close((y, s), wkv7_reference(*inputs))
    for name, g_got in zip(NAMES, got):
        if g_got is not None:
            assert g_got.dtype == (torch.float32 if name == "initial_state" else dtype), name
    assert_grads_match(got, expected, GRAD_TOL if dtype == torch.float32 else HALF_TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("T", [1, 17, 64, 250])
def test_cuda_chunked_equals_step_kernel(cuda_build, monkeypatch, T):
    inputs = make_inputs(2, T, 3, 64, seed=T)
    grad_y, grad_s = output_grads(2, T, 3, 64, seed=10)
    step = cuda_run("step", monkeypatch, inputs, grad_y, grad_s)
    chunked = cuda_run("chunked", monkeypatch, inputs, grad_y, grad_s)
    for a, b in zip([step[0], step[1], *step[2]], [chunked[0], chunked[1], *chunked[2]]):
        assert rel_err(b, a) < 1e-4


@needs_cuda
def test_cuda_chunked_prefix_then_continuation(cuda_build, monkeypatch):
    from visualrwkv_hf.ops import wkv7_compiled

    monkeypatch.setenv(FORM_ENV, "chunked")
    r, w, k, v, a, b, s0 = (x.cuda() for x in make_inputs(2, 90, 2, 64, seed=5))
    y_full, s_full = wkv7_compiled(r, w, k, v, a, b, s0)
    y_a, s_a = wkv7_compiled(*(x[:, :41] for x in (r, w, k, v, a, b)), s0)
    y_b, s_b = wkv7_compiled(*(x[:, 41:] for x in (r, w, k, v, a, b)), s_a)
    assert_close((torch.cat([y_a, y_b], 1).cpu(), s_b.cpu()), (y_full.cpu(), s_full.cpu()), tol=1e-5)


@needs_cuda
def test_cuda_dispatch_rule_by_length(cuda_build, monkeypatch):
    """auto: the step kernel below CHUNKED_MIN_LENGTH tokens (decode, short prompts), the chunked kernel from it on;
    both kernels are deterministic, so "which one ran" shows as bitwise equality with the forced form."""
    from visualrwkv_hf.ops import wkv7_compiled

    for T, expected in [(1, "step"), (CHUNKED_MIN_LENGTH - 1, "step"), (CHUNKED_MIN_LENGTH, "chunked")]:
        inputs = [x.cuda() for x in make_inputs(1, T, 2, 64, seed=T)]
        results = {}
        for form in ("auto", "step", "chunked"):
            monkeypatch.setenv(FORM_ENV, form)
            results[form] = wkv7_compiled(*inputs)
        other = "chunked" if expected == "step" else "step"
        assert all(torch.equal(a, b) for a, b in zip(results["auto"], results[expected])), T
        if T > 1:
            assert not torch.equal(results["auto"][0], results[other][0]), T
    # head size 128 has no chunked instantiation: auto keeps the step kernel, forcing the chunked one is an error
    inputs = [x.cuda() for x in make_inputs(1, 100, 1, 128, seed=1)]
    monkeypatch.setenv(FORM_ENV, "auto")
    wkv7_compiled(*inputs)
    monkeypatch.setenv(FORM_ENV, "chunked")
    with pytest.raises(RuntimeError, match="head size 16, 32 or 64"):
        wkv7_compiled(*inputs)
    monkeypatch.setenv(FORM_ENV, "fast")
    with pytest.raises(RuntimeError, match="must be auto, step or chunked"):
        wkv7_compiled(*inputs)
