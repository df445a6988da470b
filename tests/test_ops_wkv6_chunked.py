"""The chunked CUDA WKV6 kernel: its algorithm emulated on the CPU against the float64 reference, its source
compile-checked with nvcc, and on a GPU the kernel itself against the reference and the step kernel.

The emulation (tests/wkv6_chunked_emulation.py) runs the kernel's chunk algebra step for step in torch; it is how
the math is debugged without a GPU. The CUDA tests skip where there is no GPU; the compile checks where there is no
nvcc.
"""

import re
import subprocess
from pathlib import Path

import pytest
import torch

from cuda_compile import NVCC, undefined_launchers
from test_ops_wkv6 import FP32_TOL, extreme_decays, grads_of, make_inputs, oracle, rel_err
from wkv6_chunked_emulation import (
    CHUNK,
    ChunkedWKV6Emulation,
    chunk_factors,
    pair_decay_gradient,
    tf32,
    wkv6_chunked_emulation,
)

NAMES = ["r", "k", "v", "w", "u", "initial_state"]
GRAD_TOL = 1e-4  # the torch forms' gradient tolerance in test_ops_wkv6


def assert_matches_oracle(y, s, expected, tol=FP32_TOL):
    y_ref, s_ref = expected
    assert y.dtype == s.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_ref) < tol and rel_err(s, s_ref) < tol, (rel_err(y, y_ref), rel_err(s, s_ref))


# B, T, H, N: T = 1, shorter than a chunk, exactly one, ragged ends, long; head sizes 16 (one value tile) to 64 (four)
SHAPES = [(1, 1, 2, 16), (2, 7, 3, 16), (1, 16, 2, 32), (2, 37, 2, 16), (1, 130, 1, 64), (2, 333, 2, 16)]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,H,N", SHAPES)
def test_emulation_forward_matches_float64(B, T, H, N, with_state):
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=T + N, with_state=with_state)
    y, s = wkv6_chunked_emulation(r, k, v, w, u, s0)
    assert_matches_oracle(y, s, oracle(r, k, v, w, u, s0))


def test_emulation_extreme_decays_stay_finite_and_exact():
    # w = +100 (past the clamp: decay e^-60 underflows the products to 0), w = -20 (decay 1 - 2e-9), resets mid-run
    r, k, v, w, u, s0 = make_inputs(2, 150, 2, 16, seed=3)
    w = extreme_decays(w)
    w[..., 6:8] = 3.0  # the fast end of trained checkpoints: e^-20 per step, e^-320 over a chunk
    y, s = wkv6_chunked_emulation(r, k, v, w, u, s0)
    assert_matches_oracle(y, s, oracle(r, k, v, w, u, s0))


def test_emulation_all_decays_zero_is_finite():
    r, k, v, w, u, s0 = make_inputs(1, 70, 2, 16, seed=4)
    w = torch.full_like(w, 100.0)
    y, s = wkv6_chunked_emulation(r, k, v, w, u, s0)
    assert_matches_oracle(y, s, oracle(r, k, v, w, u, s0))


def test_emulation_prefix_then_continuation_equals_full_run():
    r, k, v, w, u, s0 = make_inputs(2, 90, 2, 16, seed=5)
    y_full, s_full = wkv6_chunked_emulation(r, k, v, w, u, s0)
    y_a, s_a = wkv6_chunked_emulation(r[:, :41], k[:, :41], v[:, :41], w[:, :41], u, s0)
    y_b, s_b = wkv6_chunked_emulation(r[:, 41:], k[:, 41:], v[:, 41:], w[:, 41:], u, s_a)
    assert rel_err(torch.cat([y_a, y_b], 1), y_full) < 1e-5 and rel_err(s_b, s_full) < 1e-5


GRAD_CASES = [  # T, N, decays, with_state
    (1, 16, "per_channel", True),
    (7, 16, "per_channel", False),
    (45, 32, "per_channel", True),  # two value tiles: their partial gradients are summed
    (45, 16, "extreme", True),
    (21, 64, "extreme", False),
    (200, 16, "per_channel", True),
]


@pytest.mark.parametrize("T,N,decays,with_state", GRAD_CASES)
def test_emulation_gradients_match_float64(T, N, decays, with_state):
    B, H = 2, 2
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=8 + T, with_state=with_state)
    inputs = [r, k, v, extreme_decays(w) if decays == "extreme" else w, u, s0]
    g = torch.Generator().manual_seed(9)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    *_, expected = grads_of(oracle, inputs, grad_y, grad_s, torch.float64)
    *_, got = grads_of(wkv6_chunked_emulation, inputs, grad_y, grad_s, torch.float32)
    for name, g_got, g_ref in zip(NAMES, got, expected):
        if g_ref is None:
            continue
        assert g_got is not None and torch.isfinite(g_got).all(), name
        assert rel_err(g_got, g_ref) < GRAD_TOL, (name, rel_err(g_got, g_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulation_half_inputs_compute_in_fp32(dtype):
    B, T, H, N = 2, 50, 2, 16
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=13)
    inputs = [x.to(dtype) for x in (r, k, v, w, u)] + [s0]
    y, s = wkv6_chunked_emulation(*inputs)
    # against float64 on the rounded inputs: the fp32 accuracy, not the inputs' precision
    assert_matches_oracle(y, s, oracle(*inputs))
    g = torch.Generator().manual_seed(14)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    *_, expected = grads_of(oracle, inputs, grad_y, grad_s, torch.float64)
    leaves = [x.detach().requires_grad_() for x in inputs]
    y, s = wkv6_chunked_emulation(*leaves)
    ((y * grad_y).sum() + (s * grad_s).sum()).backward()
    for name, x, ref in zip(NAMES, leaves, expected):
        assert x.grad.dtype == x.dtype
        # the gradient's own rounding to the input dtype is the only loss
        assert rel_err(x.grad, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3), name


def test_emulation_gradcheck_float64():
    """Finite differences in float64 against the hand-written backward (two chunks, a ragged end, two value
    tiles), with log-decays from ~0 to past the clamp."""
    B, T, H, N = 1, 19, 1, 32
    g = torch.Generator().manual_seed(1)
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * 8 - 6
    w[..., 0] = -25.0  # decay 1 - 1e-11
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, N, N, generator=g, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (r, k, v, w, u, state)]
    assert torch.autograd.gradcheck(ChunkedWKV6Emulation.apply, inputs, fast_mode=True)


def test_factors_are_running_products_at_most_one():
    g = torch.Generator().manual_seed(2)
    lw = -torch.exp(torch.rand(3, CHUNK, 4, generator=g, dtype=torch.float64) * 10 - 6).clamp(max=60)
    qf, kf, D, F = chunk_factors(torch.exp(lw))
    G = torch.cumsum(lw, -2)  # float64: the differences of cumulative sums are exact enough to check against
    t, s = torch.meshgrid(torch.arange(CHUNK), torch.arange(CHUNK), indexing="ij")
    for a, b in zip(t.flatten().tolist(), s.flatten().tolist()):
        if b < a:
            expected = torch.exp(G[:, a - 1] - G[:, b])
            assert torch.allclose(F[:, a, b], expected, rtol=1e-12, atol=0)
    assert torch.allclose(qf[:, 1:], torch.exp(G[:, :-1]), rtol=1e-12, atol=0)
    assert torch.allclose(kf[:, :-1], torch.exp(G[:, -1:] - G[:, :-1]), rtol=1e-12, atol=0)
    assert torch.allclose(D, torch.exp(G[:, -1]), rtol=1e-12, atol=0)
    assert (qf <= 1).all() and (kf <= 1).all() and (F <= 1).all()


def test_pair_decay_gradient_recursion_equals_the_definition():
    M = torch.randn(2, CHUNK, CHUNK, 3, dtype=torch.float64).tril(-1).mul(1)
    M = M * torch.ones(CHUNK, CHUNK, dtype=torch.float64).tril(-1).unsqueeze(-1)
    direct = torch.stack(
        [sum((M[:, t, s] for t in range(CHUNK) for s in range(CHUNK) if s < p < t), torch.zeros(2, 3,
             dtype=torch.float64)) for p in range(CHUNK)], 1)
    assert torch.allclose(pair_decay_gradient(M), direct)


def test_tf32_rounding():
    x = torch.tensor([1.0, 1.0 + 2**-11, 1.0 + 2**-10 + 2**-11, -(1.0 + 2**-11), 3.0e-39, 1.0 + 2**-12])
    assert tf32(x).tolist() == [1.0, 1.0 + 2**-10, 1.0 + 2**-9, -(1.0 + 2**-10), tf32(x)[4].item(), 1.0]
    assert (tf32(x) - x).abs().max() <= 2**-11 * x.abs().max()


# --- the CUDA source: compile checks (wherever nvcc is) ---

KERNEL_DIR = Path(__file__).resolve().parents[1] / "csrc" / "wkv6" / "wkv6_cuda"


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_chunked_kernel_compiles_for_hopper_ampere_and_below(tmp_path):
    """nvcc builds the kernels for sm_90 (H100) and sm_80 (the first with TF32 tensor cores), and the guarded stub
    for sm_75, without warnings; ptxas reports no spill beyond a few bytes (a register tile that spills would run at
    local-memory speed)."""
    archs = ["75", "80", "90"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    result = subprocess.run(
        [NVCC, "-std=c++17", "-O3", "--use_fast_math", *gencode, "-Xptxas=-v", "-c", str(KERNEL_DIR / "wkv6_chunked.cu"),
         "-o", str(tmp_path / "wkv6_chunked.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr)]
    assert spills and max(spills) <= 16, result.stderr


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
def test_chunked_op_calls_only_instantiated_launchers(tmp_path):
    """wkv6_chunked_op.cu compiles, and every kernel launcher it calls is instantiated in wkv6_chunked.cu (a dispatch
    over double, which has no kernel, would build a library that fails to load)."""
    assert not undefined_launchers(KERNEL_DIR / "wkv6_chunked_op.cu", KERNEL_DIR / "wkv6_chunked.cu", "wkv6_chunked",
                                   tmp_path)


# --- the CUDA kernel itself (needs a GPU) ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the chunked kernel is CUDA)")
FORM_ENV = "VISUALRWKV_WKV6_CUDA_FORM"
CHUNKED_MIN_LENGTH = 64  # kWKV6ChunkedMinLength in wkv6_chunked_op.h


@pytest.fixture(scope="module")
def cuda_build():
    from visualrwkv_hf.ops import wkv6_compiled

    # on a machine with a GPU the CUDA build is part of the package: a failure fails (with nvcc's output), never skips
    wkv6_compiled.build("cuda")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the chunked kernel needs an sm_80+ GPU (TF32 tensor cores)")


def cuda_run(form, monkeypatch, inputs, state, grad_y, grad_state):
    """y, final state and the input gradients of the CUDA op with VISUALRWKV_WKV6_CUDA_FORM=form."""
    from visualrwkv_hf.ops import wkv6_compiled

    monkeypatch.setenv(FORM_ENV, form)
    leaves = [x.detach().cuda().requires_grad_() for x in inputs]
    s0 = None if state is None else state.detach().cuda().requires_grad_()
    y, s = wkv6_compiled(*leaves, s0)
    ((y * grad_y.cuda()).sum() + (s * grad_state.cuda()).sum()).backward()
    return y.cpu(), s.cpu(), [x.grad.cpu() for x in leaves] + ([s0.grad.cpu()] if s0 is not None else [])


CUDA_CASES = [  # B, T, H, N, decays, dtype, with_state
    (1, 1, 2, 64, "per_channel", torch.float32, True),  # T = 1
    (2, 15, 3, 16, "per_channel", torch.float32, False),  # shorter than a chunk
    (2, 16, 2, 32, "extreme", torch.float32, True),  # exactly one chunk
    (1, 333, 4, 64, "per_channel", torch.float32, True),  # ragged end, four value tiles
    (2, 200, 2, 64, "extreme", torch.float32, True),
    (1, 1000, 2, 64, "per_channel", torch.float32, False),  # long
    (2, 100, 2, 64, "per_channel", torch.bfloat16, True),
    (2, 100, 2, 32, "extreme", torch.float16, True),
]


@needs_cuda
@pytest.mark.parametrize("B,T,H,N,decays,dtype,with_state", CUDA_CASES)
def test_cuda_chunked_matches_float64(cuda_build, monkeypatch, B, T, H, N, decays, dtype, with_state):
    r, k, v, w, u, s0 = make_inputs(B, T, H, N, seed=T + N, with_state=with_state)
    inputs = [x.to(dtype) for x in (r, k, v, extreme_decays(w) if decays == "extreme" else w, u)]
    g = torch.Generator().manual_seed(9)
    grad_y, grad_s = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    y_ref, s_ref, expected = grads_of(oracle, inputs + [s0], grad_y, grad_s, torch.float64)
    y, s, got = cuda_run("chunked", monkeypatch, inputs, s0, grad_y, grad_s)
    # float64 on the same (rounded) inputs: the kernel computes in fp32 whatever the input dtype
    assert_matches_oracle(y, s, (y_ref, s_ref))
    for name, g_got, g_ref in zip(NAMES, got, [x for x in expected if x is not None]):
        assert g_got.dtype == (torch.float32 if name == "initial_state" else dtype)
        assert torch.isfinite(g_got).all(), name
        tol = GRAD_TOL if dtype == torch.float32 else (1e-2 if dtype == torch.bfloat16 else 2e-3)
        assert rel_err(g_got, g_ref) < tol, (name, rel_err(g_got, g_ref))


@needs_cuda
@pytest.mark.parametrize("T", [1, 17, 64, 250])
def test_cuda_chunked_equals_step_kernel(cuda_build, monkeypatch, T):
    r, k, v, w, u, s0 = make_inputs(2, T, 3, 64, seed=T)
    g = torch.Generator().manual_seed(10)
    grad_y, grad_s = torch.randn(2, T, 3, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    step = cuda_run("step", monkeypatch, [r, k, v, w, u], s0, grad_y, grad_s)
    chunked = cuda_run("chunked", monkeypatch, [r, k, v, w, u], s0, grad_y, grad_s)
    for a, b in zip([step[0], step[1], *step[2]], [chunked[0], chunked[1], *chunked[2]]):
        assert rel_err(b, a) < 1e-4


@needs_cuda
def test_cuda_dispatch_rule_by_length(cuda_build, monkeypatch):
    """auto: the step kernel below CHUNKED_MIN_LENGTH tokens (decode, short prompts), the chunked kernel from it on;
    both kernels are deterministic, so "which one ran" shows as bitwise equality with the forced form."""
    from visualrwkv_hf.ops import wkv6_compiled

    for T, expected in [(1, "step"), (CHUNKED_MIN_LENGTH - 1, "step"), (CHUNKED_MIN_LENGTH, "chunked")]:
        r, k, v, w, u, s0 = (x.cuda() for x in make_inputs(1, T, 2, 64, seed=T))
        results = {}
        for form in ("auto", "step", "chunked"):
            monkeypatch.setenv(FORM_ENV, form)
            results[form] = wkv6_compiled(r, k, v, w, u, s0)
        other = "chunked" if expected == "step" else "step"
        assert all(torch.equal(a, b) for a, b in zip(results["auto"], results[expected])), T
        if T > 1:
            assert not torch.equal(results["auto"][0], results[other][0]), T
    # head size 128 has no chunked instantiation: auto keeps the step kernel, forcing the chunked one is an error
    r, k, v, w, u, s0 = (x.cuda() for x in make_inputs(1, 100, 1, 128, seed=1))
    monkeypatch.setenv(FORM_ENV, "auto")
    wkv6_compiled(r, k, v, w, u, s0)
    monkeypatch.setenv(FORM_ENV, "chunked")
    with pytest.raises(RuntimeError, match="head size 16, 32 or 64"):
        wkv6_compiled(r, k, v, w, u, s0)
    monkeypatch.setenv(FORM_ENV, "fast")
    with pytest.raises(RuntimeError, match="must be auto, step or chunked"):
        wkv6_compiled(r, k, v, w, u, s0)
