"""`DecodeLinear` and its compiled few-row kernel: equal to `F.linear` to float32 rounding wherever the kernel runs,
`F.linear` itself wherever it must not (gradients needed, other dtypes or devices, many rows, the switch off), and
transparent to what wraps an nn.Linear (PEFT LoRA) and to the models' decode.

Whether the kernel ran is read from the profiler: its op is `visualrwkv_linear_cpu_<...>::forward`. The first test
that needs the kernel builds it (~60 s once per machine); those tests skip where it cannot be built.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from visualrwkv_hf.ops import DecodeLinear, decode_linear, linear_compiled, set_wkv_backend
from visualrwkv_hf.ops.linear import MAX_KERNEL_ROWS

from test_modeling_rwkv6 import tiny_model as tiny_rwkv6
from test_modeling_rwkv7 import tiny_model as tiny_rwkv7


@pytest.fixture(scope="module")
def ops():
    set_wkv_backend("auto")
    compiled = linear_compiled.kernel_for("cpu", 0)
    set_wkv_backend(None)
    if compiled is None:
        pytest.skip("the linear CPU kernel cannot be built here")
    return compiled


@pytest.fixture
def auto_backend(ops):
    set_wkv_backend("auto")
    yield
    set_wkv_backend(None)


def kernel_calls(run):
    """`run()` and how many times the compiled linear kernel ran in it."""
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    calls = sum(e.count for e in prof.key_averages() if e.key.startswith("visualrwkv_linear_cpu"))
    return result, calls


@pytest.mark.parametrize("rows", range(1, 10))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features,out_features", [(37, 53), (768, 130), (1, 5), (203, 16)])
def test_kernel_equals_f_linear(ops, rows, bias, in_features, out_features):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    exact = F.linear(x.double(), weight.double(), None if b is None else b.double())
    # float32 rounding of a sum of `in_features` unit-variance products (sums of size ~30 here)
    tolerance = 4e-6 * in_features**0.5
    torch.testing.assert_close(ops.forward(x, weight, b).double(), exact, rtol=1e-5, atol=tolerance)
    assert (F.linear(x, weight, b).double() - exact).abs().max() <= tolerance  # the bar F.linear meets


@torch.no_grad()
@pytest.mark.parametrize("shape", [(1, 1, 45), (3, 1, 45), (2, 3, 45), (45,)])
def test_layer_runs_the_kernel_for_few_rows_and_equals_f_linear(auto_backend, shape):
    torch.manual_seed(0)
    layer = DecodeLinear(45, 29, bias=True)
    # a non-contiguous input: every other column of a wider tensor
    x = torch.randn(*shape[:-1], 90)[..., ::2]
    y, calls = kernel_calls(lambda: layer(x))
    assert calls == 1
    assert y.shape == (*shape[:-1], 29)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_many_rows_non_contiguous_weights_and_the_switch_run_f_linear(auto_backend):
    torch.manual_seed(0)
    layer = DecodeLinear(16, 8, bias=False)
    many = torch.randn(MAX_KERNEL_ROWS + 1, 16)
    y, calls = kernel_calls(lambda: layer(many))
    assert calls == 0 and torch.equal(y, F.linear(many, layer.weight))
    transposed = torch.randn(16, 8).t()
    x = torch.randn(1, 16)
    y, calls = kernel_calls(lambda: decode_linear(x, transposed))
    assert calls == 0 and torch.equal(y, F.linear(x, transposed))
    set_wkv_backend("torch")
    y, calls = kernel_calls(lambda: layer(x))
    assert calls == 0 and torch.equal(y, F.linear(x, layer.weight))


def test_gradients_flow_through_f_linear_where_needed(auto_backend):
    torch.manual_seed(0)
    layer = DecodeLinear(12, 7, bias=True)
    x = torch.randn(1, 12, requires_grad=True)
    # parameters requiring grad, grad mode on: the kernel has no backward, so F.linear runs
    y, calls = kernel_calls(lambda: layer(x))
    assert calls == 0
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    weight, bias = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    F.linear(x_ref, weight, bias).square().sum().backward()
    for got, expected in [(x.grad, x_ref.grad), (layer.weight.grad, weight.grad), (layer.bias.grad, bias.grad)]:
        torch.testing.assert_close(got, expected)
    # only the input needs a gradient (frozen layer): still F.linear
    layer.requires_grad_(False)
    x.grad = None
    y, calls = kernel_calls(lambda: layer(x))
    assert calls == 0 and y.requires_grad
    # nothing needs one: the kernel
    _, calls = kernel_calls(lambda: layer(x.detach()))
    assert calls == 1


@torch.no_grad()
def test_other_dtypes_and_devices_run_f_linear(auto_backend):
    torch.manual_seed(0)
    layer = DecodeLinear(10, 6).to(torch.bfloat16)
    x = torch.randn(1, 10, dtype=torch.bfloat16)
    y, calls = kernel_calls(lambda: layer(x))
    assert calls == 0 and torch.equal(y, F.linear(x, layer.weight, layer.bias))
    meta = DecodeLinear(10, 6, device="meta")
    assert meta(torch.empty(1, 10, device="meta")).shape == (1, 6)


def test_direct_calls_with_bad_inputs_get_clear_errors(ops, auto_backend):
    with pytest.raises(ValueError, match="x must be \\(rows, in\\) and weight \\(out, in\\)"):
        linear_compiled(torch.randn(2, 5), torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="bias must be \\(3,\\)"):
        linear_compiled(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4))
    with pytest.raises(TypeError, match="float32 CPU tensors"):
        linear_compiled(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), None)


def test_models_keep_nn_linear_types_and_state_dict_keys():
    model = tiny_rwkv7()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linears and "model.blocks.0.attention.att_key" in linears
    assert all(type(m) is DecodeLinear for m in linears.values())
    assert all(f"{name}.weight" in model.state_dict() for name in linears)


@torch.no_grad()
def test_peft_lora_outputs_survive_the_kernel(auto_backend):
    from peft import get_peft_model

    from visualrwkv_hf import lora_config

    # init_lora_weights=False: random B, so the adapters change the output from the first token
    model = get_peft_model(tiny_rwkv7(), lora_config("language_model", r=2, init_lora_weights=False)).eval()
    ids = torch.tensor([[5, 17, 3]])
    logits, calls = kernel_calls(lambda: model(ids[:, :1]).logits)
    assert calls > 0  # the adapted layers' base products and the head ran the kernel
    with model.disable_adapter():
        base = model(ids[:, :1]).logits
    assert not torch.allclose(logits, base, atol=1e-3)
    set_wkv_backend("torch")
    torch.testing.assert_close(logits, model(ids[:, :1]).logits, rtol=1e-5, atol=1e-5)


def decode_scores(model, ids, steps=6):
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@torch.no_grad()
@pytest.mark.parametrize("tiny_model", [tiny_rwkv6, tiny_rwkv7], ids=["rwkv6", "rwkv7"])
def test_model_decode_with_the_kernel_equals_without(auto_backend, tiny_model):
    model = tiny_model()
    ids = torch.tensor([[5, 17, 3, 44, 9], [8, 2, 61, 30, 12]])
    (sequences, scores), calls = kernel_calls(lambda: decode_scores(model, ids))
    assert calls > 0
    set_wkv_backend("torch")
    (expected_sequences, expected_scores), calls = kernel_calls(lambda: decode_scores(model, ids))
    assert calls == 0
    assert torch.equal(sequences, expected_sequences)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_the_linear_op_has_no_kernels_layer():
    with pytest.raises(ValueError, match="no `kernels` layer"):
        linear_compiled.repository()
