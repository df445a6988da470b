"""The fused mixing functions against the plain torch expressions they replace: values and gradients."""

import pytest
import torch

from visualrwkv_hf.ops.mixing import relu_squared, slot_lerp


def lerp_inputs(dtype=torch.float64, slots=5, shape=(2, 7, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, dx = (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(2))
    mix = torch.randn(slots, *shape, generator=g, dtype=dtype)
    maa = torch.randn(slots, shape[-1], generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (x, dx, mix, maa)]


def plain_lerp(x, dx, mix, maa):
    return [x + dx * (maa[s] + mix[s]) for s in range(mix.shape[0])]


def test_slot_lerp_passes_gradcheck():
    assert torch.autograd.gradcheck(lambda *a: slot_lerp(*a), lerp_inputs())


@pytest.mark.parametrize("used", [(0, 1, 2, 3, 4), (1, 3)])
def test_slot_lerp_matches_the_plain_form(used):
    """Values and gradients; an unused slot (None gradient) contributes nothing."""
    inputs = lerp_inputs(torch.float32)
    weights = [torch.randn(2, 7, 12) for _ in range(5)]
    results = []
    for form in (slot_lerp, plain_lerp):
        outputs = form(*inputs)
        loss = sum((outputs[s] * weights[s]).sum() for s in used)
        results.append([o.detach() for o in outputs] + list(torch.autograd.grad(loss, inputs)))
    for ours, plain in zip(*results):
        torch.testing.assert_close(ours, plain)


def test_slot_lerp_keeps_bf16():
    outputs = slot_lerp(*(t.detach().bfloat16() for t in lerp_inputs()))
    assert all(o.dtype == torch.bfloat16 for o in outputs)


def test_slot_lerp_refuses_mismatched_shapes():
    x, dx, mix, maa = (t.detach() for t in lerp_inputs())
    with pytest.raises(ValueError, match=r"maa \(S, C\)"):
        slot_lerp(x, dx, mix, maa[:, :5])


def test_relu_squared_matches_the_plain_form():
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(relu_squared, (x,))
    grad = torch.randn(3, 40, dtype=torch.float64)
    ours = torch.autograd.grad(relu_squared(x), x, grad)[0]
    plain = torch.autograd.grad(torch.relu(x) ** 2, x, grad)[0]
    torch.testing.assert_close(relu_squared(x), torch.relu(x) ** 2)
    torch.testing.assert_close(ours, plain)
