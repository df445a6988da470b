"""The RWKV World tokenizer (`rwkv_vocab_v20230424.txt`) as a transformers tokenizer.

Encoding is the UTF-8 bytes of the text cut greedily, left to right, into the longest vocabulary entry (a byte trie);
there is no normalisation, no pre-tokenisation and nothing is added (no BOS/EOS). `return_offsets_mapping=True` gives
each token's span in characters of the text, as fast tokenizers do (the tokens that share a multi-byte character each
span that character). Decoding concatenates the token bytes and decodes them as UTF-8 with `errors="replace"`, so a
prefix that ends inside a multi-byte character ends in U+FFFD, which is what `transformers.TextStreamer` needs to wait
for the rest of the character. Ids past the vocabulary up to 65535 (embedding rows every World model has, which an
untrained model can sample) decode to nothing; a negative id (the label -100 most often) or a larger one raises a
`ValueError` saying so: a fast transformers tokenizer fails on -100 too (`OverflowError`), and one that skipped
70000 would hide a wrong id.

Encoder choice. The reference, `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`, is pure Python (about 1.5-7 MB/s here). The
Rust `pyrwkv-tokenizer` (`WorldTokenizer`) is the fast path: it loads any vocabulary file in this format, so we give
it ours (the file shipped in this package, or the one saved next to a checkpoint) and the vocabulary is ours by
construction; on top of that its string tokens are checked against ours when it is built. It matched the reference
id for id on source code, prose, CJK, emoji, control characters (NUL included), long whitespace runs, random Unicode
and multi-megabyte inputs, at 10-60x the reference's speed. Its limits shape the rest of this module: it takes only
`str` (the same UTF-8 encoding as the reference; lone surrogates raise `UnicodeEncodeError` in both), its own decode
panics on invalid UTF-8 (so decoding is done here), and building it takes about a second (so it is built on the first
encode, not at load, and is dropped when the tokenizer is pickled). Without the package, a pure-Python byte trie
gives the same ids, only slower.

Token strings. A token's string is its bytes decoded as UTF-8 with `errors="surrogateescape"`: text tokens read as
themselves (`convert_tokens_to_ids("\\n\\n") == 261`), and the bytes of tokens that are not valid UTF-8 on their own
become lone surrogates, which no text token contains, so the mapping is one-to-one and reversible.

Special tokens. Id 0 is padding and end-of-text, named `<|endoftext|>`. The chat turn terminator 261 (`"\\n\\n"`) is an
ordinary token: making it special would cut `"\\n\\n\\n"` differently from the reference; generation stops on it
through `generation_config.eos_token_id`. `split_special_tokens` defaults to True, so text is always tokenized as
plain bytes, as the reference does (the literal string `<|endoftext|>` is not turned into id 0). Pass
`split_special_tokens=False` (at load or per call) to have added tokens, for example an image placeholder, recognised
in text; the text on either side of each added token is then tokenized separately.

Decoding with `skip_special_tokens=True` returns a generated answer as the image-text-to-text pipeline does: id 0 and
special added tokens dropped, the turn end 261 dropped where it ends the ids (where generation stopped; one earlier in
the ids stays, so that the pipeline can cut the answer there) and one leading space dropped (the trained format answers
`"Assistant: Red"`). Without it, every byte is decoded.

tokenizer.json. `save_pretrained` also writes the `tokenizers` (Rust) form of this tokenizer, which is
`tokenizer._tokenizer` (what transformers' serve streams through) and what Rust and JavaScript clients read; see
`build_backend_tokenizer` for what it encodes and decodes, exactly. Loading does not read it: the vocabulary file is
the source, and folders without tokenizer.json load as before.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from typing import Any

import tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.tokenization_python import PythonBackend
from transformers.tokenization_utils_base import BatchEncoding, PaddingStrategy, TruncationStrategy
from transformers.utils import logging


logger = logging.get_logger(__name__)

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
TOKENIZER_JSON_FILE_NAME = "tokenizer.json"  # the `tokenizers` (Rust) form, see `build_backend_tokenizer`
PACKAGED_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_FILE_NAME)
END_OF_TEXT_TOKEN = "<|endoftext|>"  # id 0: padding and end-of-text
PAD_TOKEN_ID = 0
# "\n\n" ends a chat turn: generation stops on it (`generation_config.eos_token_id`), an ordinary token.
TURN_END_TOKEN_ID = 261
MODEL_EMBEDDING_ROWS = 65536  # the World vocabulary padded, as every RWKV World model's embedding has it


def read_rwkv_vocab(vocab_file: str) -> list[bytes]:
    """Reads a RWKV vocabulary file (lines `<id> <Python str or bytes literal> <byte length>`).

    Returns the token bytes indexed by id; index 0, which the file does not list, holds `b""`. A malformed file raises
    a `ValueError` that names the file and the line.
    """
    with open(vocab_file, "rb") as vocab:
        data = vocab.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_number = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{vocab_file}, line {line_number}: not UTF-8 text ({error.reason}).") from None

    def malformed(line_number: int, line: str, problem: str) -> ValueError:
        shown = line if len(line) <= 80 else line[:77] + "..."
        return ValueError(
            f"{vocab_file}, line {line_number}: {problem}; every line must read `<id> <Python str or bytes literal> "
            f"<byte length>`, got {shown!r}."
        )

    entries = []  # (line number, line, id, literal, byte length)
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        token_id, _, rest = line.partition(" ")
        literal, _, length = rest.rpartition(" ")
        if not (token_id.isdecimal() and length.isdecimal() and literal):
            raise malformed(line_number, line, "cannot read the id, the token and the byte length")
        entries.append((line_number, line, int(token_id), literal, int(length)))
    if not entries:
        raise ValueError(f"{vocab_file}: the vocabulary file is empty.")
    # One literal_eval over the whole list is about three times faster than one per line; only a failure is
    # located line by line (a literal such as `'a', 'b'` also shows up as a wrong count).
    try:
        tokens = ast.literal_eval("[" + ",".join(entry[3] for entry in entries) + "]")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        tokens = None
    if tokens is None or len(tokens) != len(entries):
        for line_number, line, _, literal, _ in entries:
            try:
                values = ast.literal_eval(f"[{literal}]")  # as it stands in the joined list
            except (SyntaxError, ValueError, MemoryError, RecursionError):
                values = None
            if not (isinstance(values, list) and len(values) == 1 and isinstance(values[0], (str, bytes))):
                raise malformed(line_number, line, "the token is not one Python string or bytes literal")
        raise ValueError(f"{vocab_file}: cannot read the token literals.")

    token_bytes_by_id = [b""] * (len(entries) + 1)
    line_of_id = {}
    for (line_number, line, token_id, _, length), token in zip(entries, tokens):
        if not isinstance(token, (str, bytes)):
            raise malformed(line_number, line, "the token is not one Python string or bytes literal")
        token_bytes = token.encode("utf-8") if isinstance(token, str) else token
        if not token_bytes or len(token_bytes) != length:
            raise malformed(line_number, line, f"the token has {len(token_bytes)} bytes, not {length}")
        if not 1 <= token_id <= len(entries):
            raise malformed(line_number, line, f"ids must be exactly 1..{len(entries)}, one per line")
        if token_id in line_of_id:
            raise malformed(line_number, line, f"id {token_id} is already on line {line_of_id[token_id]}")
        line_of_id[token_id] = line_number
        token_bytes_by_id[token_id] = token_bytes
    if len(set(token_bytes_by_id)) != len(token_bytes_by_id):
        seen = {}
        for token_id, token_bytes in enumerate(token_bytes_by_id[1:], start=1):
            if token_bytes in seen:
                first_id = seen[token_bytes]
                raise ValueError(
                    f"{vocab_file}, line {line_of_id[token_id]}: token {token_bytes!r} is already id {first_id} "
                    f"(line {line_of_id[first_id]}); each token must appear once."
                )
            seen[token_bytes] = token_id
    if not set(token_bytes_by_id).issuperset(bytes([byte]) for byte in range(256)):
        raise ValueError(f"{vocab_file}: every single byte must be a token, or some text could not be encoded.")
    return token_bytes_by_id


class ByteTrieEncoder:
    """Greedy longest-match encoder over a byte trie, in pure Python (the fallback when pyrwkv-tokenizer is missing)."""

    _TOKEN_ID = -1  # key of a trie node's token id; child keys are byte values 0..255

    def __init__(self, token_bytes_by_id: list[bytes]):
        self._root: dict[int, Any] = {}
        for token_id, token_bytes in enumerate(token_bytes_by_id):
            if not token_bytes:
                continue
            node = self._root
            for byte in token_bytes:
                node = node.setdefault(byte, {})
            node[self._TOKEN_ID] = token_id

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        root, token_key, end = self._root, self._TOKEN_ID, len(data)
        ids: list[int] = []
        start = 0
        while start < end:
            node, position = root, start
            # Every single byte is a token, so the first step always records a match.
            while position < end and (node := node.get(data[position])) is not None:
                position += 1
                if token_key in node:
                    match_id, match_end = node[token_key], position
            ids.append(match_id)
            start = match_end
        return ids


def build_encoder(vocab_file: str, token_bytes_by_id: list[bytes]):
    """The fastest exact encoder available: pyrwkv-tokenizer loaded from `vocab_file`, else `ByteTrieEncoder`."""
    try:
        from pyrwkv_tokenizer import WorldTokenizer
    except ImportError:
        logger.warning_once("pyrwkv-tokenizer is not installed; RWKV World encoding falls back to pure Python.")
        return ByteTrieEncoder(token_bytes_by_id)
    fast_encoder = WorldTokenizer(vocab_file)
    # Its vocabulary lists only the tokens that are valid UTF-8 (the others share one placeholder key); if any of
    # ours is missing or has another id there, it parsed the file differently.
    text_token_by_id = {}
    for token_id, token_bytes in enumerate(token_bytes_by_id[1:], start=1):
        try:
            text_token_by_id[token_id] = token_bytes.decode("utf-8")
        except UnicodeDecodeError:
            continue
    fast_vocab = fast_encoder.get_vocab()
    if fast_encoder.vocab_size() != len(token_bytes_by_id) or any(
        fast_vocab.get(token) != token_id for token_id, token in text_token_by_id.items()
    ):
        logger.warning(f"pyrwkv-tokenizer read {vocab_file} differently; encoding falls back to pure Python.")
        return ByteTrieEncoder(token_bytes_by_id)
    return fast_encoder


def safe_split_pattern(token_bytes_by_id: list[bytes]) -> str:
    """A regular expression (Oniguruma, as `tokenizers` runs it) for places where greedy longest match always cuts.

    Between two characters whose adjacent bytes (the first one's last, the second one's first) occur next to each other
    in no token, no token can span the boundary, so every tokenization, greedy longest match included, has a cut
    there; cutting the text at such places first changes no id. Each alternative matches a character that ends a
    piece: `[A](?=[B])` says that no token holds a byte of A's last-byte set followed by one of B's first-byte set.
    B is a space, a line feed, or the non-ASCII characters of one UTF-8 lead byte (one range of code points); a
    non-ASCII character in A stands for all its possible last bytes (0x80-0xBF), as a character class cannot single
    them out. These few alternatives find most cuts in prose, code and CJK text (a piece rarely exceeds 100 bytes),
    and few alternatives keep the expression fast.
    """
    pairs_inside_tokens = {pair for token_bytes in token_bytes_by_id for pair in zip(token_bytes, token_bytes[1:])}
    continuation_bytes = range(0x80, 0xC0)

    def character_class(code_point_ranges: list[tuple[int, int]]) -> str:
        return "".join(
            f"\\x{{{low:X}}}" if low == high else f"\\x{{{low:X}}}-\\x{{{high:X}}}" for low, high in code_point_ranges
        )

    def runs(code_points: list[int]) -> list[tuple[int, int]]:
        ranges: list[list[int]] = []
        for code_point in sorted(code_points):
            if ranges and ranges[-1][1] == code_point - 1:
                ranges[-1][1] = code_point
            else:
                ranges.append([code_point, code_point])
        return [(low, high) for low, high in ranges]

    def lead_byte_range(lead: int) -> tuple[int, int]:
        bits = 6 if lead < 0xE0 else 12 if lead < 0xF0 else 18
        start = (lead & (0xFF >> (bits // 6 + 2))) << bits
        lowest = 0x80 if bits == 6 else 0x800 if bits == 12 else 0x10000  # shorter forms are not UTF-8
        return max(start, lowest), min(start + (1 << bits) - 1, 0x10FFFF)

    followers = [([0x20], [(0x20, 0x20)]), ([0x0A], [(0x0A, 0x0A)])]
    followers += [([lead], [lead_byte_range(lead)]) for lead in range(0xC2, 0xF5)]
    alternatives = []
    for first_bytes, code_point_ranges in followers:
        enders = [
            byte for byte in range(0x80) if all((byte, first) not in pairs_inside_tokens for first in first_bytes)
        ]
        ranges = runs(enders)
        if all((last, first) not in pairs_inside_tokens for last in continuation_bytes for first in first_bytes):
            ranges.append((0x80, 0x10FFFF))
        if ranges:
            alternatives.append(f"[{character_class(ranges)}](?=[{character_class(code_point_ranges)}])")
    return "|".join(alternatives)


def build_backend_tokenizer(token_bytes_by_id: list[bytes], added_tokens: dict[int, Any]) -> tokenizers.Tokenizer:
    """The World tokenizer as a `tokenizers.Tokenizer` (what tokenizer.json holds), for Rust and JavaScript clients
    and for transformers code that decodes through `tokenizer._tokenizer` (serve's streaming `DecodeStream`).

    Encoding: a WordPiece model without a continuing-subword prefix is greedy longest match, and over byte-level
    symbols (GPT-2's byte-to-character table; `ByteLevel` without its regex splits nothing) it matches bytes, so the
    ids are the reference's, id for id. WordPiece tries each piece's longest candidate first, so its time grows with
    the square of a piece's length (a 16 kB piece takes seconds): `safe_split_pattern` first cuts the text where every
    tokenization cuts. The text of a special token is that token, as in transformers' fast tokenizers (a
    `tokenizers.Tokenizer`'s `encode_special_tokens` is not saved in tokenizer.json), where the reference and
    `RwkvWorldTokenizer` (`split_special_tokens=True`) encode its bytes: `"<|endoftext|>"` is id 0, an added token
    such as the processor's `"<image>"` its id, and `"ĊĊ"` the turn end 261 (below). `added_tokens` (id ->
    `AddedToken`, the Python tokenizer's) keep their ids.

    Decoding: the bytes as UTF-8 (invalid sequences replaced by U+FFFD, as Python's `errors="replace"` does), then
    one leading space dropped (`Strip`, as sentencepiece tokenizers' decoders do: the trained format answers
    `"Assistant: Red"`). The turn end 261 is listed as a special token, spelled in byte-level symbols (`"ĊĊ"`, so that
    `"\\n\\n"` in a text is never taken for it), so `skip_special_tokens=True` (and serve's `DecodeStream`) drops it
    with id 0: a generated `" Red\\n\\n"` decodes to `"Red"`, what the pipeline returns. It drops every 261, where
    `RwkvWorldTokenizer.decode` keeps those before the last token.
    """
    byte_to_symbol = bytes_to_unicode()
    vocab = {END_OF_TEXT_TOKEN: PAD_TOKEN_ID}
    for token_id, token_bytes in enumerate(token_bytes_by_id[1:], start=1):
        vocab["".join(byte_to_symbol[byte] for byte in token_bytes)] = token_id
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordPiece(
            vocab, unk_token=END_OF_TEXT_TOKEN, continuing_subword_prefix="", max_input_chars_per_word=2**62
        )
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(
                tokenizers.Regex(safe_split_pattern(token_bytes_by_id)), "merged_with_previous"
            ),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = tokenizers.decoders.Sequence(
        [tokenizers.decoders.ByteLevel(), tokenizers.decoders.Strip(content=" ", left=1, right=0)]
    )
    # Added tokens take their ids from the JSON form (the Python API would number new ones itself); the list is put
    # into the serialized text, as loading and dumping the whole JSON costs half a second for the vocabulary.
    turn_end = "".join(byte_to_symbol[byte] for byte in token_bytes_by_id[TURN_END_TOKEN_ID])
    entries = {TURN_END_TOKEN_ID: {"content": turn_end, "special": True, "normalized": False}}
    for token_id, token in added_tokens.items():
        entries[token_id] = {"content": str(token), "special": token.special, "normalized": token.normalized}
        entries[token_id].update(single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip)
    added_list = [
        {"id": token_id, "single_word": False, "lstrip": False, "rstrip": False, **entry}
        for token_id, entry in sorted(entries.items())
    ]
    serialized, replaced = re.subn(
        r'"added_tokens":\s*\[\]', lambda _: '"added_tokens":' + json.dumps(added_list), backend.to_str(), count=1
    )
    if not replaced:
        raise RuntimeError("tokenizers serialized an empty tokenizer without an empty `added_tokens` list.")
    return tokenizers.Tokenizer.from_str(serialized)


class RwkvWorldTokenizer(PythonBackend):
    r"""
    The RWKV World tokenizer: greedy longest match over UTF-8 bytes, id for id the same as the reference
    `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`.

    Args:
        vocab_file: The vocabulary file; defaults to `rwkv_vocab_v20230424.txt` shipped in this package.
        pad_token: Padding token; the default `<|endoftext|>` is id 0.
        eos_token: End-of-text token; the default is id 0 like padding (chat generation stops on 261 = `"\n\n"`
            instead, which the generation config sets).
        split_special_tokens: When True (default), text is always tokenized as plain bytes, as RWKV World does; when
            False, special and added tokens written in the text are recognised.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        pad_token: str = END_OF_TEXT_TOKEN,
        eos_token: str = END_OF_TEXT_TOKEN,
        split_special_tokens: bool = True,
        **kwargs,
    ):
        self.vocab_file = vocab_file or PACKAGED_VOCAB_FILE
        self._token_bytes_by_id = read_rwkv_vocab(self.vocab_file)
        self._token_by_id = [END_OF_TEXT_TOKEN] + [
            token_bytes.decode("utf-8", "surrogateescape") for token_bytes in self._token_bytes_by_id[1:]
        ]
        self._id_by_token = {token: token_id for token_id, token in enumerate(self._token_by_id)}
        if len(self._id_by_token) != len(self._token_by_id):
            raise ValueError(f"{self.vocab_file}: a token is spelled {END_OF_TEXT_TOKEN!r}, which names id 0")
        self._encoder = None  # built on first use, see `build_encoder`
        self._backend = None  # (added tokens it was built with, `build_backend_tokenizer`'s tokenizer), on first use
        # A folder's tokenizer.json lists the turn end 261 as a special token (for its decoder); loading hands that
        # entry over as an added token, which would give id 261 another spelling here and make "\n\n" special.
        added_tokens_decoder = kwargs.get("added_tokens_decoder") or {}
        if str(added_tokens_decoder.get(TURN_END_TOKEN_ID, "")) != self._token_by_id[TURN_END_TOKEN_ID]:
            added_tokens_decoder.pop(TURN_END_TOKEN_ID, None)
        kwargs.pop("tokenizer_file", None)  # rebuilt from the vocabulary, so it always matches it
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(
            pad_token=pad_token,
            eos_token=eos_token,
            split_special_tokens=split_special_tokens,
            **kwargs,
        )

    def __getstate__(self):
        # The Rust encoder cannot be pickled; it is rebuilt from the vocabulary file on the next encode.
        state = self.__dict__.copy()
        state["_encoder"] = state["_backend"] = None
        return state

    @property
    def _tokenizer(self) -> tokenizers.Tokenizer:
        """This tokenizer as a `tokenizers.Tokenizer` (see `build_backend_tokenizer`), under the name transformers
        reads a fast tokenizer's from (serve's streaming decodes through it); `save_pretrained` writes it as
        tokenizer.json. Python encoding does not use it (pyrwkv-tokenizer is many times faster). It is deliberately
        not also `backend_tokenizer`: seeing a byte-level decoder there, `generate(stop_strings=...)` would read this
        tokenizer's text token strings (`get_vocab`) as byte-level symbols."""
        added_tokens = dict(sorted(self._added_tokens_decoder.items()))
        if self._backend is None or self._backend[0] != added_tokens:
            self._backend = (added_tokens, build_backend_tokenizer(self._token_bytes_by_id, added_tokens))
        return self._backend[1]

    @property
    def vocab_size(self) -> int:
        return len(self._token_by_id)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._id_by_token)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def encode_to_ids(self, text: str) -> list[int]:
        """Token ids of `text` taken as plain bytes (nothing special recognised, nothing added)."""
        if self._encoder is None:
            self._encoder = build_encoder(self.vocab_file, self._token_bytes_by_id)
        return self._encoder.encode(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._token_by_id[token_id] for token_id in self.encode_to_ids(text)]

    def encode(
        self,
        text,
        text_pair=None,
        add_special_tokens: bool = True,
        padding=False,
        truncation=None,
        max_length=None,
        **kwargs,
    ) -> list[int]:
        # The plain call `encode(text)` needs none of the base class's option handling, which costs as much as
        # encoding a kilobyte; anything else goes through it.
        if isinstance(text, str) and text_pair is None and not (padding or truncation or max_length or kwargs):
            if self.split_special_tokens:
                ids = self.encode_to_ids(text)
                ids = self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids
                self._eventual_warn_about_too_long_sequence(ids, None, True)
                return ids
        return super().encode(
            text,
            text_pair=text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            **kwargs,
        )

    def _encode_plus(self, text, text_pair=None, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            return self._encode_texts_with_offsets(text, text_pair, **kwargs)
        plain_text = kwargs.get("split_special_tokens", self.split_special_tokens) and not kwargs.get(
            "is_split_into_words"
        )
        texts = [text] if isinstance(text, str) else text
        if plain_text and text_pair is None and self._is_lean_request(kwargs):
            if isinstance(texts, (list, tuple)) and texts and all(isinstance(one_text, str) for one_text in texts):
                return self._encode_texts_lean(texts, single=isinstance(text, str), **kwargs)
        # Other requests (pairs, truncation, ...) take the base class path, still handed ids rather than token
        # strings where the text is plain. Empty strings keep the token path: the base reads `[]` as an empty batch.
        if plain_text:
            if isinstance(text, str) and text:
                text = self.encode_to_ids(text)
            if isinstance(text_pair, str) and text_pair:
                text_pair = self.encode_to_ids(text_pair)
        return super()._encode_plus(text=text, text_pair=text_pair, **kwargs)

    def _is_lean_request(self, kwargs: dict[str, Any]) -> bool:
        """Whether a request asks only for ids, attention masks and padding: those skip the per-text base machinery."""
        return (
            kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE) == TruncationStrategy.DO_NOT_TRUNCATE
            and not kwargs.get("return_token_type_ids")
            and "token_type_ids" not in self.model_input_names
            and not any(
                kwargs.get(option)
                for option in (
                    "return_overflowing_tokens",
                    "return_special_tokens_mask",
                    "return_offsets_mapping",
                    "return_length",
                )
            )
        )

    def _encode_texts_lean(
        self,
        texts: list[str],
        single: bool,
        add_special_tokens: bool = True,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        verbose: bool = True,
        **options_left_at_defaults,  # see `_is_lean_request`
    ) -> BatchEncoding:
        # The base class pays about 50 us per text (strategy resolution, a `pad` call per text, two BatchEncodings),
        # as much as encoding a kilobyte; the same outputs are built here once per call.
        ids = [self.encode_to_ids(one_text) for one_text in texts]
        if add_special_tokens:
            ids = [self.build_inputs_with_special_tokens(row) for row in ids]
        for row in ids:
            self._eventual_warn_about_too_long_sequence(row, max_length, verbose)
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        if padding_strategy == PaddingStrategy.DO_NOT_PAD:
            encoded = {"input_ids": ids}
            if return_attention_mask:
                encoded["attention_mask"] = [[1] * len(row) for row in ids]
        else:
            encoded = self.pad(
                {"input_ids": ids},
                padding=padding_strategy,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask,
            )
        if single:
            encoded = {key: rows[0] for key, rows in encoded.items()}
        return BatchEncoding(dict(encoded), tensor_type=return_tensors, prepend_batch_axis=single)

    def _encode_texts_with_offsets(
        self,
        text,
        text_pair=None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        truncation_strategy: TruncationStrategy = TruncationStrategy.DO_NOT_TRUNCATE,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        split_special_tokens: bool | None = None,
        is_split_into_words: bool = False,
        **options,
    ) -> BatchEncoding:
        """`return_offsets_mapping=True`: each token's `(start, end)` character span in its text, as fast tokenizers
        give it. A token that holds part of a multi-byte character spans that whole character (so the tokens of one
        emoji share its span); padding gets `(0, 0)`. Plain text only (no pairs, no pre-split words, no added tokens
        recognised), which is what this tokenizer encodes anyway."""
        refused = [name for name in ("return_overflowing_tokens", "return_special_tokens_mask", "return_length",
                                     "return_token_type_ids", "stride") if options.get(name)]
        refused += ["a text pair"] * (text_pair is not None) + ["is_split_into_words=True"] * is_split_into_words
        if not (self.split_special_tokens if split_special_tokens is None else split_special_tokens):
            refused.append("split_special_tokens=False")
        if refused:
            raise ValueError(
                f"`return_offsets_mapping=True` works on plain texts only, not with {', '.join(refused)}."
            )
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not all(isinstance(one_text, str) for one_text in texts):
            raise TypeError("`return_offsets_mapping=True` needs a string or a list of strings.")
        rows = [self._ids_and_offsets(one_text) for one_text in texts]
        if truncation_strategy in (TruncationStrategy.LONGEST_FIRST, TruncationStrategy.ONLY_FIRST) and max_length:
            keep = slice(None, max_length) if self.truncation_side == "right" else slice(-max_length, None)
            rows = [(ids[keep], offsets[keep]) for ids, offsets in rows]
        encoded = dict(
            self.pad(
                {"input_ids": [ids for ids, _ in rows]},
                padding=padding_strategy,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=padding_side,
                return_attention_mask=return_attention_mask,
            )
        )
        left = (padding_side or self.padding_side) == "left"
        encoded["offset_mapping"] = []
        for padded_ids, (_, offsets) in zip(encoded["input_ids"], rows):
            padding = [(0, 0)] * (len(padded_ids) - len(offsets))
            encoded["offset_mapping"].append(padding + offsets if left else offsets + padding)
        single = isinstance(text, str)
        if single:
            encoded = {key: values[0] for key, values in encoded.items()}
        return BatchEncoding(encoded, tensor_type=return_tensors, prepend_batch_axis=single)

    def _ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` and each token's character span (the encoder cuts UTF-8 bytes; spans are in chars)."""
        ids = self.encode_to_ids(text)
        # The character each UTF-8 byte belongs to; the identity for ASCII text.
        char_of_byte = None
        if not text.isascii():
            byte_lengths = (
                1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4 for code in map(ord, text)
            )
            char_of_byte = [index for index, length in enumerate(byte_lengths) for _ in range(length)]
        offsets, byte_start = [], 0
        for token_id in ids:
            byte_end = byte_start + len(self._token_bytes_by_id[token_id])
            if char_of_byte is None:
                offsets.append((byte_start, byte_end))
            else:
                offsets.append((char_of_byte[byte_start], char_of_byte[byte_end - 1] + 1))
            byte_start = byte_end
        return ids, offsets

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._id_by_token.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < len(self._token_by_id):
            return self._token_by_id[index]
        # The World models' 65536 embedding rows exceed the vocabulary; an id without a token there (a sample from an
        # untrained model) decodes to nothing rather than failing in the middle of a generation. Anything else is
        # not a token id at all, and decoding it to nothing would hide the mistake.
        if 0 <= index < max(MODEL_EMBEDDING_ROWS, len(self)):
            return ""
        if index < 0:
            raise ValueError(
                f"Cannot decode token id {index}: token ids are 0..{max(MODEL_EMBEDDING_ROWS, len(self)) - 1}. -100 "
                "is the label value that losses ignore; replace it before decoding, e.g. "
                "`labels[labels == -100] = tokenizer.pad_token_id`."
            )
        raise ValueError(
            f"Cannot decode token id {index}: the vocabulary has ids 0..{len(self) - 1} (ids up to "
            f"{MODEL_EMBEDDING_ROWS - 1}, the model's embedding rows, decode to nothing)."
        )

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Decodes the bytes of `token_ids`. `skip_special_tokens=True` returns a generated answer as the pipeline
        does and as tokenizer.json decodes it (`build_backend_tokenizer`): the special tokens dropped (id 0), the
        turn end 261 dropped where it ends the ids (the token generation stops on), and one leading space (the
        trained format answers `"Assistant: Red"`). A turn end before the last token stays (tokenizer.json drops
        it): the pipeline cuts the answer there."""
        if not skip_special_tokens:
            return super()._decode(token_ids, skip_special_tokens=False, **kwargs)
        special_ids = set(self.all_special_ids)
        token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
        token_ids = [token_id for token_id in token_ids if token_id not in special_ids]
        if token_ids and token_ids[-1] == TURN_END_TOKEN_ID:
            token_ids.pop()
        text = super()._decode(token_ids, skip_special_tokens=False, **kwargs)
        return text[1:] if text.startswith(" ") else text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME)
        # Copied byte for byte, so a saved tokenizer carries exactly the vocabulary it was loaded with.
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        # tokenizer.json, for clients that read only that (Rust and JavaScript ones, text-generation servers).
        json_target = os.path.join(
            save_directory, (f"{filename_prefix}-" if filename_prefix else "") + TOKENIZER_JSON_FILE_NAME
        )
        self._tokenizer.save(json_target)
        return (target, json_target)


__all__ = ["RwkvWorldTokenizer"]
