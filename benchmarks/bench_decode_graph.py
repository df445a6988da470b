"""generate() decode speed: the default path (DynamicCache, eager steps) against cache_implementation="static"
(on CUDA: every decode step one CUDA-graph replay, decode_graph.py; on the CPU: the same eager steps with a static
cache), side by side in one run, and the generated tokens compared.

Run: .venv/bin/python benchmarks/bench_decode_graph.py [--width 768 --layers 12] [--new-tokens 64] [--output FILE]
Model: Rwkv6ForCausalLM, random weights, vocab 65536, bf16 on CUDA (fp32 on the CPU); prompt --prompt tokens.
Measured: ms per generated token = (time of generate(max_new_tokens=N) - time of generate(max_new_tokens=1)) /
(N - 1), so the prefill and the graph capture (first decode step) drop out; min over --repeats runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_claims import Results, synchronize  # noqa: E402

from visualrwkv_hf import Rwkv6ForCausalLM, Rwkv6Config  # noqa: E402


def generate_seconds(model, ids, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    synchronize(ids.device)
    began = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    synchronize(ids.device)
    return time.perf_counter() - began, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (default: all cores)")
    parser.add_argument("--output", help="append one JSON line per result to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Rwkv6Config(vocab_size=65536, hidden_size=args.width, num_hidden_layers=args.layers,
                                  head_size=64, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = Rwkv6ForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.prompt), device=device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = Results(args.output, {"bench": "bench_decode_graph", "device": device_name, "dtype": str(dtype),
                                    "model": f"{args.layers} x {args.width}", "command": " ".join(sys.argv)})
    outputs = {}
    for name, kwargs in (("default (dynamic cache, eager)", {}), ("cache_implementation='static'",
                                                                   {"cache_implementation": "static"})):
        generate_seconds(model, ids, 2, **kwargs)  # warm-up: kernel builds, allocator
        per_token = []
        for _ in range(args.repeats):
            one, _ = generate_seconds(model, ids, 1, **kwargs)
            many, outputs[name] = generate_seconds(model, ids, args.new_tokens, **kwargs)
            per_token.append((many - one) / (args.new_tokens - 1) * 1e3)
        results.add({"kind": "decode", "path": name, "ms_per_token": round(min(per_token), 3),
                     "tokens_per_s": round(1e3 / min(per_token), 1)})
    first, second = outputs.values()
    results.add({"kind": "check", "same_tokens": bool(torch.equal(first, second))})


if __name__ == "__main__":
    main()
