"""The losses against torch's and transformers' own (the oracles) or by hand: values and gradients."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from transformers.modeling_outputs import CausalLMOutputWithPast

from visualrwkv_hf.ops.loss import (
    causal_lm_loss,
    kept_logits_loss,
    sample_level_causal_lm_loss,
    sample_level_loss,
    token_cross_entropy,
)

loss_module = sys.modules["visualrwkv_hf.ops.loss"]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    """Blocks of 4 rows, so the tests' few tokens span several blocks and a ragged last one."""
    monkeypatch.setattr(loss_module, "ROW_BLOCK", 4)


def batch(dtype=torch.float32, B=2, T=9, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # e.g. a prompt
    labels[1, -2] = -100
    return logits, labels


def value_and_grad(loss_fn, logits, *args, **kwargs):
    leaf = logits.detach().clone().requires_grad_()
    loss = loss_fn(leaf, *args, **kwargs)
    loss.backward()
    return loss.detach(), leaf.grad


def test_token_cross_entropy_matches_torch():
    logits, labels = batch()
    logits, targets = logits.flatten(0, 1), labels.flatten()
    weights = torch.rand(targets.shape[0])
    ours = value_and_grad(lambda x: (token_cross_entropy(x, targets) * weights).sum(), logits)
    torch_ = value_and_grad(lambda x: (F.cross_entropy(x, targets, reduction="none") * weights).sum(), logits)
    for a, b in zip(ours, torch_):
        torch.testing.assert_close(a, b)
    assert (token_cross_entropy(logits, targets)[targets == -100] == 0).all()


def test_token_cross_entropy_gradcheck():
    logits = torch.randn(11, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (11,))
    targets[3] = -100
    assert torch.autograd.gradcheck(lambda x: token_cross_entropy(x, targets), (logits,))


def assert_same_as_transformers(logits, labels, **kwargs):
    ours = value_and_grad(causal_lm_loss, logits, labels, vocab_size=logits.shape[-1], **kwargs)
    theirs = value_and_grad(ForCausalLMLoss, logits, labels, vocab_size=logits.shape[-1], **kwargs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("num_items", [None, 11, torch.tensor(11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_equals_transformers(num_items, dtype):
    assert_same_as_transformers(*batch(dtype), num_items_in_batch=num_items)


def test_causal_lm_loss_with_given_shift_labels_and_ignore_index():
    logits, labels = batch()
    shift_labels = labels.masked_fill(labels == -100, 5)
    assert_same_as_transformers(logits, None, shift_labels=shift_labels, ignore_index=5)


def test_all_labels_ignored_gives_nan_as_transformers_does():
    logits, labels = batch()
    labels[:] = -100
    ours = causal_lm_loss(logits, labels, vocab_size=logits.shape[-1])
    theirs = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    assert math.isnan(ours.item()) and math.isnan(theirs.item())


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match=r"logits \(tokens, vocab\)"):
        token_cross_entropy(torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="floating point"):
        token_cross_entropy(torch.zeros(4, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_sample_level_loss_by_hand():
    """Each sample's mean over its valid targets, then the mean over the samples (not over all targets)."""
    logits, labels = batch(T=12)
    labels[1, :9] = -100  # row 1 trains 2 targets, row 0 many: the reductions differ
    per_sample, counts = [], []
    for row in range(2):
        losses = [
            -F.log_softmax(logits[row, position - 1].double(), -1)[labels[row, position]]
            for position in range(1, labels.shape[1])
            if labels[row, position] != -100
        ]
        per_sample.append(sum(losses) / len(losses))
        counts.append(len(losses))
    expected = sum(per_sample) / 2
    torch.testing.assert_close(sample_level_causal_lm_loss(logits, labels).double(), expected, rtol=1e-6, atol=0)
    assert not math.isclose(float(causal_lm_loss(logits, labels, 37)), float(expected), rel_tol=1e-3)
    # Under Trainer, a call's loss is scaled by its share of the step's valid labels.
    scaled = sample_level_causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(3 * sum(counts)))
    torch.testing.assert_close(scaled.double(), expected / 3, rtol=1e-6, atol=0)
    # a row without targets counts for nothing
    no_targets = torch.cat([labels, torch.full((1, 12), -100)])
    logits3 = torch.cat([logits, logits[:1]])
    torch.testing.assert_close(sample_level_causal_lm_loss(logits3, no_targets), sample_level_causal_lm_loss(logits, labels))


def test_sample_level_loss_gradient_matches_autograd_through_torch():
    logits, labels = batch()
    ours = value_and_grad(sample_level_causal_lm_loss, logits, labels)

    def reference(logits, labels):
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
        return torch.stack([row[t != -100].mean() for row, t in zip(losses, targets)]).mean()

    expected = value_and_grad(reference, logits, labels)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_trainer_forms_read_the_model_outputs():
    logits, labels = batch()
    outputs = CausalLMOutputWithPast(logits=logits)
    assert torch.equal(sample_level_loss(outputs, labels, 7), sample_level_causal_lm_loss(logits, labels, 7))
    # logits kept for the last 3 positions predict the last 3 labels of each row
    kept = CausalLMOutputWithPast(logits=logits[:, -4:-1].contiguous())
    expected = ForCausalLMLoss(kept.logits, None, 37, 5, shift_labels=labels[:, -3:].contiguous())
    torch.testing.assert_close(kept_logits_loss(kept, labels, 5), expected)
