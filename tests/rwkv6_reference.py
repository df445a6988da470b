"""Test helpers: random RWKV-6 checkpoints in BlinkDL's .pth layout, and BlinkDL's `rwkv` package as the oracle."""

import os
from pathlib import Path

import torch


def random_blinkdl_rwkv6(
    hidden_size: int,
    head_size: int,
    num_layers: int,
    vocab_size: int = 65536,
    mix_rank: int = 32,
    decay_rank: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random x060 state dict in BlinkDL's layout, with value ranges like a trained model's.

    Decays span about [-6, 1] per channel, mixing coefficients [0, 1], bonus u about +-0.5, LayerNorm weights near 1,
    and full-size (not near-zero) LoRA weights, so the data-dependent token shift and decay really matter.
    """
    g = torch.Generator().manual_seed(seed)
    C, N, V = hidden_size, head_size, vocab_size
    F = int((C * 3.5) // 32 * 32)

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    def linear(out_features, in_features):
        return normal(out_features, in_features, std=in_features**-0.5)

    def layer_norm(name):
        return {f"{name}.weight": 1 + normal(C, std=0.1), f"{name}.bias": normal(C, std=0.05)}

    sd = {"emb.weight": normal(V, C)}
    for i in range(num_layers):
        b = f"blocks.{i}."
        if i == 0:
            sd.update(layer_norm(f"{b}ln0"))
        sd.update(layer_norm(f"{b}ln1"))
        sd.update(layer_norm(f"{b}ln2"))
        for slot in "xwkvrg":
            sd[f"{b}att.time_maa_{slot}"] = uniform(1, 1, C)
        sd[f"{b}att.time_maa_w1"] = normal(C, 5 * mix_rank, std=C**-0.5)
        sd[f"{b}att.time_maa_w2"] = normal(5, mix_rank, C, std=0.1)
        sd[f"{b}att.time_decay"] = uniform(1, 1, C, low=-6.0, high=1.0)
        sd[f"{b}att.time_decay_w1"] = normal(C, decay_rank, std=C**-0.5)
        sd[f"{b}att.time_decay_w2"] = normal(decay_rank, C, std=0.1)
        sd[f"{b}att.time_faaaa"] = uniform(C // N, N, low=-0.5, high=0.5)
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[f"{b}att.{name}.weight"] = linear(C, C)
        sd.update(layer_norm(f"{b}att.ln_x"))
        sd[f"{b}ffn.time_maa_k"] = uniform(1, 1, C)
        sd[f"{b}ffn.time_maa_r"] = uniform(1, 1, C)
        sd[f"{b}ffn.key.weight"] = linear(F, C)
        sd[f"{b}ffn.receptance.weight"] = linear(C, C)
        sd[f"{b}ffn.value.weight"] = linear(C, F)
    sd.update(layer_norm("ln_out"))
    sd["head.weight"] = linear(V, C)
    return sd


def save_checkpoint(state_dict, path) -> Path:
    torch.save(state_dict, path)
    return Path(path)


def tiny_checkpoint(seed=0, **overrides) -> dict[str, torch.Tensor]:
    """A very small x060 state dict for the error, file and round-trip tests (the oracle is not involved)."""
    kwargs = dict(hidden_size=32, head_size=8, num_layers=2, vocab_size=300, mix_rank=4, decay_rank=6, seed=seed)
    kwargs.update(overrides)
    return random_blinkdl_rwkv6(**kwargs)


def reference_rwkv(path, strategy="cpu fp32"):
    """BlinkDL's `rwkv` package on a .pth, fp32 on CPU by default: plain PyTorch (no TorchScript, no CUDA kernels)."""
    # Read when rwkv.model is first imported, so they must be set before.
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    return RWKV(str(path), strategy=strategy, verbose=False)
