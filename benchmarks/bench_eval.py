"""`visualrwkv eval`'s way of answering benchmark questions against the original VisualRWKV evaluate.py's way.

Run: PYTHONPATH=src .venv/bin/python benchmarks/bench_eval.py [--questions 32] [--max-new-tokens 8] [--batch-size 8]

The same questions (POPE-style: a random image and "Is there a <thing> in the image?" plus LLaVA's short-answer
suffix), prompts built by `visualrwkv_hf.evaluation` exactly as the command builds them, greedy decoding of a fixed
number of new tokens (the random model never ends its turn early, so every strategy generates the same count):
  a. ours: left-padded batches of --batch-size through generate() with the recurrent cache (what `visualrwkv eval`
     does);
  b. ours, one question at a time, with the cache;
  c. the original's strategy: one question at a time, the whole sequence (image included) re-run for every new token
     (generate(use_cache=False)).
The model is the demo's (`visualrwkv demo`'s shape: a tiny CLIP on 48 x 48 images, 10 image tokens, RWKV-6 blocks of
`demo.TEXT_SIZES`), random fp32 weights: the time of a step does not depend on their values. Printed: questions per
second of each, the ratios, and whether all three gave the same answers. Strategies take turns, round by round, so a
busy spell on a shared machine hits all of them.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from PIL import Image

from visualrwkv_hf import demo
from visualrwkv_hf.evaluation import LLAVA_SHORT_ANSWER, Question, prompt_inputs


def make_questions(count: int, folder) -> list[Question]:
    rng = random.Random(0)
    questions = []
    for index in range(count):
        name = f"{index}.png"
        pixels = bytes(rng.randrange(256) for _ in range(demo.IMAGE_SIZE * demo.IMAGE_SIZE * 3))
        Image.frombytes("RGB", (demo.IMAGE_SIZE, demo.IMAGE_SIZE), pixels).save(folder / name)
        thing = rng.choice(["dog", "traffic light", "cup", "person", "dining table"])
        text = f"Is there a {thing} in the image?\n{LLAVA_SHORT_ANSWER}"
        questions.append(Question(index, text, name, index + 1, {}))
    return questions


def answer(model, processor, questions, folder, batch_size: int, use_cache: bool, max_new_tokens: int):
    answers = []
    for start in range(0, len(questions), batch_size):
        inputs = prompt_inputs(processor, questions[start:start + batch_size], folder)
        with torch.no_grad():
            generated = model.generate(
                **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                use_cache=use_cache, pad_token_id=processor.tokenizer.pad_token_id,
            )
        answers += processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])
    return answers


def main() -> None:
    import tempfile
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best of each strategy is reported")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = demo.build_model()
    model.eval()
    strategies = {
        f"a. ours, batches of {args.batch_size}, cache": (args.batch_size, True),
        "b. ours, one at a time, cache": (1, True),
        "c. original: one at a time, recompute per token": (1, False),
    }
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        questions = make_questions(args.questions, folder)
        answer(model, processor, questions[:2], folder, 2, True, 2)  # warm-up
        best = {label: float("inf") for label in strategies}
        answers = {}
        for _ in range(args.rounds):
            for label, (batch_size, use_cache) in strategies.items():
                start = time.perf_counter()
                answers[label] = answer(
                    model, processor, questions, folder, batch_size, use_cache, args.max_new_tokens
                )
                best[label] = min(best[label], time.perf_counter() - start)
    print(f"{args.questions} questions, {args.max_new_tokens} new tokens each, {args.threads} thread(s), "
          f"best of {args.rounds} rounds:")
    reference = best["c. original: one at a time, recompute per token"]
    for label, seconds in best.items():
        print(f"  {label:<50} {args.questions / seconds:8.2f} questions/s  ({reference / seconds:5.2f}x the original)")
    same = len({tuple(value) for value in answers.values()}) == 1
    print(f"Same answers from all three: {same}")


if __name__ == "__main__":
    main()
