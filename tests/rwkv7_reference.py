"""Test helpers: random RWKV-7 checkpoints in BlinkDL's .pth layout, and BlinkDL's `rwkv` package as the oracle.

The package switches to RWKV-7 with `RWKV_V7_ON=1`, read when `rwkv.model` is first imported, after which that
process's `rwkv.model.RWKV` is the x070 model only (and TorchScript is on). The RWKV-6 tests import the same module
without it, so the oracle runs in a subprocess: `run_reference` executes this file as a script.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def random_blinkdl_rwkv7(
    hidden_size: int,
    head_size: int,
    num_layers: int,
    vocab_size: int = 65536,
    ranks: tuple[int, int, int, int] = (64, 64, 32, 128),
    intermediate_size: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A random x070 state dict in BlinkDL's layout (decay, a, v, gate LoRA ranks `ranks`), with value ranges like a
    trained model's: mixes in [0, 1], decay biases spanning fast to slow, full-size LoRA weights (so the data-dependent
    decay, learning rate, gate and value residual all matter), LayerNorm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    C, N, V = hidden_size, head_size, vocab_size
    F = intermediate_size or 4 * C
    Dw, Da, Dv, Dg = ranks

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
        b, att = f"blocks.{i}.", f"blocks.{i}.att."
        if i == 0:
            sd.update(layer_norm(f"{b}ln0"))
        sd.update(layer_norm(f"{b}ln1"))
        sd.update(layer_norm(f"{b}ln2"))
        for slot in "rwkvag":
            sd[f"{att}x_{slot}"] = uniform(1, 1, C)
        sd[f"{att}w0"] = uniform(1, 1, C, low=-6.0, high=1.0)
        sd[f"{att}w1"] = normal(C, Dw, std=C**-0.5)
        sd[f"{att}w2"] = normal(Dw, C, std=0.5 * Dw**-0.5)
        sd[f"{att}a0"] = normal(1, 1, C, std=0.5)
        sd[f"{att}a1"] = normal(C, Da, std=C**-0.5)
        sd[f"{att}a2"] = normal(Da, C, std=Da**-0.5)
        if i > 0:
            sd[f"{att}v0"] = normal(1, 1, C, std=0.5)
            sd[f"{att}v1"] = normal(C, Dv, std=C**-0.5)
            sd[f"{att}v2"] = normal(Dv, C, std=Dv**-0.5)
        sd[f"{att}g1"] = normal(C, Dg, std=C**-0.5)
        sd[f"{att}g2"] = normal(Dg, C, std=Dg**-0.5)
        sd[f"{att}k_k"] = uniform(1, 1, C, low=0.5, high=1.0)
        sd[f"{att}k_a"] = uniform(1, 1, C, low=0.0, high=1.5)
        sd[f"{att}r_k"] = normal(C // N, N, std=0.5)
        for name in ("receptance", "key", "value", "output"):
            sd[f"{att}{name}.weight"] = linear(C, C)
        sd.update(layer_norm(f"{att}ln_x"))
        sd[f"{b}ffn.x_k"] = uniform(1, 1, C)
        sd[f"{b}ffn.key.weight"] = linear(F, C)
        sd[f"{b}ffn.value.weight"] = linear(C, F)
    sd.update(layer_norm("ln_out"))
    sd["head.weight"] = linear(V, C)
    return sd


def tiny_checkpoint(seed=0, **overrides) -> dict[str, torch.Tensor]:
    """A very small x070 state dict for the error, file and round-trip tests (formula-like small ranks)."""
    kwargs = dict(hidden_size=32, head_size=8, num_layers=3, vocab_size=300, ranks=(8, 6, 4, 10), seed=seed)
    kwargs.update(overrides)
    return random_blinkdl_rwkv7(**kwargs)


def run_reference(path: Path, prompt: list[int], greedy_tokens: int = 0, strategy: str = "cpu fp32") -> dict:
    """BlinkDL's `rwkv` package (RWKV_V7_ON=1) on the checkpoint `path` (a .pth), in a subprocess: the logits of every
    prompt position, the state after the prompt (per layer: time-mix input, WKV state (H, N, N) value-major, channel-mix
    input), `greedy_tokens` greedy continuations fed back one by one, and the state after them."""
    out = Path(path).with_suffix(".reference.pt")
    args = json.dumps({"model": str(Path(path).with_suffix("")), "prompt": prompt, "greedy": greedy_tokens,
                       "strategy": strategy, "out": str(out)})
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    result = subprocess.run([sys.executable, __file__, args], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the rwkv package failed:\n{result.stdout}\n{result.stderr}")
    return torch.load(out, weights_only=True)


def _reference_main(args: dict) -> None:
    from rwkv.model import RWKV

    model = RWKV(model=args["model"], strategy=args["strategy"])
    with torch.no_grad():
        logits, state = model.forward(args["prompt"], None, full_output=True)
        result = {"logits": logits.float().clone(), "state": [s.float().clone() for s in state]}
        tokens, last = [], logits[-1]
        for _ in range(args["greedy"]):
            tokens.append(int(last.argmax()))
            last, state = model.forward([tokens[-1]], state)
        result["greedy"] = torch.tensor(tokens, dtype=torch.long)
        result["greedy_state"] = [s.float().clone() for s in state]
    torch.save(result, args["out"])


if __name__ == "__main__":
    _reference_main(json.loads(sys.argv[1]))
