"""A follow-up question about an image already asked about: answered from scratch, with the image features reused
(no vision tower), and with the recurrent state of the image reused (no vision tower, no image span).

Run: .venv/bin/python benchmarks/bench_cache_reuse.py [--quick] [--new-tokens 8] [--repeats 5] [--threads 1]

A random fp32 VisualRWKV, scaled down so that the vision tower takes about the share of a fresh call that it takes in
the released 1B6 (CLIP ViT-L/14-336 against the 1.6B RWKV-6: ~15-20% of the prompt's compute): CLIP 6 layers x 256
at 336 px / 14 (577 image tokens), RWKV-6 8 layers x 512, the World vocabulary. The prompts come from the package's
processor (World tokenizer, CLIP image processor) for the questions "What color is the bus?" then "How many wheels
can you see?" about one (random) image; each way answers the second question greedily with `--new-tokens` tokens:

  fresh:            generate(**inputs)                                  vision tower + the whole prompt
  features reused:  generate(input_ids, mm_encoder_outputs={"image": features})   the whole prompt, no vision tower
  state reused:     generate(input_ids, cache=copy.deepcopy(prefix_cache))         the question only (copy included)

`features` = model.get_image_features(pixel_values) and `prefix_cache` = the cache after the prompt
up to the end of the image span, both computed once for the first question. The state is reusable only with the image
first: in the sandwich prompt ("middle", the released models' default) the question comes before the image, so the
image span's state differs per question and only the features can be reused. Every way must give the fresh run's
tokens (checked). Times: the minimum over --repeats rounds, the ways taking turns (the machine may be shared), of
the wall time and of the process's CPU time; with one thread (the default) the CPU time is the work itself, which
other load on a shared machine does not inflate.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import PIL.Image
import torch

from bench_wkv6_kernels import min_seconds  # the benchmarks' turn-taking timer (benchmarks/ is on the path)
from visualrwkv_hf import RwkvWorldTokenizer, VisualRWKVConfig, VisualRWKVForConditionalGeneration, VisualRWKVProcessor

QUESTIONS = ("What color is the bus?", "How many wheels can you see?")


def build_model(width: int, layers: int, vision_width: int, vision_layers: int) -> VisualRWKVForConditionalGeneration:
    torch.manual_seed(0)
    config = VisualRWKVConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_width // 64,
            "patch_size": 14,
            "image_size": 336,
        },
        text_config={"hidden_size": width, "num_hidden_layers": layers, "vocab_size": 65536},
    )
    model = VisualRWKVForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # every answer is --new-tokens long
    return model


def question_inputs(processor, image, question: str, image_position: str):
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        image_position=image_position,
    )


def image_prefix_length(input_ids: torch.Tensor, image_token_id: int) -> int:
    """Positions up to the end of the image span (the prompt's part shared by every question, image first)."""
    return int((input_ids[0] == image_token_id).nonzero().max()) + 1


@torch.inference_mode()
def bench_position(model, processor, image, image_position: str, new_tokens: int, repeats: int) -> dict:
    first = question_inputs(processor, image, QUESTIONS[0], image_position)
    follow_up = question_inputs(processor, image, QUESTIONS[1], image_position)
    ids = follow_up["input_ids"]
    features = model.get_image_features(first["pixel_values"])

    def answer(**kwargs):
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **kwargs)

    ways = {
        "fresh": lambda: answer(pixel_values=follow_up["pixel_values"]),
        "features reused": lambda: answer(mm_encoder_outputs={"image": features}),
    }
    prefix = image_prefix_length(first["input_ids"], model.config.image_token_id)
    if torch.equal(first["input_ids"][:, :prefix], ids[:, :prefix]):
        prefix_cache = model(first["input_ids"][:, :prefix], pixel_values=first["pixel_values"]).cache
        ways["state reused"] = lambda: answer(cache=copy.deepcopy(prefix_cache))
    expected = ways["fresh"]()
    for name, way in ways.items():
        if not torch.equal(way(), expected):
            raise SystemExit(f"{image_position}: '{name}' does not give the fresh run's tokens")
    cpu_seconds = {name: [] for name in ways}

    def cpu_timed(name):
        def run():
            start = time.process_time()
            ways[name]()
            cpu_seconds[name].append(time.process_time() - start)

        return run

    wall = min_seconds({name: cpu_timed(name) for name in ways}, repeats)
    cpu = {name: min(seconds) for name, seconds in cpu_seconds.items()}
    return {"prompt": ids.shape[1], "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=512, help="text hidden size")
    parser.add_argument("--layers", type=int, default=8, help="text layers")
    parser.add_argument("--vision-width", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per answer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="small sizes, for checking the script")
    args = parser.parse_args()
    if args.quick:
        args.width, args.layers, args.vision_width, args.vision_layers, args.repeats = 128, 2, 64, 2, 1

    torch.set_num_threads(args.threads)
    model = build_model(args.width, args.layers, args.vision_width, args.vision_layers)
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=model.config.num_image_tokens)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    vision = sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e6
    text = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1; vision: CLIP "
        f"{args.vision_layers} x {args.vision_width} ({vision:.1f}M), {model.config.num_image_tokens} image tokens; "
        f"text: RWKV-6 {args.layers} x {args.width} ({text:.1f}M with the embedding); {args.new_tokens} new tokens"
    )
    columns = f"{'wall ms':>8} {'speed-up':>9} {'CPU ms':>8} {'speed-up':>9}"
    print(f"{'image position':<15} {'prompt':>6} {'way':<16} {columns}")
    for image_position in ("middle", "first"):
        result = bench_position(model, processor, image, image_position, args.new_tokens, args.repeats)
        row = f"{image_position:<15} {result['prompt']:>6}"
        for name in result["wall"]:
            wall, cpu = result["wall"][name], result["cpu"][name]
            speed_ups = result["wall"]["fresh"] / wall, result["cpu"]["fresh"] / cpu
            print(f"{row} {name:<16} {wall * 1e3:>8.1f} {speed_ups[0]:>8.2f}x {cpu * 1e3:>8.1f} {speed_ups[1]:>8.2f}x")
        if "state reused" not in result["wall"]:
            print(f"{row} state reused: not possible, the question comes before the image")


if __name__ == "__main__":
    main()
