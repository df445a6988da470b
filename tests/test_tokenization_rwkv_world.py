"""RwkvWorldTokenizer: id for id equal to the reference `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`, and a usable
transformers tokenizer."""

from __future__ import annotations

import asyncio
import copy
import filecmp
import json
import os
import pickle
import random
import re
import sys

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerFast, TextStreamer
from transformers.generation.stopping_criteria import StopStringCriteria

from visualrwkv_hf.configuration_rwkv6 import Rwkv6Config
from visualrwkv_hf.processing_visualrwkv import cut_answer
from visualrwkv_hf.tokenization_rwkv_world import (
    PACKAGED_VOCAB_FILE,
    PAD_TOKEN_ID,
    TOKENIZER_JSON_FILE_NAME,
    TURN_END_TOKEN_ID,
    VOCAB_FILE_NAME,
    ByteTrieEncoder,
    RwkvWorldTokenizer,
)


rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer", reason="the reference comes with `pip install rwkv`")
REFERENCE_VOCAB_FILE = os.path.join(os.path.dirname(rwkv_tokenizer.__file__), VOCAB_FILE_NAME)


@pytest.fixture(scope="module")
def reference():
    return rwkv_tokenizer.TRIE_TOKENIZER(REFERENCE_VOCAB_FILE)


@pytest.fixture(scope="module")
def tokenizer():
    return RwkvWorldTokenizer()


def source_code_samples() -> list[str]:
    """Real source files from installed packages (Python and its docstrings, comments, string escapes)."""
    import email
    import json as json_module

    import transformers

    folders = [
        os.path.dirname(json_module.__file__),
        os.path.dirname(email.__file__),
        os.path.join(os.path.dirname(transformers.__file__), "models", "llama"),
        os.path.join(os.path.dirname(transformers.__file__), "generation"),
    ]
    samples = []
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as source:
                    samples.append(source.read())
    return samples


def prose_samples(rng: random.Random) -> list[str]:
    """Generated sentences in several scripts, with punctuation, digits, capitals and paragraph breaks."""
    words = {
        "en": "the bus is red and a small dog runs across the street while children laugh at it".split(),
        "de": "Straße über Mädchen größer schön Bücher fährt Fußgänger Brücke".split(),
        "fr": "été élève garçon déjà où français naïve cœur Noël".split(),
        "ru": "автобус красный собака бежит через улицу дети смеются".split(),
        "ar": "الحافلة حمراء الكلب يجري عبر الشارع".split(),
        "hi": "बस लाल है कुत्ता सड़क पार दौड़ता".split(),
        "el": "το λεωφορείο είναι κόκκινο και ο σκύλος τρέχει".split(),
    }
    samples = []
    for _ in range(300):
        language = rng.choice(sorted(words))
        sentences = []
        for _ in range(rng.randint(1, 8)):
            sentence = " ".join(rng.choice(words[language]) for _ in range(rng.randint(3, 20)))
            sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ",", ";", ":", " 42.", "…"])
            sentences.append(sentence)
        samples.append(rng.choice([" ", "\n", "\n\n", "  "]).join(sentences))
    samples.append("User: What color is the bus?\nAnswer the question using a single word or phrase.\n\n")
    samples.append("Assistant: Red\n\nUser: And the car?\n\nAssistant:")
    return samples


def cjk_samples(rng: random.Random) -> list[str]:
    fixed = [
        "你好，世界！今天天气很好，我们去公园散步吧。",
        "日本語のテキストです。ひらがな、カタカナ、漢字が混ざっています。",
        "한국어 문장입니다. 버스는 빨간색입니다.",
        "中文与English混合的句子，包含数字123和标点。",
        "全角スペース　と　句読点、。「」『』",
    ]
    ranges = [
        (0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x3000, 0x303F)
    ]
    generated = []
    for _ in range(200):
        low, high = rng.choice(ranges)
        generated.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 60))))
    return fixed * 20 + generated


def emoji_samples(rng: random.Random) -> list[str]:
    emoji = [
        "😀", "👍", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "🇺🇸", "❤️", "🏳️‍🌈",
        "🧑🏿‍💻", "🐍", "🚌", "✨", "1️⃣", "©️", "🫠", "🤌🏻",
    ]
    samples = []
    for _ in range(300):
        samples.append("".join(rng.choice(emoji + [" ", "a", "好", "\n"]) for _ in range(rng.randint(1, 40))))
    return samples


def control_and_whitespace_samples(rng: random.Random) -> list[str]:
    controls = [chr(code) for code in range(0x20)] + ["\x7f"] + [chr(code) for code in range(0x80, 0xA0)]
    whitespace = [" ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\u00a0", "\u2003", "\u3000", "\u200b", "\ufeff"]
    samples = ["".join(controls), "\x00" * 100, "a\x00b\x00\x00c"]
    for length in (1, 2, 3, 7, 16, 31, 64, 100, 127, 128, 129, 255, 256, 1000, 5000):
        for character in (" ", "\t", "\n", "\r\n", "\u3000"):
            samples.append(character * length)
            samples.append("x" + character * length + "y")
    for _ in range(300):
        pieces = [rng.choice(controls + whitespace + ["a", "é", "中"]) * rng.randint(1, 9) for _ in range(30)]
        samples.append("".join(pieces))
    samples.append("    def f(x):\n        return x\n\n\n\n" * 50)
    return samples


def random_unicode_samples(rng: random.Random) -> list[str]:
    """Random code points of every plane (surrogates excluded: no UTF-8 encoding exists for them)."""

    def random_character() -> str:
        limit = rng.choice([0x80, 0x800, 0x10000, 0x110000])
        while True:
            code = rng.randrange(limit)
            if not 0xD800 <= code <= 0xDFFF:
                return chr(code)

    return ["".join(random_character() for _ in range(rng.randint(0, 200))) for _ in range(500)]


def vocabulary_collage_samples(rng: random.Random, reference) -> list[str]:
    """Random runs of vocabulary tokens: where greedy longest match has the most choices to get wrong."""
    token_bytes = list(reference.idx2token.values())
    samples = []
    for _ in range(500):
        data = b"".join(rng.choice(token_bytes) for _ in range(rng.randint(1, 50)))
        samples.append(data.decode("utf-8", "replace"))
    return samples


@pytest.fixture(scope="module")
def corpus(reference) -> list[str]:
    rng = random.Random(20230424)
    samples = (
        source_code_samples()
        + prose_samples(rng)
        + cjk_samples(rng)
        + emoji_samples(rng)
        + control_and_whitespace_samples(rng)
        + random_unicode_samples(rng)
        + vocabulary_collage_samples(rng, reference)
    )
    # One multi-megabyte input, to catch length-dependent behaviour.
    samples.append("\n".join(samples[:400]) * 2)
    return samples


def test_corpus_is_large_and_varied(corpus):
    total_bytes = sum(len(sample.encode("utf-8")) for sample in corpus)
    assert total_bytes > 3_000_000
    assert max(len(sample.encode("utf-8")) for sample in corpus) > 1_000_000
    assert len(corpus) > 2000


def test_encode_matches_reference_on_corpus(tokenizer, reference, corpus):
    for sample in corpus:
        expected = reference.encode(sample)
        assert tokenizer.encode(sample) == expected, sample[:200]
        assert tokenizer(sample)["input_ids"] == expected


def test_fast_encoder_is_in_use(tokenizer):
    pytest.importorskip("pyrwkv_tokenizer")
    tokenizer.encode("warm up")
    assert not isinstance(tokenizer._encoder, ByteTrieEncoder)


def test_pure_python_fallback_matches_reference(tokenizer, reference, corpus):
    fallback = ByteTrieEncoder(tokenizer._token_bytes_by_id)
    for sample in corpus[::7]:
        assert fallback.encode(sample) == reference.encode(sample), sample[:200]


def test_batch_encode_matches_reference(tokenizer, reference, corpus):
    batch = corpus[100:400]
    assert tokenizer(batch)["input_ids"] == [reference.encode(sample) for sample in batch]


def test_every_token_encodes_to_itself(tokenizer, reference):
    for token_id, token_bytes in reference.idx2token.items():
        try:
            text = token_bytes.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tokenizer.encode(text) == [token_id] == reference.encode(text)
        assert tokenizer.convert_tokens_to_ids(text) == token_id


def test_token_strings_map_one_to_one_onto_token_bytes(tokenizer, reference):
    assert tokenizer.vocab_size == len(tokenizer) == 65530
    for token_id, token_bytes in reference.idx2token.items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        assert token.encode("utf-8", "surrogateescape") == token_bytes
        assert tokenizer.convert_tokens_to_ids(token) == token_id


def test_tokenize_path_agrees_with_encode(tokenizer, corpus):
    for sample in corpus[::50]:
        assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(sample)) == tokenizer.encode(sample)


def test_decode_round_trip(tokenizer, corpus):
    for sample in corpus:
        assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_decode_invalid_utf8_replaces(tokenizer, reference):
    rng = random.Random(7)
    byte_token_ids = list(range(129, 257))  # single bytes 0x80..0xFF: never valid UTF-8 alone
    for _ in range(500):
        ids = [rng.choice(byte_token_ids + [rng.randint(1, 65529)]) for _ in range(rng.randint(1, 12))]
        assert tokenizer.decode(ids) == reference.decodeBytes(ids).decode("utf-8", "replace")
    # Streamed answers do cut characters between tokens: a prefix then ends in U+FFFD.
    emoji_ids = tokenizer.encode("😀")
    assert len(emoji_ids) > 1
    assert tokenizer.decode(emoji_ids[:-1]).endswith("\ufffd")


def test_spec_token_ids(tokenizer):
    assert tokenizer.encode("User: What color is the bus?\n") == [24281, 59, 30031, 38083, 4600, 22590, 21399, 64, 11]
    assert tokenizer.encode("Assistant: Red\n\n") == [5585, 41693, 59, 20733, 261]
    assert tokenizer.encode("Assistant:") == [5585, 41693, 59]
    assert tokenizer.encode("\n\n") == [261]
    assert tokenizer.encode("User: ") == [24281, 59, 33]
    question_turn = tokenizer.encode("\nWhat color is the bus?\nAnswer the question using a single word or phrase.\n\n")
    assert question_turn[:3] == [11, 24326, 38083] and question_turn[-2:] == [47, 261]
    assert tokenizer.encode("\n") == [11]
    assert tokenizer.encode("") == []


def test_turn_end_and_pad_constants_are_the_vocabularys_ids(tokenizer, reference):
    # The ids generation stops on and pads with, which config, converters and CLI read from here.
    assert reference.encode("\n\n") == [TURN_END_TOKEN_ID] == tokenizer.encode("\n\n")
    assert tokenizer.convert_tokens_to_ids("\n\n") == TURN_END_TOKEN_ID
    assert tokenizer.pad_token_id == PAD_TOKEN_ID


def test_special_tokens(tokenizer, reference):
    assert tokenizer.pad_token_id == 0 and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0
    assert tokenizer.bos_token is None
    # Nothing is added around the text, and text is never parsed for special tokens by default.
    assert tokenizer("hi", add_special_tokens=True)["input_ids"] == tokenizer.encode("hi") == reference.encode("hi")
    assert 0 not in tokenizer.encode("<|endoftext|>")
    assert tokenizer.encode("<|endoftext|>", split_special_tokens=False) == [0]
    # The chat terminator is an ordinary token that converts and decodes both ways.
    assert tokenizer.convert_tokens_to_ids("\n\n") == 261
    assert tokenizer.convert_ids_to_tokens(261) == "\n\n"
    assert tokenizer.decode([261]) == tokenizer.decode(261) == "\n\n"
    # Skipping special tokens drops it (the generation's stop token) with id 0; without skipping, nothing is dropped.
    assert tokenizer.decode([5585, 41693, 59, 20733, 261, 0], skip_special_tokens=True) == "Assistant: Red"
    assert tokenizer.decode([5585, 41693, 59, 20733, 261, 0]) == "Assistant: Red\n\n<|endoftext|>"
    # Ids the model has but the vocabulary lacks decode to nothing.
    assert tokenizer.decode([20733, 65535]) == " Red"
    assert tokenizer.convert_tokens_to_ids("not a single token") is None


def test_added_token_recognised_on_request():
    tokenizer = RwkvWorldTokenizer()
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == 65530
    text = "User: What color?\n<image>\nAnswer:"
    expected = tokenizer.encode("User: What color?\n") + [image_id] + tokenizer.encode("\nAnswer:")
    assert tokenizer.encode(text, split_special_tokens=False) == expected
    assert tokenizer(text, split_special_tokens=False)["input_ids"] == expected
    assert image_id not in tokenizer.encode(text)
    assert tokenizer.decode(expected) == text


def test_padding_and_tensors(tokenizer):
    texts = ["User: What color is the bus?\n", "Assistant: Red\n\n", ""]
    ids = [tokenizer.encode(text) for text in texts]
    longest = max(map(len, ids))

    right = tokenizer(texts, padding=True, return_tensors="pt")
    assert right["input_ids"].shape == (3, longest) and right["input_ids"].dtype == torch.long
    assert set(right) == {"input_ids", "attention_mask"}
    for row, row_ids in enumerate(ids):
        assert right["input_ids"][row].tolist() == row_ids + [0] * (longest - len(row_ids))
        assert right["attention_mask"][row].tolist() == [1] * len(row_ids) + [0] * (longest - len(row_ids))

    left = tokenizer(texts, padding="longest", padding_side="left", return_tensors="pt")
    for row, row_ids in enumerate(ids):
        assert left["input_ids"][row].tolist() == [0] * (longest - len(row_ids)) + row_ids
        assert left["attention_mask"][row].tolist() == [0] * (longest - len(row_ids)) + [1] * len(row_ids)

    fixed = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    assert fixed["input_ids"].shape == (3, 12)
    multiple = tokenizer(texts, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    assert multiple["input_ids"].shape == (3, 16)

    truncated = tokenizer(texts, truncation=True, max_length=4, padding=True, return_tensors="pt")
    assert truncated["input_ids"][0].tolist() == ids[0][:4]

    single = tokenizer(texts[0], return_tensors="pt")
    assert single["input_ids"].tolist() == [ids[0]]

    padded_later = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt")
    assert torch.equal(padded_later["input_ids"], left["input_ids"])


def test_padding_side_attribute_is_honoured():
    tokenizer = RwkvWorldTokenizer(padding_side="left")
    batch = tokenizer(["a b c", "a"], padding=True)
    assert batch["input_ids"][1][0] == 0 and batch["attention_mask"][1] == [0, 0, 1]


def test_save_and_load_with_auto_tokenizer(tokenizer, tmp_path, corpus):
    AutoTokenizer.register(Rwkv6Config, tokenizer_class=RwkvWorldTokenizer, exist_ok=True)
    saved_files = tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / VOCAB_FILE_NAME).is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert str(tmp_path / VOCAB_FILE_NAME) in saved_files
    assert filecmp.cmp(tmp_path / VOCAB_FILE_NAME, PACKAGED_VOCAB_FILE, shallow=False)
    saved_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved_config["tokenizer_class"] == "RwkvWorldTokenizer"
    assert saved_config["split_special_tokens"] is True

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is RwkvWorldTokenizer
    assert loaded.vocab_file == str(tmp_path / VOCAB_FILE_NAME)
    assert (loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (0, 0, 65530)
    for sample in corpus[::40]:
        assert loaded.encode(sample) == tokenizer.encode(sample)

    # Next to a model config (the checkpoint layout), the registration resolves the class too.
    model_dir = tmp_path / "model"
    Rwkv6Config().save_pretrained(model_dir)
    loaded.save_pretrained(model_dir)
    assert type(AutoTokenizer.from_pretrained(model_dir)) is RwkvWorldTokenizer


def test_vocab_file_ships_with_the_package():
    assert os.path.isfile(PACKAGED_VOCAB_FILE)
    with open(PACKAGED_VOCAB_FILE, "rb") as packaged, open(REFERENCE_VOCAB_FILE, "rb") as upstream:
        assert packaged.read() == upstream.read()


def test_pickle_and_deepcopy(tokenizer):
    tokenizer.encode("build the encoder first")
    for clone in (pickle.loads(pickle.dumps(tokenizer)), copy.deepcopy(tokenizer)):
        assert clone.encode("User: 你好 😀\n\n") == tokenizer.encode("User: 你好 😀\n\n")


def test_lone_surrogates_are_rejected_like_the_reference(tokenizer, reference):
    with pytest.raises(UnicodeEncodeError):
        reference.encode("a\ud800b")
    with pytest.raises(UnicodeEncodeError):
        tokenizer.encode("a\ud800b")


@pytest.mark.parametrize(
    "answer",
    [
        "红色的公共汽车停在路边。天气很好！",
        "Sure 😀👍🏽 the bus is red 🚌🇯🇵 and 👨‍👩‍👧‍👦 ride it.\nNext line 你好 mixed 한국어 text…",
        "日本語とemoji🫠が混ざった文章です。\n\n最後の行🏳️‍🌈",
        "Ünïcödé wörds — with “quotes” and ½ ¾ symbols ✨\n  indented 🐍 code\n",
    ],
)
def test_text_streamer_prints_exactly_the_text(tokenizer, answer):
    ids = tokenizer.encode(answer)
    printed: list[str] = []

    class CapturingStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            printed.append(text)

    streamer = CapturingStreamer(tokenizer)
    for token_id in ids:  # what generate() does: one new token per step
        streamer.put(torch.tensor([[token_id]]))
    streamer.end()
    assert "".join(printed) == answer
    assert not any("\ufffd" in piece for piece in printed)


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("padding", [False, True, "max_length"])
@pytest.mark.parametrize("padding_side", [None, "left"])
@pytest.mark.parametrize("return_tensors", [None, "pt"])
@pytest.mark.parametrize("return_attention_mask", [None, False])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_lean_path_equals_base_path(
    tokenizer, single, padding, padding_side, return_tensors, return_attention_mask, pad_to_multiple_of
):
    texts = ["User: What color is the bus?\n", "", "你好 😀\n\n", "Assistant:"]
    if return_tensors and not padding and not single:
        pytest.skip("ragged rows cannot become one tensor")
    options = dict(
        padding=padding,
        max_length=16 if padding == "max_length" else None,
        padding_side=padding_side,
        return_tensors=return_tensors,
        return_attention_mask=return_attention_mask,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    text = texts[0] if single else texts
    lean = tokenizer(text, **options)
    # With special-token splitting off (and no special token in the text) the base class does all the work.
    base = tokenizer(text, split_special_tokens=False, **options)
    assert set(lean) == set(base)
    for key in base:
        if return_tensors:
            assert torch.equal(lean[key], base[key])
        else:
            assert lean[key] == base[key]


def test_without_pyrwkv_tokenizer_the_pure_python_encoder_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyrwkv_tokenizer", None)  # makes the import fail
    tokenizer = RwkvWorldTokenizer()
    assert tokenizer.encode("Assistant: Red\n\n") == [5585, 41693, 59, 20733, 261]
    assert isinstance(tokenizer._encoder, ByteTrieEncoder)


def test_plain_encode_equals_base_path(tokenizer, corpus):
    for sample in corpus[::25] + [""]:
        assert tokenizer.encode(sample) == tokenizer.encode(sample, split_special_tokens=False)
        assert tokenizer.encode(sample, add_special_tokens=False) == tokenizer.encode(sample)
    assert tokenizer.encode("a b c d", truncation=True, max_length=2) == tokenizer.encode("a b c d")[:2]
    assert tokenizer.encode("a b", return_tensors="pt").tolist() == [tokenizer.encode("a b")]


# ---------------------------------------------------------------- ids that are no token, garbled vocabularies


def test_decoding_an_id_that_is_no_token_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"Cannot decode token id -100: .*replace it before decoding"):
        tokenizer.decode([20733, -100])
    with pytest.raises(ValueError, match=r"Cannot decode token id 70000: the vocabulary has ids 0\.\.65529"):
        tokenizer.decode([70000])
    with pytest.raises(ValueError, match="-100"):
        tokenizer.batch_decode(torch.tensor([[20733, 261], [20733, -100]]))
    with pytest.raises(ValueError, match="65536"):
        tokenizer.convert_ids_to_tokens(65536)
    # The recipe the message gives works; the embedding rows past the vocabulary still decode to nothing.
    labels = torch.tensor([20733, -100, 261])
    labels[labels == -100] = tokenizer.pad_token_id
    assert tokenizer.decode(labels, skip_special_tokens=True) == "Red"
    assert tokenizer.decode([20733, 65530, 65535]) == " Red"


def vocab_lines() -> list[str]:
    with open(PACKAGED_VOCAB_FILE, encoding="utf-8") as vocab:
        return vocab.read().split("\n")


@pytest.mark.parametrize(
    "line_index, replacement, message",
    [
        (99, "100 'abc 3", "not one Python string or bytes literal"),
        (99, "100 'a', 'b' 2", "not one Python string or bytes literal"),
        (99, "100 'ab' # 2", "not one Python string or bytes literal"),
        (99, "100 'ab'", "cannot read the id, the token and the byte length"),
        (99, "100 'ab' 3", "the token has 2 bytes, not 3"),
        (99, "one 'ab' 2", "cannot read the id"),
        (99, "100", "cannot read the id"),
        (99, "100 12 2", "not one Python string or bytes literal"),
        (99, "99 'zq' 2", "id 99 is already on line 99"),
        (99, "70000 'zq' 2", "ids must be exactly 1..65529"),
    ],
)
def test_a_garbled_vocabulary_names_the_file_and_the_line(tmp_path, line_index, replacement, message):
    lines = vocab_lines()
    lines[line_index] = replacement
    garbled = tmp_path / VOCAB_FILE_NAME
    garbled.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{garbled}, line {line_index + 1}: ") + ".*" + message):
        RwkvWorldTokenizer(vocab_file=str(garbled))


def test_vocabulary_file_errors_without_a_bad_literal(tmp_path):
    lines = vocab_lines()
    duplicate = tmp_path / "duplicate.txt"  # line 300's token again, under line 301's id
    lines_with_duplicate = list(lines)
    lines_with_duplicate[300] = "301 " + lines[299].split(" ", 1)[1]
    duplicate.write_text("\n".join(lines_with_duplicate), encoding="utf-8")
    with pytest.raises(ValueError, match=r"duplicate.txt, line 301: token .* is already id 300 \(line 300\)"):
        RwkvWorldTokenizer(vocab_file=str(duplicate))
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("\n".join(lines[:10]).encode() + b"\n11 '\xe9' 1\n")
    with pytest.raises(ValueError, match=r"latin1.txt, line 11: not UTF-8 text"):
        RwkvWorldTokenizer(vocab_file=str(not_utf8))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt: the vocabulary file is empty"):
        RwkvWorldTokenizer(vocab_file=str(empty))


# ---------------------------------------------------------------- offsets, max_length padding


def oracle_offsets(text: str, ids: list[int], token_bytes: list[bytes]) -> list[tuple[int, int]]:
    """Character spans from the bytes each token covers: a token's start is the character its first byte belongs
    to, its end one past the character its last byte belongs to."""
    data, offsets, start = text.encode("utf-8"), [], 0
    for token_id in ids:
        end = start + len(token_bytes[token_id])
        assert data[start:end] == token_bytes[token_id]
        offsets.append((len(data[:start].decode("utf-8", "ignore")), len(data[:end].decode("utf-8", "replace"))))
        start = end
    return offsets


def test_offsets_mapping_spans_each_token_in_characters(tokenizer, reference, corpus):
    token_bytes = [b""] + [reference.idx2token[token_id] for token_id in range(1, 65530)]
    samples = [sample for sample in corpus[::10] if len(sample) < 20000]
    samples += ["", "é😀x", "a\u0301 \U0001f1eb\U0001f1f7"]  # combining accent, flag
    for sample in samples:
        encoded = tokenizer(sample, return_offsets_mapping=True)
        assert encoded["input_ids"] == reference.encode(sample)
        assert encoded["offset_mapping"] == oracle_offsets(sample, encoded["input_ids"], token_bytes)
    ascii_text = "User: What color is the bus?\n\n"
    encoded = tokenizer(ascii_text, return_offsets_mapping=True)
    assert [ascii_text[start:end] for start, end in encoded["offset_mapping"]] == tokenizer.convert_ids_to_tokens(
        encoded["input_ids"]
    )
    emoji = tokenizer("😀", return_offsets_mapping=True)
    assert len(emoji["input_ids"]) > 1 and set(emoji["offset_mapping"]) == {(0, 1)}  # its tokens share it


def test_offsets_mapping_with_batches_padding_truncation_and_tensors(tokenizer):
    texts = ["héllo wörld, how are you?", "😀", ""]
    singles = [tokenizer(text, return_offsets_mapping=True) for text in texts]
    longest = max(len(single["input_ids"]) for single in singles)
    for side in ("left", "right"):
        batch = tokenizer(texts, return_offsets_mapping=True, padding=True, padding_side=side, return_tensors="pt")
        assert batch["offset_mapping"].shape == (3, longest, 2)
        for row, single in enumerate(singles):
            pad = [[0, 0]] * (longest - len(single["input_ids"]))
            spans = [list(span) for span in single["offset_mapping"]]
            assert batch["offset_mapping"][row].tolist() == (pad + spans if side == "left" else spans + pad)
            assert batch["input_ids"][row].tolist() == tokenizer(texts[row], padding="max_length", max_length=longest,
                                                                 padding_side=side)["input_ids"]
    cut = tokenizer(texts[0], return_offsets_mapping=True, truncation=True, max_length=3)
    assert cut["offset_mapping"] == singles[0]["offset_mapping"][:3] and cut["input_ids"] == singles[0]["input_ids"][:3]
    assert tokenizer(texts, return_offsets_mapping=True)["offset_mapping"] == [s["offset_mapping"] for s in singles]
    with pytest.raises(ValueError, match="plain texts only, not with a text pair"):
        tokenizer("a", "b", return_offsets_mapping=True)
    with pytest.raises(ValueError, match="split_special_tokens=False"):
        tokenizer("a", return_offsets_mapping=True, split_special_tokens=False)


def test_max_length_padding_shorter_than_a_text_behaves_as_transformers(tokenizer):
    # What any transformers Python tokenizer (the base class path) does: the longer row stays longer unless
    # truncation is asked for, and tensors then cannot be made.
    texts = ["User: What color is the bus?\n", "Hi"]
    lean = tokenizer(texts, padding="max_length", max_length=4)
    assert lean == tokenizer(texts, padding="max_length", max_length=4, split_special_tokens=False)
    assert [len(row) for row in lean["input_ids"]] == [9, 4]
    with pytest.raises(ValueError, match="truncation"):
        tokenizer(texts, padding="max_length", max_length=4, return_tensors="pt")
    cut = tokenizer(texts, padding="max_length", max_length=4, truncation=True, return_tensors="pt")
    assert cut["input_ids"].shape == (2, 4)


# tokenizer.json: the `tokenizers` (Rust) form of the tokenizer, `tokenizer._tokenizer`.

# The two literal texts tokenizer.json encodes to a special token id where the reference encodes their bytes.
LITERAL_SPECIAL_IDS = {"<|endoftext|>": 0, "\u010a\u010a": TURN_END_TOKEN_ID}


def reference_ids_with_literal_specials(reference, text: str) -> list[int]:
    ids = []
    for piece in re.split("(<\\|endoftext\\|>|\u010a\u010a)", text):
        ids += [LITERAL_SPECIAL_IDS[piece]] if piece in LITERAL_SPECIAL_IDS else reference.encode(piece)
    return ids


def test_tokenizer_json_encodes_id_for_id_like_the_reference(tokenizer, reference, corpus):
    backend = tokenizer._tokenizer
    # Every other sample, without the multi-megabyte one: this encoder runs at about 0.2-1 MB/s here.
    samples = [sample for sample in corpus[::2] if len(sample) < 1_000_000]
    checked = 0
    for sample in samples:
        # WordPiece's time grows with the square of a piece's length: the few samples with a piece of over 400 bytes,
        # long runs of one whitespace character, take seconds to minutes (benchmarks/bench_tokenizer.py times them).
        if max((len(piece) for piece, _ in backend.pre_tokenizer.pre_tokenize_str(sample)), default=0) > 400:
            continue
        assert backend.encode(sample).ids == reference_ids_with_literal_specials(reference, sample), sample[:200]
        checked += 1
    assert checked > 0.97 * len(samples)


def test_tokenizer_json_differs_only_on_two_literal_texts(tokenizer, reference):
    backend = tokenizer._tokenizer
    for text in ["x<|endoftext|>y", "a\u010a\u010ab", "\u010a\u010a\u010a", "<|endoftext|>\n\n\n"]:
        assert backend.encode(text).ids != reference.encode(text)
        assert backend.encode(text).ids == reference_ids_with_literal_specials(reference, text)
    # The turn end as text is never taken for the special token: "\n\n\n" is one token, as in the reference.
    for text in ["\n\n\n", "a\n\nb", "\n\n", "x\n\n\n\n\n"]:
        assert backend.encode(text).ids == reference.encode(text)
    assert backend.encode("\n\n\n").ids == [3328]


def random_ids(rng: random.Random, length: int) -> list[int]:
    """Ids of every kind: any token, single bytes 0x80-0xFF (ids 129-256: UTF-8 cut anywhere), 0, 261."""
    choices = [lambda: rng.randrange(1, 65530), lambda: rng.randrange(129, 257), lambda: rng.randrange(1, 128)]
    return [rng.choice(choices)() for _ in range(length)]


def test_tokenizer_json_decodes_the_bytes_as_python_does(tokenizer):
    backend = tokenizer._tokenizer
    rng = random.Random(7)
    for _ in range(3000):
        ids = random_ids(rng, rng.randint(0, 30))
        ids = [token_id for token_id in ids if token_id != TURN_END_TOKEN_ID]
        if rng.random() < 0.3:
            ids.insert(rng.randint(0, len(ids)), PAD_TOKEN_ID)
        exact = tokenizer.decode(ids)
        # Its decoder drops one leading space, skipping or not (`decode` without skipping keeps every byte).
        assert backend.decode(ids, skip_special_tokens=False) == (exact[1:] if exact.startswith(" ") else exact)
        generated = ids + [TURN_END_TOKEN_ID] * (rng.random() < 0.5) + [PAD_TOKEN_ID] * rng.randint(0, 2)
        expected = tokenizer.decode(generated, skip_special_tokens=True)
        assert backend.decode(generated, skip_special_tokens=True) == expected
    # Where the two differ: a turn end before the last token, which tokenizer.json drops and `decode` keeps.
    ids = tokenizer.encode(" a\n\nb") + [TURN_END_TOKEN_ID]
    assert ids.count(TURN_END_TOKEN_ID) == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a\n\nb"
    assert backend.decode(ids, skip_special_tokens=True) == "ab"


ANSWERS = [
    "yellow",
    "Red",
    "A red double-decker bus on a street, with two people waiting.",
    "你好，世界！今天天气很好。",
    "👨‍👩‍👧‍👦 🇯🇵 👍🏽 ✨",
    "Ünïcödé wörds — with “quotes” and ½ ¾",
    "line one\nline two\n    indented",
    "x" + "\t" * 7 + "y",
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_skip_special_tokens_decodes_a_generated_answer_as_the_pipeline_returns_it(tokenizer, answer):
    generated = tokenizer.encode(" " + answer) + [TURN_END_TOKEN_ID]  # the trained format; generation stops on 261
    assert cut_answer(tokenizer.decode(generated)) == answer  # what the pipeline returns
    assert tokenizer.decode(generated, skip_special_tokens=True) == answer
    assert tokenizer.decode(generated + [PAD_TOKEN_ID] * 3, skip_special_tokens=True) == answer  # a padded batch row
    assert tokenizer.batch_decode([generated], skip_special_tokens=True) == [answer]
    assert tokenizer.decode(generated) == " " + answer + "\n\n"  # without skipping, every byte


@pytest.mark.parametrize("answer", ANSWERS)
def test_serve_streams_the_answer_it_returns_without_streaming(tokenizer, answer):
    """What `transformers serve` does with a tokenizer: `processor.decode(ids, skip_special_tokens=True)` for a whole
    answer, and for streaming its `Detokenizer` over `tokenizer._tokenizer` (a `DecodeStream`), one token at a time."""
    serving_utils = pytest.importorskip("transformers.cli.serving.utils", reason="serve needs the `serve` extra")
    generated = tokenizer.encode(" " + answer) + [TURN_END_TOKEN_ID]
    queue = asyncio.Queue()
    detokenizer = serving_utils.Detokenizer(tokenizer._tokenizer, queue)
    for token_id in generated:
        detokenizer.put_token(token_id)
    detokenizer.end()
    pieces = [queue.get_nowait() for _ in range(queue.qsize())]
    assert pieces[-1] is None
    assert "".join(pieces[:-1]) == tokenizer.decode(generated, skip_special_tokens=True) == answer
    assert not any("\ufffd" in piece for piece in pieces[:-1])  # a character split over tokens waits for its end


def test_decode_stream_joins_to_the_decoded_text_on_the_corpus(tokenizer, corpus):
    backend = tokenizer._tokenizer
    rng = random.Random(3)
    for sample in corpus[::9][:200] + ["".join(chr(rng.randrange(0x80, 0x3000)) for _ in range(200))]:
        ids = tokenizer.encode(sample[:2000])
        stream = DecodeStream([], skip_special_tokens=True)
        pieces = [stream.step(backend, token_id) for token_id in ids]
        assert "".join(piece for piece in pieces if piece is not None) == backend.decode(ids, skip_special_tokens=True)


def test_added_tokens_are_in_tokenizer_json_with_their_ids():
    tokenizer = RwkvWorldTokenizer()
    assert tokenizer._tokenizer.token_to_id("<image>") is None
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})  # as the processor does
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    backend = tokenizer._tokenizer
    assert backend.token_to_id("<image>") == image_id == 65530
    assert backend.encode("a<image>b").ids == tokenizer.encode("a<image>b", split_special_tokens=False)
    assert backend.decode([20733, image_id, 261], skip_special_tokens=True) == "Red"


def test_saved_folder_carries_tokenizer_json_for_clients(tokenizer, reference, tmp_path, corpus):
    saved_files = tokenizer.save_pretrained(tmp_path)
    assert str(tmp_path / TOKENIZER_JSON_FILE_NAME) in saved_files
    # A client that reads only tokenizer.json: the `tokenizers` library, and transformers' generic fast tokenizer.
    client = Tokenizer.from_file(str(tmp_path / TOKENIZER_JSON_FILE_NAME))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / TOKENIZER_JSON_FILE_NAME))
    for sample in corpus[::50]:
        if len(sample) < 5000:
            expected = reference_ids_with_literal_specials(reference, sample)
            assert client.encode(sample).ids == fast.encode(sample) == expected
    generated = tokenizer.encode(" Red, a bus 🚌") + [TURN_END_TOKEN_ID]
    assert client.decode(generated, skip_special_tokens=True) == fast.decode(generated, skip_special_tokens=True)
    assert fast.decode(generated, skip_special_tokens=True) == "Red, a bus 🚌"

    # Loading the folder back: tokenizer.json's special turn end is not taken for an added token of this tokenizer.
    loaded = RwkvWorldTokenizer.from_pretrained(tmp_path)
    assert set(loaded.added_tokens_decoder) == {PAD_TOKEN_ID}
    assert loaded.convert_ids_to_tokens(TURN_END_TOKEN_ID) == "\n\n" and loaded.decode([TURN_END_TOKEN_ID]) == "\n\n"
    assert loaded.encode("\n\n\n", split_special_tokens=False) == [3328]
    # A folder saved before tokenizer.json existed loads too, and saving it again writes the same file.
    written = (tmp_path / TOKENIZER_JSON_FILE_NAME).read_bytes()
    (tmp_path / TOKENIZER_JSON_FILE_NAME).unlink()
    without = AutoTokenizer.from_pretrained(tmp_path)
    assert type(without) is RwkvWorldTokenizer and without.encode("Hello world") == tokenizer.encode("Hello world")
    without.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / TOKENIZER_JSON_FILE_NAME).read_bytes() == written


def test_stop_strings_still_match_text_token_strings(tokenizer):
    # `_tokenizer` is deliberately not `backend_tokenizer`, from which `generate(stop_strings=...)` would take the
    # vocabulary for byte-level symbols: "Ġ" (a character of that alphabet) would then never match.
    for stop, text in [("\u0120", "x\u0120"), ("caf\u00e9", "un caf\u00e9"), ("\n\n", "Red\n\n")]:
        criteria = StopStringCriteria(tokenizer, [stop])
        assert criteria(torch.tensor([tokenizer.encode(text)]), None).item(), stop
