"""The RWKV World tokenizer (`rwkv_vocab_v20230424.txt`) as a transformers tokenizer.

Encoding is the UTF-8 bytes of the text cut greedily, left to right, into the longest vocabulary entry (a byte trie);
there is no normalisation, no pre-tokenisation and nothing is added (no BOS/EOS). Decoding concatenates the token
bytes and decodes them as UTF-8 with `errors="replace"`, so a prefix that ends inside a multi-byte character ends in
U+FFFD, which is what `transformers.TextStreamer` needs to wait for the rest of the character.

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
ordinary token: making it special would cut `"\\n\\n\\n"` differently from the reference and make
`skip_special_tokens=True` drop paragraph breaks; generation stops on it through `generation_config.eos_token_id`.
`split_special_tokens` defaults to True, so text is always tokenized as plain bytes, as the reference does (the
literal string `<|endoftext|>` is not turned into id 0). Pass `split_special_tokens=False` (at load or per call) to
have added tokens, for example an image placeholder, recognised in text; the text on either side of each added token
is then tokenized separately.
"""

from __future__ import annotations

import ast
import os
import shutil
from typing import Any

from transformers.tokenization_python import PythonBackend
from transformers.tokenization_utils_base import BatchEncoding, PaddingStrategy, TruncationStrategy
from transformers.utils import logging


logger = logging.get_logger(__name__)

VOCAB_FILE_NAME = "rwkv_vocab_v20230424.txt"
PACKAGED_VOCAB_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_FILE_NAME)
END_OF_TEXT_TOKEN = "<|endoftext|>"  # id 0: padding and end-of-text


def read_rwkv_vocab(vocab_file: str) -> list[bytes]:
    """Reads a RWKV vocabulary file (lines `<id> <Python str or bytes literal> <byte length>`).

    Returns the token bytes indexed by id; index 0, which the file does not list, holds `b""`.
    """
    with open(vocab_file, encoding="utf-8") as vocab:
        entries = [line.rstrip("\r\n").split(" ", 1) for line in vocab if line.strip("\r\n")]
    ids = [int(token_id) for token_id, _ in entries]
    literals_and_lengths = [rest.rsplit(" ", 1) for _, rest in entries]
    # One literal_eval over the whole list is about three times faster than one per line.
    tokens = ast.literal_eval("[" + ",".join(literal for literal, _ in literals_and_lengths) + "]")
    token_bytes_by_id = [b""] * (len(entries) + 1)
    for token_id, token, (_, length) in zip(ids, tokens, literals_and_lengths):
        token_bytes = token.encode("utf-8") if isinstance(token, str) else token
        if not isinstance(token_bytes, bytes) or len(token_bytes) != int(length) or not token_bytes:
            raise ValueError(f"{vocab_file}: malformed entry for id {token_id}")
        if not 1 <= token_id <= len(entries) or token_bytes_by_id[token_id]:
            raise ValueError(f"{vocab_file}: ids must be exactly 1..{len(entries)}, each once")
        token_bytes_by_id[token_id] = token_bytes
    distinct_tokens = set(token_bytes_by_id)
    if len(distinct_tokens) != len(token_bytes_by_id):
        raise ValueError(f"{vocab_file}: duplicate tokens")
    if not distinct_tokens.issuperset(bytes([byte]) for byte in range(256)):
        raise ValueError(f"{vocab_file}: every single byte must be a token, or some text could not be encoded")
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
        state["_encoder"] = None
        return state

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

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._id_by_token.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        # The model's 65536 rows exceed the vocabulary; an id without a token (a sample from an untrained model)
        # decodes to nothing rather than failing in the middle of a generation.
        return self._token_by_id[index] if 0 <= index < len(self._token_by_id) else ""

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        target = os.path.join(save_directory, (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME)
        # Copied byte for byte, so a saved tokenizer carries exactly the vocabulary it was loaded with.
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


__all__ = ["RwkvWorldTokenizer"]
