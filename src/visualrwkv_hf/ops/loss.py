"""Every training loss of the package: next-token cross-entropy without the full log-softmax (the models'
`loss_function`, `causal_lm_loss`), the original VisualRWKV's sample-level reduction of it, and their forms for
Trainer's `compute_loss_func`.

`F.cross_entropy` keeps a (tokens, vocab) log-softmax from the forward to the backward and builds the gradient in
three more full passes (a zero-filled tensor, a scatter, the log-softmax backward). Here the forward keeps one
log-sum-exp per token and the backward writes softmax - one-hot straight into the gradient, row block by row block:
one (tokens, vocab) tensor less alive during the step (512 MiB for 2048 tokens of RWKV's 65536-token vocabulary),
and less time (docs/benchmarks.md, benchmarks/bench_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# rows per block: a block's temporaries stay small (256 x 65536 floats = 64 MB) and cache-friendlier than one pass
ROW_BLOCK = 256


class _TokenCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        log_sum_exp = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
        for rows in zip(logits.split(ROW_BLOCK), log_sum_exp.split(ROW_BLOCK)):
            torch.logsumexp(rows[0], -1, out=rows[1])
        losses = (log_sum_exp - logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1)) * valid
        ctx.save_for_backward(logits, safe_targets, valid, log_sum_exp)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        logits, safe_targets, valid, log_sum_exp = ctx.saved_tensors
        scale = grad_losses * valid
        grad = torch.empty_like(logits)
        for block, source, lse, s in zip(
            grad.split(ROW_BLOCK), logits.split(ROW_BLOCK), log_sum_exp.split(ROW_BLOCK), scale.split(ROW_BLOCK)
        ):
            torch.sub(source, lse.unsqueeze(1), out=block).exp_().mul_(s.unsqueeze(1))  # softmax * scale
        grad.scatter_add_(1, safe_targets.unsqueeze(1), -scale.unsqueeze(1))  # minus the one-hot
        return grad, None, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.LongTensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy of `logits` (tokens, vocab) against `targets` (tokens,), 0 where the target is
    `ignore_index`; differentiable in the logits. Same values and gradients as
    `F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")`."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"token_cross_entropy expects logits (tokens, vocab) and targets (tokens,); got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}.")
    return _TokenCrossEntropy.apply(logits, targets, ignore_index)


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.LongTensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` (same arguments, same value) through `token_cross_entropy`: the logits in
    float32, labels shifted one left (or `shift_labels` as given), the mean over valid labels, or their sum divided
    by `num_items_in_batch` (Trainer's count over a whole optimizer step)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.float().reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    total = token_cross_entropy(logits, targets, ignore_index).sum()
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def sample_level_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.LongTensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """
    The original VisualRWKV's loss: each sample's mean next-token cross-entropy over its valid labels (labels shifted
    one left, `ignore_index` ignored), then the mean over the samples that have any, so short answers weigh as much
    as long ones.

    Trainer passes `num_items_in_batch` (valid labels of the whole optimizer step: all gradient-accumulation steps
    and, by default, all processes) and expects losses normalized by it, as token-level ones are. The mean of this
    call is then scaled by its share of those labels, so the step combines its calls as it combines token-level
    losses (exactly the sample-level mean for one call per step; otherwise each call's sample-level mean weighted by
    its share of the valid labels).
    """
    # position t predicts label t + 1; the last position predicts nothing, so the logits need no slicing copy
    targets = F.pad(labels.to(logits.device), (0, 1), value=ignore_index)[:, 1:]
    valid = targets != ignore_index
    weights = valid / valid.sum(1, keepdim=True).clamp(min=1)
    token_losses = token_cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index)
    loss = (weights * token_losses.view_as(weights)).sum() / weights.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss * valid.sum() / num_items_in_batch
    return loss


# Trainer's `compute_loss_func(outputs, labels, num_items_in_batch=...)` forms: Trainer then calls the model without
# the labels and hands them here with the model's outputs.


def sample_level_loss(outputs, labels: torch.LongTensor, num_items_in_batch=None) -> torch.Tensor:
    """`Trainer(compute_loss_func=sample_level_loss)`: the sample-level loss (`sample_level_causal_lm_loss`)
    instead of the model's token-level one."""
    return sample_level_causal_lm_loss(outputs.logits, labels, num_items_in_batch)


def kept_logits_loss(outputs, labels: torch.LongTensor, num_items_in_batch=None) -> torch.Tensor:
    """`Trainer(compute_loss_func=kept_logits_loss)` for batches that ask for logits of their last positions only
    (`logits_to_keep`, an int or the trailing positions): the token-level loss of those logits against the labels
    they predict, the last ones of each row."""
    logits = outputs.logits
    shift_labels = labels[:, -logits.shape[1] :]
    return causal_lm_loss(logits, None, logits.shape[-1], num_items_in_batch, shift_labels=shift_labels)
