"""`visualrwkv serve` under load: requests per second and time to first token for 1, 4 and 16 concurrent clients,
next to the image-text-to-text pipeline answering the same chats one after another in this process.

Run: .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--max-tokens 16] [--requests 16] [--rounds 3]

The model: `--model DIR` (e.g. `outputs/visualrwkv-demo` after `make demo`), else the demo's architecture with random
weights (`visualrwkv_hf.demo.build_model`: CLIP 2 x 64 on 48-pixel images, RWKV-6 2 x 64, the World vocabulary),
saved to a temporary folder. The server runs in a subprocess on a free loopback port and is stopped at the end.
Every request is a chat with a 48-pixel image as a PNG data URL and a question, streamed (`stream=True`), greedy
(`temperature=0`), at most `--max-tokens` tokens. Each level sends the same `--requests` requests (8 chats in turn),
shared among its clients, each client sending its share one after another; requests/s (and tokens/s) is all of them
over the wall time of the level, in the fastest of `--rounds` rounds (the levels and the pipeline taking turns, as
the machine may be shared), time to first token (TTFT) is from sending a
request to its first chunk of answer text (median and worst, in that round). Serve answers one request at a time with
`generate()` (continuous batching is for attention models), so concurrency adds waiting, not throughput.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import PIL.Image

QUESTIONS = ("What shape is it?", "What color is the circle?", "How many objects are there?", "Is it big?")
CONCURRENCY = (1, 4, 16)


def random_image(seed: int) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(folder: Path, log_path: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "visualrwkv_hf.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
             str(port), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the server did not answer in {timeout:.0f}s:\n{log_path.read_text()}")


def ask(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """Streams one answer; its time to first text, the text and the number of tokens generated."""
    start = time.perf_counter()
    first, chunks, tokens = None, [], 0
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            chunks.append(chunk.choices[0].delta.content)
    return (first if first is not None else time.perf_counter() - start), "".join(chunks), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a VisualRWKV folder (default: the demo's architecture, random weights)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from transformers import pipeline

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.model:
            folder = Path(args.model)
        else:
            from visualrwkv_hf.demo import build_model

            model, processor = build_model()
            folder = scratch / "demo-architecture"
            model.save_pretrained(folder)
            processor.save_pretrained(folder)

        def messages(index: int) -> list[dict]:
            return [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(random_image(index))}},
                {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]},
            ]}]

        print(f"model: {folder}, answers of at most {args.max_tokens} tokens, greedy, streamed")
        print(f"{'way':<40} {'requests':>8} {'tokens':>7} {'requests/s':>10} {'tokens/s':>8} {'TTFT median':>12} "
              f"{'TTFT worst':>11}")

        # The alternative: the pipeline in this process, one chat after another (no HTTP, no processes)
        pipe = pipeline("image-text-to-text", model=str(folder))
        count = 8
        chats = [[{"role": "user", "content": [
            {"type": "image", "image": random_image(index)},
            {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]},
        ]}] for index in range(count)]

        def run_pipeline() -> tuple[float, list[str]]:
            start = time.perf_counter()
            answers = [pipe(text=chat, max_new_tokens=args.max_tokens)[0]["generated_text"][-1]["content"]
                       for chat in chats]
            return time.perf_counter() - start, answers

        run_pipeline()  # warm-up
        _, expected = run_pipeline()

        process, base_url = start_server(folder, scratch / "serve.log")
        try:
            client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=600, max_retries=0)
            model_name = str(folder)

            def run_level(clients: int) -> tuple[float, list[tuple[int, float, str, int]]]:
                def one_client(client_index: int) -> list[tuple[int, float, str, int]]:
                    return [
                        (number % count, *ask(client, model_name, messages(number % count), args.max_tokens))
                        for number in range(client_index, args.requests, clients)
                    ]

                start = time.perf_counter()
                with ThreadPoolExecutor(max_workers=clients) as pool:
                    results = [result for batch in pool.map(one_client, range(clients)) for result in batch]
                elapsed = time.perf_counter() - start
                wrong = sorted({index for index, _, text, _ in results if text != expected[index]})
                if wrong:
                    raise RuntimeError(f"the server's answers to chats {wrong} differ from the pipeline's")
                return elapsed, results

            run_level(1)  # warm-up
            best_pipeline, best_levels = float("inf"), {}
            for _ in range(args.rounds):
                best_pipeline = min(best_pipeline, run_pipeline()[0])
                for clients in CONCURRENCY:
                    elapsed, results = run_level(clients)
                    if elapsed < best_levels.get(clients, (float("inf"),))[0]:
                        best_levels[clients] = (elapsed, results)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

        tokens_per_chat = {
            index: generated for _, results in best_levels.values() for index, _, _, generated in results
        }
        tokens = sum(tokens_per_chat[index] for index in range(count))  # the pipeline's too (same chats, greedy)
        print(f"{'pipeline, in-process, one at a time':<40} {count:>8} {tokens:>7} {count / best_pipeline:>10.2f} "
              f"{tokens / best_pipeline:>8.1f} {'-':>12} {'-':>11}")
        for clients, (elapsed, results) in best_levels.items():
            ttfts = [ttft for _, ttft, _, _ in results]
            tokens = sum(generated for _, _, _, generated in results)
            label = f"visualrwkv serve, {clients} concurrent client{'s' * (clients > 1)}"
            print(f"{label:<40} {len(results):>8} {tokens:>7} {len(results) / elapsed:>10.2f} {tokens / elapsed:>8.1f} "
                  f"{statistics.median(ttfts) * 1e3:>10.0f}ms {max(ttfts) * 1e3:>9.0f}ms")
        print("every streamed answer equals the pipeline's for its chat")


if __name__ == "__main__":
    main()
