"""The fused mixing functions against the plain torch expressions they replace: values and gradients."""

import pytest
import torch

from visualrwkv_hf.ops.mixing import relu_squared, slot_lerp


def lerp_inputs(dtype=torch.float64, slots=5, shape=(2, 7, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, dx = (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(2))
    weights = torch.randn(slots, *shape, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dx, weights)]


def plain_lerp(x, dx, weights, overwrite_weights=False):
    return [x + dx * weights[s] for s in range(weights.shape[0])]


def test_slot_lerp_passes_gradcheck():
    assert torch.autograd.gradcheck(lambda *a: slot_lerp(*a), lerp_inputs())


@pytest.mark.parametrize("used", [(0, 1, 2, 3, 4), (1, 3)])
def test_slot_lerp_matches_the_plain_form(used):
    """Values and gradients; an unused slot (None gradient) contributes nothing. Asked to overwrite its weights, it
    leaves them alone when they are needed for the gradient."""
    inputs = lerp_inputs(torch.float32)
    before = inputs[2].detach().clone()
    grads_out = [torch.randn(2, 7, 12) for _ in range(5)]
    results = []
    for form in (slot_lerp, plain_lerp):
        outputs = form(*inputs, overwrite_weights=True)
        loss = sum((outputs[s] * grads_out[s]).sum() for s in used)
        results.append([o.detach() for o in outputs] + list(torch.autograd.grad(loss, inputs)))
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain)
    assert torch.equal(inputs[2].detach(), before)


@pytest.mark.parametrize("overwrite", [False, True])
def test_slot_lerp_without_gradients(overwrite):
    """Inference: the same values; the outputs go into the weights' memory only when asked."""
    x, dx, weights = (t.detach() for t in lerp_inputs(torch.float32))
    before = weights.clone()
    expected = plain_lerp(x, dx, weights)
    with torch.inference_mode():
        outputs = slot_lerp(x, dx, weights, overwrite_weights=overwrite)
    for ours, plain in zip(outputs, expected):
        torch.testing.assert_close(ours, plain)
    assert (outputs[0].data_ptr() == weights.data_ptr()) == overwrite
    assert torch.equal(weights, before) != overwrite


def test_slot_lerp_keeps_bf16():
    outputs = slot_lerp(*(t.detach().bfloat16() for t in lerp_inputs()))
    assert all(o.dtype == torch.bfloat16 for o in outputs)


def test_slot_lerp_refuses_mismatched_shapes():
    x, dx, weights = (t.detach() for t in lerp_inputs())
    with pytest.raises(ValueError, match=r"weights \(S, \.\.\., C\)"):
        slot_lerp(x, dx, weights[..., :5])


def test_relu_squared_matches_the_plain_form():
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_squared, (x,))
    grad = torch.randn(3, 40, dtype=torch.float64)
    ours = torch.autograd.grad(relu_squared(x), x, grad)[0]
    plain = torch.autograd.grad(torch.relu(x) ** 2, x, grad)[0]
    torch.testing.assert_close(relu_squared(x), torch.relu(x) ** 2)
    torch.testing.assert_close(ours, plain)


def test_relu_squared_without_gradients_leaves_its_input():
    x = torch.randn(3, 40)
    before = x.clone()
    with torch.inference_mode():
        out = relu_squared(x)
    torch.testing.assert_close(out, torch.relu(before) ** 2)
    assert torch.equal(x, before)
