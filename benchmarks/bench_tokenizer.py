"""Encode and decode throughput of RwkvWorldTokenizer against the reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`,
and of its tokenizer.json form (`tokenizer._tokenizer`, the `tokenizers` library) next to them.

Run: python benchmarks/bench_tokenizer.py [--repeats N]
(needs `pip install rwkv` for the reference; PYTHONPATH=src if the package is not installed)

Each corpus is a list of documents encoded one call per document, so the transformers call overhead is counted.
Rows: the reference; ours through `tokenizer.encode` (the full transformers path); ours through `tokenizer(batch)`;
our bare encoder (`encode_to_ids`); the pure-Python fallback encoder; tokenizer.json (`tokenizers`, one
`encode` per document). Ratios are against the reference, same corpus. Ids are checked equal to the reference before
timing (for tokenizer.json, with the two literal texts it reads as special tokens, `"<|endoftext|>"` and `"ĊĊ"`, which
the source code corpus holds). tokenizer.json is left out of the whitespace corpus (and so of the mixed one): its time
grows with the square of the length of a run of one character, which a table of its own measures. The decode
table decodes the ids of each corpus's first 50 documents: whole documents with each decoder, and one token at a time
as serve streams (`tokenizers.decoders.DecodeStream` on tokenizer.json) and through `transformers.TextStreamer`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time

import torch
import transformers
from rwkv import rwkv_tokenizer
from tokenizers.decoders import DecodeStream

from visualrwkv_hf.tokenization_rwkv_world import VOCAB_FILE_NAME, ByteTrieEncoder, RwkvWorldTokenizer


def build_corpora(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    source_root = os.path.dirname(transformers.__file__)
    source_files = [
        os.path.join(source_root, "models", "llama", "modeling_llama.py"),
        os.path.join(source_root, "models", "llama", "configuration_llama.py"),
        os.path.join(source_root, "generation", "utils.py"),
        os.path.join(source_root, "generation", "logits_process.py"),
    ]
    source = [open(path, encoding="utf-8").read() for path in source_files]

    english = "the red bus stops at the corner while a small dog runs across the busy street and children laugh".split()
    prose = [
        " ".join(rng.choice(english) for _ in range(rng.randint(50, 400))).capitalize() + ".\n\n" for _ in range(300)
    ]
    cjk = [
        "".join(chr(rng.randint(0x4E00, 0x9FFF)) if rng.random() < 0.9 else "，" for _ in range(rng.randint(50, 400)))
        for _ in range(300)
    ]
    cjk += ["你好，世界！今天天气很好，我们去公园散步吧。日本語のテキストです。한국어 문장입니다。" * 20] * 50
    emoji_set = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🚌", "✨", " ", "ok "]
    emoji = ["".join(rng.choice(emoji_set) for _ in range(rng.randint(20, 200))) for _ in range(300)]
    whitespace = [rng.choice([" ", "\t", "\n", "\r\n", "x"]) * rng.randint(1, 3000) for _ in range(300)]
    random_unicode = [
        "".join(chr(code) for code in (rng.randrange(0x110000) for _ in range(300)) if not 0xD800 <= code <= 0xDFFF)
        for _ in range(200)
    ]
    corpora = {
        "source code": source,
        "prose": prose,
        "CJK": cjk,
        "emoji": emoji,
        "whitespace": whitespace,
        "random unicode": random_unicode,
    }
    corpora["all (mixed)"] = [document for documents in corpora.values() for document in documents]
    return corpora


def best_seconds_interleaved(encoders: dict, documents: list[str], repeats: int) -> dict[str, float]:
    """Best time of each encoder; the encoders take turns within each repeat so that load from other processes on
    the machine weighs on all of them alike."""
    best = dict.fromkeys(encoders, float("inf"))
    for _ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            encode(documents)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


DECODE_DOCUMENTS = 50  # per corpus: streaming one token at a time is slow in every decoder

# The literal texts tokenizer.json encodes to a special token's id (see `build_backend_tokenizer`).
LITERAL_SPECIAL_IDS = {"<|endoftext|>": 0, "\u010a\u010a": 261}


def reference_ids_with_literal_specials(reference, text: str) -> list[int]:
    ids = []
    for piece in re.split("(<\\|endoftext\\|>|\u010a\u010a)", text):
        ids += [LITERAL_SPECIAL_IDS[piece]] if piece in LITERAL_SPECIAL_IDS else reference.encode(piece)
    return ids


def stream_with_decode_stream(backend, ids: list[int]) -> str:
    stream = DecodeStream([], skip_special_tokens=False)
    return "".join(piece for piece in (stream.step(backend, token_id) for token_id in ids) if piece is not None)


def stream_with_text_streamer(tokenizer, ids: list[int]) -> str:
    pieces = []

    class Capture(transformers.TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            pieces.append(text)

    streamer = Capture(tokenizer)
    for token_id in ids:  # what generate() does: one new token per step
        streamer.put(torch.tensor([token_id]))
    streamer.end()
    return "".join(pieces)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best is kept")
    args = parser.parse_args()

    reference = rwkv_tokenizer.TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv_tokenizer.__file__), VOCAB_FILE_NAME))
    tokenizer = RwkvWorldTokenizer()
    tokenizer.encode("build the encoder before timing")
    fallback = ByteTrieEncoder(tokenizer._token_bytes_by_id)

    backend = tokenizer._tokenizer
    encoders = {
        "reference TRIE_TOKENIZER": lambda docs: [reference.encode(doc) for doc in docs],
        "ours tokenizer.encode": lambda docs: [tokenizer.encode(doc) for doc in docs],
        "ours tokenizer(batch)": lambda docs: tokenizer(docs)["input_ids"],
        "ours encode_to_ids": lambda docs: [tokenizer.encode_to_ids(doc) for doc in docs],
        "ours pure-Python fallback": lambda docs: [fallback.encode(doc) for doc in docs],
        "tokenizer.json (tokenizers)": lambda docs: [backend.encode(doc).ids for doc in docs],
    }
    print(f"encoder in use: {type(tokenizer._encoder).__module__}.{type(tokenizer._encoder).__name__}")
    results = {}
    corpora = build_corpora()
    for corpus_name, documents in corpora.items():
        megabytes = sum(len(document.encode("utf-8")) for document in documents) / 1e6
        expected = encoders["reference TRIE_TOKENIZER"](documents)
        print(f"\n{corpus_name}: {len(documents)} documents, {megabytes:.2f} MB")
        corpus_encoders = dict(encoders)
        if corpus_name in ("whitespace", "all (mixed)"):
            del corpus_encoders["tokenizer.json (tokenizers)"]
        for encoder_name, encode in corpus_encoders.items():
            if encoder_name == "tokenizer.json (tokenizers)":
                wanted = [reference_ids_with_literal_specials(reference, document) for document in documents]
            else:
                wanted = expected
            if encode(documents) != wanted:
                raise AssertionError(f"{encoder_name} differs from the reference on {corpus_name}")
        timings = best_seconds_interleaved(corpus_encoders, documents, args.repeats)
        for encoder_name, seconds in timings.items():
            ratio = timings["reference TRIE_TOKENIZER"] / seconds
            print(f"  {encoder_name:28s} {megabytes / seconds:8.2f} MB/s   x{ratio:6.2f}")
            row = {"MB/s": round(megabytes / seconds, 2), "ratio": round(ratio, 2)}
            results.setdefault(corpus_name, {})[encoder_name] = row

    print("\nencoding one run of a repeated character (milliseconds): tokenizer.json's worst case")
    for character in (" ", "\t", "\u3000"):
        for length in (250, 500, 1000, 2000):
            text = character * length
            seconds = {}
            encoders_to_time = (("ours", tokenizer.encode_to_ids), ("tokenizer.json", lambda t: backend.encode(t).ids))
            for name, encode in encoders_to_time:
                start = time.perf_counter()
                ids = encode(text)
                seconds[name] = time.perf_counter() - start
            assert ids == reference.encode(text)
            print(f"  {character!r} x {length:5d}: ours {seconds['ours'] * 1e3:8.2f} ms, tokenizer.json "
                  f"{seconds['tokenizer.json'] * 1e3:9.1f} ms")
            results.setdefault("runs", {})[f"{character!r} x {length}"] = {
                name: round(value * 1e3, 2) for name, value in seconds.items()
            }
    print("\ndecode (MB of text per second; ratios against the reference's decode)")
    decoders = {
        "reference TRIE_TOKENIZER": lambda rows: [reference.decode(ids) for ids in rows],
        "ours tokenizer.decode": lambda rows: [tokenizer.decode(ids) for ids in rows],
        "tokenizer.json decode": lambda rows: [backend.decode(ids, skip_special_tokens=False) for ids in rows],
        "stream: DecodeStream": lambda rows: [stream_with_decode_stream(backend, ids) for ids in rows],
        "stream: TextStreamer": lambda rows: [stream_with_text_streamer(tokenizer, ids) for ids in rows],
    }
    for corpus_name in ("source code", "prose", "CJK", "emoji"):
        documents = corpora[corpus_name][:DECODE_DOCUMENTS]
        rows = [tokenizer.encode(document) for document in documents]
        megabytes = sum(len(document.encode("utf-8")) for document in documents) / 1e6
        timings = best_seconds_interleaved(decoders, rows, args.repeats)
        print(f"  {corpus_name}")
        for decoder_name, seconds in timings.items():
            ratio = timings["reference TRIE_TOKENIZER"] / seconds
            print(f"    {decoder_name:26s} {megabytes / seconds:8.2f} MB/s   x{ratio:6.2f}")
            row = {"MB/s": round(megabytes / seconds, 2), "ratio": round(ratio, 2)}
            results.setdefault(f"decode {corpus_name}", {})[decoder_name] = row

    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
