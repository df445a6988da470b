"""The compiled WKV6 kernels against a float64 reference: forward, final state, gradients; the autograd wrapper,
fallback, switch, build cache and `kernels` repository every compiled op shares.

The first test that needs the CPU kernel builds it (~60 s once per machine, cached afterwards). Kernel tests skip
where it cannot be built; the fallback and switch tests run everywhere.
"""

import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch

import visualrwkv_hf.ops.kernels as kernels_mod
from visualrwkv_hf.ops import WKV6, set_wkv_backend, wkv6, wkv6_compiled
from visualrwkv_hf.ops.kernels import BACKEND_ENV, CompiledOp, KernelFunction


def reference_float64(r, k, v, w, u, initial_state=None):
    """The spec's recurrence step by step in float64 (log-decay clamped at -60, as every form)."""
    r, k, v, w, u = (x.double() for x in (r, k, v, w, u))
    B, T, H, N = r.shape
    state = torch.zeros(B, H, N, N, dtype=torch.float64) if initial_state is None else initial_state.double()
    decay = torch.exp(-torch.exp(w.clamp(max=math.log(60.0))))
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], u[None, :, :, None] * kv + state))
        state = decay[:, t, :, :, None] * state + kv
    return torch.stack(ys, dim=1), state


@pytest.fixture(scope="module")
def ops():
    set_wkv_backend("auto")
    compiled = wkv6_compiled.kernel_for("cpu", 64)
    set_wkv_backend(None)
    if compiled is None:
        pytest.skip("the WKV6 CPU kernel cannot be built here")
    return compiled


def make_inputs(B, T, H, N, decay="per_channel", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    if decay == "per_channel":
        # realistic checkpoints: one decay level per channel from -6 to 3, small data-dependent jitter
        w = torch.linspace(-6.0, 3.0, H * N).view(1, 1, H, N) + 0.3 * torch.randn(B, T, H, N, generator=gen)
    else:
        w = torch.full((B, T, H, N), float(decay))
    u = 0.5 * torch.randn(H, N, generator=gen)
    state = torch.randn(B, H, N, N, generator=gen)
    return [x.to(dtype) for x in (r, k, v, w, u)], state


def output_grads(B, T, H, N, seed=1):
    """Seeded gradients of y and of the final state: at T = 1 the exact dw is a cancellation of O(|log-decay| * N)
    terms, which fp32 meets within 1e-4 for typical draws (median 3e-5) but not for every draw."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, N, generator=gen), torch.randn(B, H, N, N, generator=gen)


def kernel_run(ops, inputs, state, grad_y, grad_state):
    leaves = [x.detach().requires_grad_() for x in inputs]
    s0 = None if state is None else state.detach().requires_grad_()
    y, s = KernelFunction.apply(ops, *leaves, s0)
    ((y * grad_y).sum() + (s * grad_state).sum()).backward()
    grads = [x.grad for x in leaves] + ([s0.grad] if s0 is not None else [])
    return y, s, grads


def reference_run(inputs, state, grad_y, grad_state):
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    s0 = None if state is None else state.detach().double().requires_grad_()
    y, s = reference_float64(*leaves, s0)
    ((y * grad_y.double()).sum() + (s * grad_state.double()).sum()).backward()
    grads = [x.grad for x in leaves] + ([s0.grad] if s0 is not None else [])
    return y, s, grads


def assert_close_relative(actual, expected, tol, what):
    # relative to the largest value, floored at 1: a gradient that is exactly 0 in the reference (dw at T = 1) comes
    # out of the kernel as a cancellation of O(1) terms
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected).abs().max().item() / scale
    assert error < tol, f"{what}: max error {error:.2e} of the largest value"


CASES = [
    # B, T, H, N, decay, with initial state
    (1, 1, 2, 64, "per_channel", False),
    (2, 37, 2, 64, "per_channel", True),
    (1, 64, 1, 64, 100.0, True),
    (2, 29, 2, 64, -20.0, False),
    (3, 17, 3, 24, "per_channel", True),
    (1, 1, 1, 24, -20.0, True),
    (2, 33, 2, 32, float("-inf"), True),  # padding: decay exactly 1
]


@pytest.mark.parametrize("B,T,H,N,decay,with_state", CASES)
def test_kernel_matches_float64_reference(ops, B, T, H, N, decay, with_state):
    assert_matches_float64_reference(ops, B, T, H, N, decay, with_state)


ISA_TIERS = {"base": [], "avx2": ["-mavx2", "-mfma"]}


@pytest.mark.parametrize("tier", sorted(ISA_TIERS))
def test_lower_isa_tiers_match_float64_reference(ops, tier):
    # this machine builds its highest tier; the others (SSE / NEON-width vectors, AVX2) are what other CPUs and a
    # baseline Hub build get, from the same source
    if tier == "avx2" and not kernels_mod._cpu_has("avx2", "fma"):
        pytest.skip("this CPU cannot run an AVX2 build")
    tier_ops = wkv6_compiled.build("cpu", ["-O3", "-fno-trapping-math", "-fopenmp", "-DCPU_KERNEL"] + ISA_TIERS[tier])
    for case in [CASES[1], CASES[3], CASES[4], (2, 40, 3, 5, "per_channel", True)]:
        assert_matches_float64_reference(tier_ops, *case)
    inputs, state = make_inputs(2, 4, 1, 7, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in inputs] + [state.double().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *xs: KernelFunction.apply(tier_ops, *xs), leaves, fast_mode=True)


def assert_matches_float64_reference(ops, B, T, H, N, decay, with_state, device="cpu"):
    """Output, final state and every input gradient of the kernel (run on `device`) against the float64
    step-by-step reference (on the CPU)."""
    inputs, state = make_inputs(B, T, H, N, decay)
    state = state if with_state else None
    grad_y, grad_state = output_grads(B, T, H, N)
    y, s, grads = kernel_run(
        ops, [x.to(device) for x in inputs], None if state is None else state.to(device), grad_y.to(device),
        grad_state.to(device),
    )
    y_ref, s_ref, grads_ref = reference_run(inputs, state, grad_y, grad_state)
    assert y.dtype == s.dtype == torch.float32 and y.device.type == device
    assert_close_relative(y.cpu(), y_ref, 1e-5, "y")
    assert_close_relative(s.cpu(), s_ref, 1e-5, "final state")
    for name, g, g_ref in zip(["r", "k", "v", "w", "u", "initial state"], grads, grads_ref):
        assert torch.isfinite(g).all(), name
        assert_close_relative(g.cpu(), g_ref, 1e-4, f"d{name}")


def test_empty_sequence_passes_the_state_through(ops):
    inputs, state = make_inputs(2, 0, 3, 64)
    leaves = [x.requires_grad_() for x in inputs] + [state.requires_grad_()]
    y, s = KernelFunction.apply(ops, *leaves)
    assert y.shape == (2, 0, 3, 64)
    torch.testing.assert_close(s, state, rtol=0, atol=0)
    grad_state = torch.randn_like(state)
    (s * grad_state).sum().backward()
    torch.testing.assert_close(leaves[-1].grad, grad_state, rtol=0, atol=0)
    assert all(x.grad.shape == x.shape for x in leaves[:4])


def test_kernel_matches_torch_op(ops):
    inputs, state = make_inputs(2, 50, 2, 64)
    y, s = wkv6_compiled(*inputs, state)
    y_torch, s_torch = wkv6(*inputs, state)
    torch.testing.assert_close(y, y_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_torch, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N", [64, 5])
def test_gradcheck_float64(ops, N):
    inputs, state = make_inputs(2, 4, 1, N, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in inputs] + [state.double().requires_grad_()]
    assert torch.autograd.gradcheck(lambda *xs: KernelFunction.apply(ops, *xs), leaves, fast_mode=True)


def test_prefix_then_continuation_equals_full_run(ops):
    inputs, _ = make_inputs(2, 40, 2, 64)
    y_full, s_full = wkv6_compiled(*inputs)
    head = [x[:, :23] for x in inputs[:4]]
    tail = [x[:, 23:] for x in inputs[:4]]
    y_head, s_head = wkv6_compiled(*head, inputs[4])
    y_tail, s_tail = wkv6_compiled(*tail, inputs[4], s_head)
    torch.testing.assert_close(torch.cat([y_head, y_tail], 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_tail, s_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_state(ops, dtype):
    inputs, state = make_inputs(2, 21, 2, 64, dtype=dtype)
    grad_y = torch.randn(2, 21, 2, 64)
    grad_state = torch.randn(2, 2, 64, 64)
    y, s, grads = kernel_run(ops, inputs, state, grad_y, grad_state)
    # the reference sees exactly the rounded inputs, so only the kernel's fp32 arithmetic differs
    y_ref, s_ref, grads_ref = reference_run(inputs, state, grad_y, grad_state)
    assert y.dtype == s.dtype == torch.float32
    assert_close_relative(y, y_ref, 1e-5, "y")
    assert_close_relative(s, s_ref, 1e-5, "final state")
    for name, g, g_ref in zip(["r", "k", "v", "w", "u"], grads, grads_ref):
        assert g.dtype == dtype
        assert_close_relative(g, g_ref, 1e-2, f"d{name}")  # rounding the gradient itself to 8 / 11 bits


def test_failed_build_warns_once_and_matches_torch(monkeypatch):
    def failing_build(device_type, cflags=None):
        raise RuntimeError("Error building extension 'visualrwkv_wkv6_cpu': wkv6_cpu.cpp:12: error: expected ';'")

    monkeypatch.setattr(wkv6_compiled, "build", failing_build)
    monkeypatch.setattr(wkv6_compiled, "_loaded", {})
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    inputs, state = make_inputs(1, 9, 2, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = wkv6_compiled(*inputs, state)
        second = wkv6_compiled(*inputs, state)
    messages = [str(w.message) for w in caught if "WKV6" in str(w.message)]
    assert len(messages) == 1 and "could not be built" in messages[0] and BACKEND_ENV in messages[0]
    expected = wkv6(*inputs, state)
    for result in (first, second):
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_no_compiler_falls_back_without_a_word(monkeypatch, tmp_path, caplog):
    # a machine with neither a C++ compiler nor ninja on PATH, and no build in its cache: the torch op, silently
    extensions = tmp_path / "extensions"
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(wkv6_compiled, "_loaded", {})
    inputs, state = make_inputs(1, 9, 2, 16)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger=kernels_mod.__name__):
        warnings.simplefilter("error")
        result = wkv6_compiled(*inputs, state)
    torch.testing.assert_close(result, wkv6(*inputs, state), rtol=0, atol=0)
    assert not wkv6_compiled.available("cpu") and not extensions.exists()
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert "no C++ compiler" in caplog.records[0].getMessage()


def test_a_cached_build_loads_without_a_compiler(ops, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(wkv6_compiled, "_loaded", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wkv6_compiled.available("cpu")


class RecordingOps:
    """The compiled ops, keeping the output gradient their backward receives."""

    def __init__(self, ops):
        self.forward, self.compiled_backward, self.grad_y = ops.forward, ops.backward, None

    def backward(self, *args):
        self.grad_y = args[-2]
        return self.compiled_backward(*args)


def test_state_only_loss_gets_a_zero_output_gradient_in_the_outputs_dtype(ops):
    # only the final state reaches the loss: the wrapper hands the backward a zero y gradient, float64 for float64
    # inputs (whose y is float64), not a float32 one
    inputs, state = make_inputs(2, 5, 1, 8, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in inputs] + [state.double().requires_grad_()]
    recording = RecordingOps(ops)
    y, s = KernelFunction.apply(recording, *leaves)
    s.sum().backward()
    assert recording.grad_y.dtype == y.dtype == torch.float64 and not recording.grad_y.any()
    assert torch.autograd.gradcheck(lambda *xs: KernelFunction.apply(ops, *xs)[1], leaves, fast_mode=True)


def test_an_op_name_registers_once():
    with pytest.raises(ValueError, match="'wkv6' is already registered"):
        CompiledOp("wkv6", sources={}, headers=[], fallback=wkv6, check_inputs=None, layer_name="WKV6")


def test_env_switch_forces_torch_without_building(monkeypatch):
    def unexpected_build(device_type, cflags=None):
        raise AssertionError("the torch backend must not build anything")

    monkeypatch.setattr(wkv6_compiled, "build", unexpected_build)
    monkeypatch.setattr(wkv6_compiled, "_loaded", {})
    monkeypatch.setenv(BACKEND_ENV, "torch")
    inputs, state = make_inputs(1, 9, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = wkv6_compiled(*inputs, state)
    torch.testing.assert_close(result, wkv6(*inputs, state), rtol=0, atol=0)
    assert not wkv6_compiled.available("cpu")
    monkeypatch.setenv(BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        kernels_mod.wkv_backend()


def test_set_backend_overrides_env(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "auto")
    set_wkv_backend("torch")
    try:
        assert kernels_mod.wkv_backend() == "torch"
    finally:
        set_wkv_backend(None)
    with pytest.raises(ValueError):
        set_wkv_backend("fast")


def test_import_builds_nothing():
    code = (
        "import visualrwkv_hf, visualrwkv_hf.ops.kernels as k; "
        "assert [op._loaded for op in k.COMPILED_OPS.values()] == [{}]; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_extension_name_carries_the_flags():
    base = wkv6_compiled.extension_name("cpu", ["-O3", "-fopenmp", "-DCPU_KERNEL"])
    avx2 = wkv6_compiled.extension_name("cpu", ["-O3", "-fopenmp", "-DCPU_KERNEL", "-mavx2", "-mfma"])
    avx512 = wkv6_compiled.extension_name(
        "cpu", ["-O3", "-fopenmp", "-DCPU_KERNEL", "-mavx2", "-mfma"] + [f"-m{f}" for f in kernels_mod.AVX512_FEATURES]
    )
    assert len({base, avx2, avx512}) == 3
    assert "_base_" in base and "_avx2_" in avx2 and "_avx512_" in avx512


def tiny_model():
    from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM

    config = Rwkv6Config(
        vocab_size=64, hidden_size=128, num_hidden_layers=2, head_size=64, time_mix_extra_dim=8,
        time_decay_extra_dim=16, initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = Rwkv6ForCausalLM(config).eval()
    with torch.no_grad():  # data-dependent decays, as in a trained model
        for block in model.model.blocks:
            block.attention.time_decay_w1.normal_(0, 0.3)
    return model


def assert_model_kernel_equals_torch_path(device, length):
    """Logits and every parameter gradient of a model on `device` with the kernel equal those with the torch op."""
    model = tiny_model().to(device)
    ids = torch.randint(0, 64, (2, length), device=device)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    set_wkv_backend("torch")
    try:
        out_torch = model(ids, labels=ids)
        out_torch.loss.backward()
    finally:
        set_wkv_backend(None)
    torch.testing.assert_close(out.logits, out_torch.logits, rtol=1e-4, atol=1e-4)
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_model_kernel_equals_torch_path(ops):
    assert_model_kernel_equals_torch_path("cpu", 19)


def test_loading_and_switching_modes_logs_no_warning(tmp_path, caplog):
    # transformers kernelizes at from_pretrained and at every train() / eval() with a mapping that has no WKV6: the
    # layer's own forward is already the kernel path, so nothing is wrong and nothing should be said.
    from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM

    # a vocabulary that holds the default end of turn (261), whose absence would rightly be warned about
    config = Rwkv6Config(vocab_size=512, hidden_size=32, num_hidden_layers=2, head_size=8)
    Rwkv6ForCausalLM(config).save_pretrained(tmp_path)

    with caplog.at_level(logging.WARNING):
        model = Rwkv6ForCausalLM.from_pretrained(tmp_path)
        model.train()
        model.eval()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def assert_kernelize_maps_wkv6_to_the_local_build(device, mode_name):
    from kernels import Mode, kernelize, use_kernel_mapping

    model = tiny_model().to(device)
    ids = torch.randint(0, 64, (1, 11), device=device)
    expected = model(ids).logits
    repository = wkv6_compiled.repository()
    mode = getattr(Mode, mode_name)
    with use_kernel_mapping({"WKV6": {device: {mode: repository}}}, inherit_mapping=False):
        kernelize(model, mode=mode, device=device)
    layer = model.model.blocks[0].attention.wkv
    # the repository's layer, not WKV6.forward
    assert layer._kernel_repo == repository and layer.forward.__func__ is not WKV6.forward
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode_name", ["INFERENCE", "TRAINING"])
def test_kernelize_maps_wkv6_to_the_local_build(ops, mode_name):
    assert_kernelize_maps_wkv6_to_the_local_build("cpu", mode_name)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_ops():
    set_wkv_backend("auto")
    compiled = wkv6_compiled.kernel_for("cuda", 64)
    set_wkv_backend(None)
    # on a machine with a GPU the CUDA build is part of the package: a failure fails, never skips
    assert compiled is not None, "the CUDA WKV6 kernel failed to build (see the warning)"
    return compiled


CUDA_CASES = CASES + [
    (2, 300, 4, 64, "per_channel", True),  # longer than any unrolled or chunked inner loop
    (1, 45, 2, 128, "per_channel", True),
    (2, 19, 3, 16, "per_channel", False),
]


@needs_cuda
@pytest.mark.parametrize("B,T,H,N,decay,with_state", CUDA_CASES)
def test_cuda_kernel_matches_float64_reference(cuda_ops, B, T, H, N, decay, with_state):
    assert_matches_float64_reference(cuda_ops, B, T, H, N, decay, with_state, device="cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_inputs(cuda_ops, dtype):
    inputs, state = make_inputs(2, 45, 2, 64, dtype=dtype)
    grad_y = torch.randn(2, 45, 2, 64)
    grad_state = torch.randn(2, 2, 64, 64)
    y, s, grads = kernel_run(cuda_ops, [x.cuda() for x in inputs], state.cuda(), grad_y.cuda(), grad_state.cuda())
    y_ref, s_ref, grads_ref = reference_run(inputs, state, grad_y, grad_state)
    assert y.dtype == s.dtype == torch.float32
    assert_close_relative(y.cpu(), y_ref, 1e-5, "y")
    assert_close_relative(s.cpu(), s_ref, 1e-5, "final state")
    for name, g, g_ref in zip(["r", "k", "v", "w", "u"], grads, grads_ref):
        assert g.dtype == dtype
        assert_close_relative(g.cpu(), g_ref, 1e-2, f"d{name}")


@needs_cuda
def test_cuda_dispatch_and_torch_fallback(cuda_ops):
    inputs, state = make_inputs(2, 30, 2, 64)
    on_gpu = [x.cuda() for x in inputs]
    assert wkv6_compiled.available("cuda", 64) and not wkv6_compiled.available("cuda", 40)
    y, s = wkv6_compiled(*on_gpu, state.cuda())
    y_torch, s_torch = wkv6(*on_gpu, state.cuda())
    torch.testing.assert_close(y, y_torch, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_torch, rtol=1e-4, atol=1e-4)
    odd, odd_state = make_inputs(1, 12, 1, 40)  # no CUDA instantiation for 40: the torch op, same contract
    y_odd, s_odd = wkv6_compiled(*[x.cuda() for x in odd], odd_state.cuda())
    y_ref, s_ref = reference_float64(*odd, odd_state)
    assert_close_relative(y_odd.cpu(), y_ref, 1e-4, "y (head size 40)")


@needs_cuda
def test_cuda_model_kernel_equals_torch_path(cuda_ops):
    assert_model_kernel_equals_torch_path("cuda", 37)


@needs_cuda
def test_cuda_generate_cached_equals_recompute(cuda_ops):
    model = tiny_model().cuda()
    prompt = torch.randint(0, 64, (1, 23), device="cuda")
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    # full recompute of every prefix, argmax of the last position: the original repository's decode strategy
    ids = prompt
    for _ in range(12):
        next_id = model(ids, use_cache=False).logits[:, -1].float().argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


@needs_cuda
def test_cuda_bf16_training_step_lowers_loss(cuda_ops):
    model = tiny_model().to("cuda", torch.bfloat16).train()
    ids = torch.randint(0, 64, (4, 64), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


@needs_cuda
@pytest.mark.parametrize("mode_name", ["INFERENCE", "TRAINING"])
def test_cuda_kernelize_maps_wkv6_to_the_local_build(cuda_ops, mode_name):
    assert_kernelize_maps_wkv6_to_the_local_build("cuda", mode_name)
