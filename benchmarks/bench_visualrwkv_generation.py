"""Generation with an image in the prompt: VisualRWKV against transformers' LLaVA of the same size, and against the
original VisualRWKV's strategy (the whole sequence re-run for every new token).

Run: .venv/bin/python benchmarks/bench_visualrwkv_generation.py [--quick] [--plot docs/images/generation_scaling.png]
(--plot needs matplotlib: pip install -e ".[bench]")

Three ways to generate, each after a prompt of 1K, 4K and 16K tokens that holds one image:
  a. ours: VisualRWKVForConditionalGeneration with its recurrent cache (one token per step);
  b. LLaVA: LlavaForConditionalGeneration with a Llama text model, SDPA attention and its default DynamicCache (KV);
  c. recompute: our model with use_cache=False on the whole growing sequence, image included, for every token, as
     the original's generate does. O(T) per token, so only a few tokens are timed at each context.
Both models are random fp32 models of the same shape: the same CLIP vision config (used whole: cls + patches), the
same text width, depth, feed-forward width and vocabulary, the same prompt ids (LLaVA takes the same image token id).

Measured per context:
  time: wall time of one generation step (the forward of one new token, or of the whole sequence for c), min and
     median over the timed steps;
  held bytes: the tensors the cache holds between steps (each storage once), at the context and again after the
     decode steps;
  peak RSS growth: the largest resident-set size during one step (the kernel's VmHWM, reset through
     /proc/self/clear_refs just before) minus the resident size right before it, after malloc_trim so that freed
     heap pages cannot hide new allocations. Measured on separate steps for a and b, so trimming never touches their
     timed steps; on the timed steps for c (whose large temporaries are fresh mmaps either way).
Bars: at the longest context, ours at least 3x faster per token than LLaVA; our state the same size at every context.
The machine may be shared: the strategies and contexts take turns step by step, so a busy spell hits all of them.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import time

import torch
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from visualrwkv_hf import VisualRWKVConfig, VisualRWKVForConditionalGeneration

PREFILL_PIECE = 2048  # prompts are prefilled in pieces of this many tokens (the image inside the first one)
DECODE_WARMUP = 3  # decode steps left out of the timing
TEXT_BEFORE_IMAGE = 8  # prompt tokens before the image span
MEMORY_STEPS = 2  # extra, untimed decode steps per context for a and b, on which peak RSS growth is measured
PAGE = 4096  # resolution of the RSS figures


# ---------------------------------------------------------------- models


def build_models(width: int, layers: int, vocab: int, vision: dict) -> tuple:
    """Our model and a LLaVA of the same vision tower, text width, depth, feed-forward width and vocabulary."""
    torch.manual_seed(0)
    ours_config = VisualRWKVConfig(
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config={"hidden_size": width, "num_hidden_layers": layers, "vocab_size": vocab},
        image_token_id=vocab - 6,  # the World vocabulary's placeholder id (65530) at full size
    )
    text = ours_config.text_config
    llava_config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config=LlamaConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            intermediate_size=text.intermediate_size,
            vocab_size=vocab,
            num_attention_heads=text.num_heads,  # full multi-head attention with RWKV's head size, as LLaVA-1.5
            num_key_value_heads=text.num_heads,
            max_position_embeddings=32768,
        ),
        image_token_index=ours_config.image_token_id,
        image_seq_length=ours_config.num_image_tokens,
        # the same image tokens as ours: the last layer's cls + all patches
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    ours = VisualRWKVForConditionalGeneration(ours_config).eval()
    llava = LlavaForConditionalGeneration._from_config(llava_config, attn_implementation="sdpa").eval()
    return ours, llava


def parameter_counts(model, vision_tower, projector) -> str:
    def millions(module) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    total, vision, proj = millions(model), millions(vision_tower), millions(projector)
    return f"{total:.1f}M params (vision {vision:.1f}M, projector {proj:.2f}M, text {total - vision - proj:.1f}M)"


# ---------------------------------------------------------------- memory


LIBC = ctypes.CDLL(None)


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def start_peak_rss() -> int:
    """Returns freed heap pages to the OS, resets the kernel's peak-RSS mark and returns the resident size now."""
    LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # 5: reset VmHWM to the current RSS
    return proc_status_bytes("VmRSS")


def peak_rss_growth(rss_before: int) -> int:
    return proc_status_bytes("VmHWM") - rss_before


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold, each storage counted once."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    for layer in cache.layers:
        visit(vars(layer))
    return sum(storages.values())


# ---------------------------------------------------------------- generation steps


def prompt_ids(context: int, image_token_id: int, num_image_tokens: int) -> list[int]:
    """`context` ids: a few text tokens, the image placeholders, then text (random ids, not the placeholder)."""
    generator = torch.Generator().manual_seed(11)
    text = torch.randint(1, image_token_id, (context - num_image_tokens,), generator=generator).tolist()
    return text[:TEXT_BEFORE_IMAGE] + [image_token_id] * num_image_tokens + text[TEXT_BEFORE_IMAGE:]


@torch.inference_mode()
def prefill_keeping_caches(model, ids: list[int], pixel_values, contexts: list[int]) -> tuple[list, float]:
    """Prefills up to the longest context in pieces, keeping a copy of the cache at each context; returns
    (caches, seconds spent in the model)."""
    caches, cache, position, seconds = [], None, 0, 0.0
    for context in contexts:
        for start in range(position, context, PREFILL_PIECE):
            piece = torch.tensor([ids[start : min(start + PREFILL_PIECE, context)]])
            began = time.perf_counter()
            out = model(
                input_ids=piece,
                pixel_values=pixel_values if start == 0 else None,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            seconds += time.perf_counter() - began
            cache = out.cache
        caches.append(copy.deepcopy(cache))
        position = context
    return caches, seconds


@torch.inference_mode()
def cached_step(model, cache, token: int) -> torch.Tensor:
    return model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


@torch.inference_mode()
def recompute_step(model, ids: list[int], pixel_values) -> torch.Tensor:
    """The original's generation step: the whole sequence, image included, through the model without a cache."""
    return model(
        input_ids=torch.tensor([ids]), pixel_values=pixel_values, use_cache=False, logits_to_keep=1
    ).logits[0, -1]


def timed(step) -> float:
    began = time.perf_counter()
    step()
    return time.perf_counter() - began


def sanity_check(ours, pixel_values, ids: list[int], token: int) -> str:
    """Our cached step and the full recompute must predict the same next-token logits."""
    caches, _ = prefill_keeping_caches(ours, ids, pixel_values, [len(ids)])
    cached = cached_step(ours, caches[0], token)
    recomputed = recompute_step(ours, ids + [token], pixel_values)
    difference = (cached - recomputed).abs().max().item()
    scale = recomputed.abs().max().item()
    if difference > 1e-3 * max(scale, 1.0):
        raise SystemExit(f"Cached and recomputed logits differ: max |diff| {difference:.2e} (max |logit| {scale:.1f})")
    return f"sanity: ours cached vs full recompute, max |logit diff| {difference:.1e} (max |logit| {scale:.2f})"


# ---------------------------------------------------------------- report


def milliseconds(times: list[float]) -> tuple[float, float]:
    return min(times) * 1e3, statistics.median(times) * 1e3


def mebibytes(count: int) -> str:
    return f"{count / 2**20:.2f}"


def write_plot(path: str, contexts: list[int], results: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    styles = {
        "ours": ("a. VisualRWKV, recurrent cache", "tab:blue", "o"),
        "llava": ("b. LLaVA (Llama, SDPA), KV cache", "tab:red", "s"),
        "recompute": ("c. VisualRWKV, full recompute per token (original)", "tab:gray", "^"),
    }
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(12, 5))
    for name, (label, color, marker) in styles.items():
        per_token = [milliseconds(results[name]["times"][c])[0] for c in contexts]
        time_axis.plot(contexts, per_token, marker=marker, color=color, label=label)
        # RSS is counted in pages: a growth under one page is drawn at one page, which a log axis can show
        peak = [max(results[name]["peak_rss"][c], PAGE) / 2**20 for c in contexts]
        memory_axis.plot(contexts, peak, marker=marker, color=color, linestyle="--")
        if name != "recompute":  # c keeps no cache between steps
            held = [results[name]["held"][c] / 2**20 for c in contexts]
            memory_axis.plot(contexts, held, marker=marker, color=color)
    for axis in (time_axis, memory_axis):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        axis.set_xlabel("context (tokens, one image included)")
        axis.grid(True, which="both", alpha=0.3)
    time_axis.set_ylabel("ms per generated token (min over steps)")
    time_axis.set_title("time per generated token")
    memory_axis.set_ylabel("MiB")
    memory_axis.set_title("memory per generated token")
    memory_axis.legend(
        [Line2D([], [], color="black"), Line2D([], [], color="black", linestyle="--")],
        ["cache held between steps", "peak RSS growth during one step"],
        fontsize=8,
        loc="upper left",
    )
    figure.legend(loc="lower center", ncol=3, fontsize=9, handles=time_axis.get_lines())
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512, help="text hidden size of both models")
    parser.add_argument("--layers", type=int, default=4, help="text layers of both models")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--vision-width", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="pixels; patches of 14 (224: 257 image tokens)")
    parser.add_argument("--contexts", default="1024,4096,16384", help="prompt lengths, image included")
    parser.add_argument("--decode-steps", type=int, default=30, help="timed steps per context for a and b")
    parser.add_argument("--recompute-steps", default="3,2,2", help="timed steps per context for c")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of ms/token and memory against context")
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking the script (~1 minute)")
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.vocab = 256, 2, 8192
        args.vision_width, args.vision_layers, args.image_size = 128, 2, 112
        args.contexts, args.decode_steps, args.recompute_steps = "512,1024,2048", 8, "2,1,1"
    contexts = [int(c) for c in args.contexts.split(",")]
    recompute_steps = dict(zip(contexts, (int(n) for n in args.recompute_steps.split(",")), strict=True))
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("Peak RSS is read from Linux's /proc/self/clear_refs and VmHWM: run this on Linux.")

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    vision = {
        "hidden_size": args.vision_width,
        "intermediate_size": 4 * args.vision_width,
        "num_hidden_layers": args.vision_layers,
        "num_attention_heads": args.vision_width // 64,
        "patch_size": 14,
        "image_size": args.image_size,
    }
    ours, llava = build_models(args.width, args.layers, args.vocab, vision)
    config = ours.config
    text = config.text_config
    print(f"torch {torch.__version__}, {threads} threads, fp32, batch 1")
    print(
        f"text: {text.num_hidden_layers} layers x {text.hidden_size} ({text.num_heads} heads x {text.head_size}, "
        f"ffn {text.intermediate_size}), vocab {text.vocab_size}; vision: CLIP {args.vision_layers} layers x "
        f"{args.vision_width}, {args.image_size} px / 14 -> {config.num_image_tokens} image tokens"
    )
    print(f"ours : {parameter_counts(ours, ours.model.vision_tower, ours.model.multi_modal_projector)}")
    print(
        f"LLaVA: {parameter_counts(llava, llava.model.vision_tower, llava.model.multi_modal_projector)}, "
        f"attention {llava.config.text_config._attn_implementation}"
    )

    pixel_values = torch.randn(1, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(3))
    ids = prompt_ids(max(contexts), config.image_token_id, config.num_image_tokens)
    generated = torch.randint(
        1, config.image_token_id, (DECODE_WARMUP + args.decode_steps + MEMORY_STEPS,),
        generator=torch.Generator().manual_seed(19),
    ).tolist()  # fed as the generated tokens (sampling is not what is timed)
    print(sanity_check(ours, pixel_values, ids[: contexts[0]], generated[0]))

    results = {
        name: {"times": {}, "held": {}, "held_after": {}, "peak_rss": {}} for name in ("ours", "llava", "recompute")
    }
    caches = {}
    for name, model in (("ours", ours), ("llava", llava)):
        caches[name], seconds = prefill_keeping_caches(model, ids, pixel_values, contexts)
        print(f"prefill {name} to {max(contexts)} tokens: {seconds:.1f} s ({max(contexts) / seconds:.0f} tokens/s)")
        for context, cache in zip(contexts, caches[name]):
            results[name]["held"][context] = cache_bytes(cache)

    # Timed steps, taking turns: every context and strategy gets one step before any gets the next.
    for name in results:
        for context in contexts:
            results[name]["times"][context] = []
            results[name]["peak_rss"][context] = 0
    for step, token in enumerate(generated[: DECODE_WARMUP + args.decode_steps]):
        for index, context in enumerate(contexts):
            for name, model in (("ours", ours), ("llava", llava)):
                seconds = timed(lambda: cached_step(model, caches[name][index], token))
                if step >= DECODE_WARMUP:
                    results[name]["times"][context].append(seconds)
            if step < recompute_steps[context]:
                sequence = ids[:context] + generated[: step + 1]
                rss_before = start_peak_rss()
                seconds = timed(lambda: recompute_step(ours, sequence, pixel_values))
                growth = peak_rss_growth(rss_before)
                results["recompute"]["times"][context].append(seconds)
                results["recompute"]["peak_rss"][context] = max(results["recompute"]["peak_rss"][context], growth)
        print(f"  step {step + 1}/{DECODE_WARMUP + args.decode_steps} done", flush=True)

    # Peak RSS of a and b on extra steps, so the trimming never lands in a timed step.
    for token in generated[DECODE_WARMUP + args.decode_steps :]:
        for index, context in enumerate(contexts):
            for name, model in (("ours", ours), ("llava", llava)):
                rss_before = start_peak_rss()
                cached_step(model, caches[name][index], token)
                growth = peak_rss_growth(rss_before)
                results[name]["peak_rss"][context] = max(results[name]["peak_rss"][context], growth)
    for name in ("ours", "llava"):
        for context, cache in zip(contexts, caches[name]):
            results[name]["held_after"][context] = cache_bytes(cache)

    steps_after = args.decode_steps + DECODE_WARMUP + MEMORY_STEPS
    print()
    print("time per generated token, ms (min / median over steps); ratios of the minima (of the medians)")
    print(
        f"{'context':>8} {'a. ours':>15} {'b. LLaVA':>15} {'c. recompute':>17} {'b / a':>13} {'c / a':>15}"
    )
    for context in contexts:
        a, b, c = (milliseconds(results[name]["times"][context]) for name in ("ours", "llava", "recompute"))
        steps_c = len(results["recompute"]["times"][context])
        print(
            f"{context:>8} {a[0]:>7.1f} /{a[1]:>6.1f} {b[0]:>7.1f} /{b[1]:>6.1f} {c[0]:>8.0f} /{c[1]:>6.0f} ({steps_c})"
            f" {b[0] / a[0]:>6.1f} ({b[1] / a[1]:>4.1f}) {c[0] / a[0]:>7.0f} ({c[1] / a[1]:>5.0f})"
        )
    print()
    print(f"memory, MiB: cache held at the context and after {steps_after} more tokens; peak RSS growth in one step")
    print(
        f"{'context':>8} {'a. state':>9} {'(after)':>8} {'b. KV':>9} {'(after)':>8} {'b / a':>7}"
        f" {'peak a':>8} {'peak b':>8} {'peak c':>8}"
    )
    for context in contexts:
        ours_held, llava_held = results["ours"]["held"][context], results["llava"]["held"][context]
        print(
            f"{context:>8} {mebibytes(ours_held):>9} {mebibytes(results['ours']['held_after'][context]):>8}"
            f" {mebibytes(llava_held):>9} {mebibytes(results['llava']['held_after'][context]):>8}"
            f" {llava_held / ours_held:>7.0f}"
            + "".join(f" {mebibytes(results[name]['peak_rss'][context]):>8}" for name in results)
        )
    longest = max(contexts)
    kv_growth = (results["llava"]["held_after"][longest] - results["llava"]["held"][longest]) / steps_after
    print(
        f"LLaVA's KV cache grows by {kv_growth:.0f} bytes per generated token; our state stays "
        f"{results['ours']['held'][longest]} bytes"
    )
    speedup = min(results["llava"]["times"][longest]) / min(results["ours"]["times"][longest])
    held_values = set(results["ours"]["held"].values()) | set(results["ours"]["held_after"].values())
    print()
    print(f"bar: at {longest} tokens, ours >= 3x faster per token than LLaVA: {speedup:.1f}x, "
          + ("met" if speedup >= 3 else "NOT met"))
    print(f"bar: our state the same size at every context and after decoding: {sorted(held_values)} bytes, "
          + ("met" if len(held_values) == 1 else "NOT met"))

    if args.plot:
        title = (
            f"{text.num_hidden_layers} layers x {text.hidden_size}, ffn {text.intermediate_size}, vocab "
            f"{text.vocab_size}, CLIP {args.vision_layers} x {args.vision_width} ({config.num_image_tokens} image "
            f"tokens); fp32, batch 1, {threads} CPU threads"
        )
        write_plot(args.plot, contexts, results, title)


if __name__ == "__main__":
    main()
