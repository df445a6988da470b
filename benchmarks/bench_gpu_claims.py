"""The paper's GPU claims, measured: VisualRWKV against LLaVA of the same size in bf16 on a CUDA GPU.

Run (GPU): .venv/bin/python benchmarks/bench_gpu_claims.py --output gpu_claims.jsonl --plot gpu_claims.png
Check the script on a CPU: .venv/bin/python benchmarks/bench_gpu_claims.py --quick --output /tmp/claims.jsonl

Models: random weights, built by bench_visualrwkv_generation.build_models: the same CLIP vision tower (ViT-L/14 at
336 px by default: 577 image tokens, cls + patches), the same text width, depth, feed-forward width and vocabulary as
the released VisualRWKV-1.6B (24 x 2048, vocabulary 65536); LLaVA's text model is Llama with SDPA attention and
full multi-head attention (LLaVA-1.5's layout). Prompts of 1K, 4K, 16K and 24K tokens holding one image.

Measured per model and context (CUDA events / synchronised wall time):
  prefill_ms: one forward of the whole prompt, image included, building the cache (logits of the last token only);
  decode_ms: time per generated token with the cache (median over --decode-steps steps after warm-up);
  peak_prefill_gib / peak_decode_gib: torch.cuda.max_memory_allocated during the prefill and during the decode steps
    (weights included: what the GPU must hold);
  cache_mib: the bytes the cache holds after the prompt.
Then one LoRA training step (r=64 on every linear of the text blocks, AdamW) of VisualRWKV's and of Llama's text
model at the same size, --train-length tokens: tokens/s and peak memory.
Every result is appended to --output as one JSON line the moment it is measured (a run cut short keeps what it
measured); a model that runs out of memory at a context is recorded as {"error": "out of memory"} and the run goes
on. --quick: tiny models and contexts, on the CPU when there is no GPU (fp32 there: CPUs without bf16 units run
bf16 matmuls ~100x slower); peak memory is CUDA-only (null on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_visualrwkv_generation import build_models, cache_bytes, prompt_ids  # noqa: E402

CONTEXTS = (1024, 4096, 16384, 24576)
DECODE_WARMUP = 3


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_ms(fn, device: torch.device):
    synchronize(device)
    began = time.perf_counter()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - began) * 1e3, result


class Results:
    """JSON lines appended to a file as results arrive, and kept for the summary and the plot."""

    def __init__(self, path: str | None, run: dict):
        self.path, self.rows = path, []
        self.add({"kind": "run", **run})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            with open(self.path, "a") as file:
                file.write(json.dumps(row) + "\n")


@torch.inference_mode()
def measure_generation(model, ids, pixel_values, decode_steps, device) -> dict:
    """Prefill of `ids` (image included) and `decode_steps` cached one-token steps after DECODE_WARMUP untimed ones."""
    input_ids = torch.tensor([ids], device=device)
    reset_peak(device)
    prefill_ms, out = timed_ms(
        lambda: model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True, logits_to_keep=1), device
    )
    peak_prefill = peak_gib(device)
    cache = out.cache
    held = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    del out
    reset_peak(device)
    times = []
    for step in range(DECODE_WARMUP + decode_steps):
        ms, out = timed_ms(lambda: model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1), device)
        token = out.logits[:, -1:].argmax(-1)
        if step >= DECODE_WARMUP:
            times.append(ms)
    return {
        "prefill_ms": round(prefill_ms, 2),
        "decode_ms": round(statistics.median(times), 3),
        "decode_ms_min": round(min(times), 3),
        "peak_prefill_gib": None if peak_prefill is None else round(peak_prefill, 3),
        "peak_decode_gib": None if peak_gib(device) is None else round(peak_gib(device), 3),
        "cache_mib": round(held / 2**20, 2),
    }


def run_generation(args, results: Results, device, dtype) -> None:
    vision = {
        "hidden_size": args.vision_width,
        "intermediate_size": 4 * args.vision_width,
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": max(1, args.vision_width // 64),
        "image_size": args.image_size,
        "patch_size": 14,
    }
    with torch.device(device):
        ours, llava = build_models(args.width, args.layers, args.vocab, vision)
    models = {"visualrwkv": ours.to(dtype), "llava": llava.to(dtype)}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        results.add({"kind": "model", "model": name, "params_m": round(params / 1e6, 1)})
    pixel_values = torch.randn(1, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    image_token_id, num_image_tokens = ours.config.image_token_id, ours.config.num_image_tokens
    for model in models.values():  # warm-up, untimed: kernel builds, autotuning, the allocator
        measure_generation(model, prompt_ids(min(args.contexts), image_token_id, num_image_tokens), pixel_values, 1,
                           device)
    for context in args.contexts:
        ids = prompt_ids(context, image_token_id, num_image_tokens)
        for name, model in models.items():
            row = {"kind": "generation", "model": name, "context": context}
            try:
                row.update(measure_generation(model, ids, pixel_values, args.decode_steps, device))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.add(row)


def lora_models(args, device, dtype):
    """VisualRWKV's text model and Llama at the same size, each wrapped in LoRA (r=64) on its text-block linears."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from visualrwkv_hf import Rwkv6ForCausalLM, Rwkv6Config
    from visualrwkv_hf.training import lora_config

    ours_config = Rwkv6Config(
        vocab_size=args.vocab, hidden_size=args.width, num_hidden_layers=args.layers, head_size=64
    )
    llama_config = LlamaConfig(
        hidden_size=args.width,
        num_hidden_layers=args.layers,
        intermediate_size=ours_config.intermediate_size,
        vocab_size=args.vocab,
        num_attention_heads=args.width // 64,
        num_key_value_heads=args.width // 64,
        max_position_embeddings=max(args.train_length, 4096),
    )
    torch.manual_seed(0)
    with torch.device(device):
        ours = Rwkv6ForCausalLM(ours_config).to(dtype)
        llama = LlamaForCausalLM._from_config(llama_config, attn_implementation="sdpa").to(dtype)
    llama_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "visualrwkv": get_peft_model(ours, lora_config("language_model", r=64, lora_alpha=128)),
        "llama": get_peft_model(llama, LoraConfig(target_modules=llama_targets, r=64, lora_alpha=128)),
    }


def run_training(args, results: Results, device, dtype) -> None:
    models = lora_models(args, device, dtype)
    ids = torch.randint(0, args.vocab, (args.train_batch, args.train_length), device=device)
    tokens = ids.numel()
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        row = {"kind": "lora_step", "model": name, "batch": args.train_batch, "length": args.train_length}
        try:
            step()  # warm-up: optimizer state, kernel builds, autotuning
            reset_peak(device)
            times = [timed_ms(step, device)[0] for _ in range(args.train_steps)]
            best = min(times)
            row.update({"step_ms": round(best, 1), "tokens_per_s": round(tokens / best * 1e3),
                        "peak_gib": None if peak_gib(device) is None else round(peak_gib(device), 3)})
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
        results.add(row)
        del optimizer
        models[name] = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def write_plot(path: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generation = [r for r in rows if r.get("kind") == "generation" and "error" not in r]
    panels = [("decode_ms", "ms per generated token"), ("prefill_ms", "prefill ms"),
              ("peak_decode_gib" if any(r["peak_decode_gib"] for r in generation) else "cache_mib",
               "peak GPU memory while decoding, GiB" if any(r["peak_decode_gib"] for r in generation)
               else "cache MiB")]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (key, label) in zip(axes, panels):
        for model, color in (("visualrwkv", "tab:blue"), ("llava", "tab:red")):
            points = sorted((r["context"], r[key]) for r in generation if r["model"] == model)
            if points:
                axis.plot(*zip(*points), marker="o", color=color, label=model)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context (tokens, one image included)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def summary(rows: list[dict]) -> None:
    generation = {(r["model"], r["context"]): r for r in rows if r.get("kind") == "generation"}
    for context in sorted({c for _, c in generation}):
        ours, llava = generation.get(("visualrwkv", context)), generation.get(("llava", context))
        if not ours or not llava or "error" in ours or "error" in llava:
            continue
        line = (f"context {context}: decode {llava['decode_ms'] / ours['decode_ms']:.2f}x faster than LLaVA, "
                f"prefill {llava['prefill_ms'] / ours['prefill_ms']:.2f}x")
        if ours["peak_decode_gib"] is not None:
            line += f", peak decode memory {100 * (1 - ours['peak_decode_gib'] / llava['peak_decode_gib']):.0f}% less"
        print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=2048, help="text hidden size of both models")
    parser.add_argument("--layers", type=int, default=24, help="text layers of both models")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--vision-width", type=int, default=1024)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=336, help="pixels; patches of 14")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--train-length", type=int, default=2048)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--no-training", action="store_true")
    parser.add_argument("--output", help="append one JSON line per result to this file")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for checking the script (CPU or GPU)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.width, args.layers, args.vocab = 64, 2, 256
        args.vision_width, args.vision_layers, args.image_size = 32, 1, 28
        args.contexts, args.decode_steps = [64, 160], 3
        args.train_length, args.train_steps = 64, 1
    elif device.type != "cuda":
        raise SystemExit("needs a CUDA GPU (or --quick to check the script on the CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if min(args.contexts) <= (args.image_size // 14) ** 2 + 1 + 8:
        raise SystemExit(f"every context must hold the image's {(args.image_size // 14) ** 2 + 1} tokens and some text")
    title = (f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {str(dtype)[6:]}, text "
             f"{args.layers} x {args.width}, vocab {args.vocab}, vision {args.vision_layers} x {args.vision_width} "
             f"at {args.image_size} px")
    results = Results(args.output, {"device": title, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                    "command": " ".join(sys.argv)})
    run_generation(args, results, device, dtype)
    if not args.no_training:
        run_training(args, results, device, dtype)
    summary(results.rows)
    if args.plot:
        write_plot(args.plot, results.rows, title)


if __name__ == "__main__":
    main()
