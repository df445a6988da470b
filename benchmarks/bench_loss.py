"""The model's loss (ops/loss.py) against transformers' ForCausalLMLoss: time of forward + backward, and the peak
memory of a whole training step.

Run: .venv/bin/python benchmarks/bench_loss.py [--tokens 2048] [--vocabs 4096 65536] [--repeats 6]
Time: the loss alone on (tokens, vocab) float32 logits, the two taking turns, minimum of the runs. Memory: a
training step of a random 4 x 256 model at the largest vocabulary with each loss, taking turns: how far the
process's peak resident memory rises above its resident memory before the step (Linux /proc).
"""

from __future__ import annotations

import argparse

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from bench_wkv6_kernels import min_seconds  # the benchmarks' turn-taking timer (benchmarks/ is on the path)
from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM
from visualrwkv_hf.ops.loss import causal_lm_loss

LOSSES = {"ours": causal_lm_loss, "transformers": ForCausalLMLoss}


def loss_seconds(tokens: int, vocab: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, tokens, vocab, generator=generator) * 3
    labels = torch.randint(0, vocab, (1, tokens), generator=generator)

    def forward_backward(loss_fn):
        loss_fn(logits.detach().requires_grad_(), labels, vocab_size=vocab).backward()  # a fresh leaf each run

    return min_seconds({name: lambda f=loss_fn: forward_backward(f) for name, loss_fn in LOSSES.items()}, repeats)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def step_memory(tokens: int, vocab: int, rounds: int = 2) -> dict:
    """MiB of resident memory a training step adds at its peak, with each loss (Linux: the peak is reset through
    /proc/self/clear_refs before each step and read as VmHWM after it; the losses take turns, minimum of the
    rounds)."""
    torch.manual_seed(0)
    config = Rwkv6Config(vocab_size=vocab, hidden_size=256, num_hidden_layers=4)
    model = Rwkv6ForCausalLM(config).train()
    ids = torch.randint(0, vocab, (1, tokens))
    added = {name: float("inf") for name in LOSSES}
    for round_index in range(rounds + 1):  # the first round warms up
        for name, loss_fn in LOSSES.items():
            model.loss_function = loss_fn
            model.zero_grad(set_to_none=True)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets the peak resident size to the current one
            before = _status_kib("VmRSS")
            model(ids, labels=ids, use_cache=False).loss.backward()
            if round_index:
                added[name] = min(added[name], max(0, _status_kib("VmHWM") - before) / 1024)
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, float32")
    print(f"{'measurement':<46} {'ours':>9} {'transformers':>13} {'ratio':>6}")
    for vocab in args.vocabs:
        times = loss_seconds(args.tokens, vocab, args.repeats)
        ours, theirs = times["ours"] * 1e3, times["transformers"] * 1e3
        print(f"{f'loss fwd+bwd ms, vocab {vocab}':<46} {ours:>9.1f} {theirs:>13.1f} {theirs / ours:>5.2f}x")
    memory = step_memory(args.tokens, max(args.vocabs))
    ours, theirs = memory["ours"], memory["transformers"]
    label = f"train step peak MiB added, 4 x 256, vocab {max(args.vocabs)}"
    # under a few MiB the peak is page noise (small vocabularies): no ratio then
    ratio = f"{theirs / ours:>5.2f}x" if ours >= 8 else "    -"
    print(f"{label:<46} {ours:>9.0f} {theirs:>13.0f} {ratio}")


if __name__ == "__main__":
    main()
