"""Next-token cross-entropy without the full log-softmax: the model's training loss.

`F.cross_entropy` keeps a (tokens, vocab) log-softmax from the forward to the backward and builds the gradient in
three more full passes (a zero-filled tensor, a scatter, the log-softmax backward). Here the forward keeps one
log-sum-exp per token and the backward writes softmax - one-hot straight into the gradient, row block by row block:
one (tokens, vocab) tensor less alive during the step (512 MiB for 2048 tokens of RWKV's 65536-token vocabulary)
and 1.1-1.8x less time for the loss itself (2048 tokens, vocabulary 65536 / 4096, CPU; benchmarks/bench_loss.py).
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
