"""LLaVA-format training data for VisualRWKV: a dataset that reads and checks the records, and a collator that formats,
tokenizes and labels them as the original VisualRWKV-6 training did.

Record format (LLaVA's): `{"image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`; `"image"` is optional (text-only samples), `"<image>"` marks the human turn
that holds the image (the first human turn when no turn has it).

Labels (the original's `VisualRWKV-v6/v6.0/src/dataset.py`): every human-turn token is ignored (-100); in an
assistant turn the tokens of `"Assistant:"` (3 with the World tokenizer) are ignored and the rest is trained: the
answer, including its first token (which carries the leading space), and the closing `"\\n\\n"` (id 261). Image
positions and padding are ignored; the model shifts the labels for next-token prediction.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .image_loading import load_rgb_image
from .processing_visualrwkv import GENERATION_PROMPT, IMAGE_TOKEN, check_image_position

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}
ON_ERROR_CHOICES = ("raise", "skip")


class MalformedRecordError(ValueError):
    """A training record that cannot be used; the message names the record and the problem."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def _read_records(source: str | os.PathLike | Sequence[dict]) -> list:
    """The records of a JSON list file, a JSONL file (one record a line) or an in-memory list."""
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    try:
        with open(source, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError:
        raise ValueError(
            f"{os.fspath(source)!r} is not UTF-8 text: expected a JSON list of records or JSON Lines."
        ) from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = None  # not one JSON document: JSON Lines
    if isinstance(records, dict):  # JSON Lines with one record
        return [records]
    if records is not None:
        if not isinstance(records, list):
            raise ValueError(f"{os.fspath(source)!r} holds a JSON {type(records).__name__}, not a list of records.")
        return records
    records = []
    for line_number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{os.fspath(source)!r} is neither a JSON list nor JSON Lines: line {line_number}: {error}."
            ) from None
    return records


def _check_conversations(record: Any) -> tuple[list[dict], int | None]:
    """The record's turns as chat messages and the index of the turn that holds the image marker (None if none).
    Raises `MalformedRecordError` (without the record index) for anything the collator cannot label."""
    if not isinstance(record, dict):
        raise MalformedRecordError(f"a record must be a dict, not a {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise MalformedRecordError("it has no 'conversations' list (or an empty one)")
    messages = []
    marker_turns = []
    for turn_index, turn in enumerate(conversations):
        expected = "human" if turn_index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise MalformedRecordError(f"turn {turn_index} is not a {{'from': ..., 'value': <text>}} dict")
        if turn.get("from") != expected:
            raise MalformedRecordError(
                f"turn {turn_index} is from {turn.get('from')!r}, expected {expected!r} (turns alternate human, gpt, "
                "starting with human)"
            )
        value = turn["value"]
        if value.count(IMAGE_TOKEN) > (expected == "human"):
            raise MalformedRecordError(
                f"turn {turn_index} holds {value.count(IMAGE_TOKEN)} {IMAGE_TOKEN!r} markers; only a human turn may "
                "hold one"
            )
        if IMAGE_TOKEN in value:
            marker_turns.append(turn_index)
        elif not value.strip():
            raise MalformedRecordError(f"turn {turn_index} is empty")
        messages.append({"role": ROLES[expected], "content": value})
    if len(marker_turns) > 1:
        raise MalformedRecordError(
            f"turns {marker_turns} each hold {IMAGE_TOKEN!r}; VisualRWKV-6 takes one image per sample"
        )
    if messages[-1]["role"] != "assistant":
        raise MalformedRecordError("it ends with a human turn: there is no answer to learn")
    return messages, marker_turns[0] if marker_turns else None


class LlavaDataset(Dataset):
    r"""
    LLaVA-format records (see the module docstring), checked when the dataset is made and read one image at a time.

    Args:
        source: A JSON file holding a list of records, a JSONL file (one record a line), or an in-memory list of
            records. In-memory records may hold an image itself (PIL image, array, tensor, bytes) under `"image"`.
        image_folder: Folder that relative image paths are read from; `None` reads them as given (relative to the
            current directory).
        on_error: `"raise"` fails at the first malformed record or unreadable image with an error that names the
            record and the problem; `"skip"` leaves such records out, counts them in `skipped` (record index ->
            reason) and logs one warning with the count. Records and image paths are checked when the dataset is
            made; images are decoded when read, so a file that exists but is corrupt is found then: `"raise"` fails
            naming the record, `"skip"` logs a warning, adds it to `skipped` (in the process that read it: a
            DataLoader worker's count stays in the worker) and gives the next readable record instead. A source
            without one usable record raises a `ValueError`.

    Items are dicts `{"conversations": [...], "image": RGB PIL image or None}`: what `VisualRWKVDataCollator` takes.
    Indexing works as on a list (negative indices count from the end; past the end raises `IndexError`).
    With `transformers.Trainer`, set `remove_unused_columns=False` so that these keys reach the collator.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[dict],
        image_folder: str | os.PathLike | None = None,
        on_error: str = "raise",
    ):
        self.on_error = _check_choice("on_error", on_error, ON_ERROR_CHOICES)
        self.image_folder = image_folder
        self.records: list[dict] = []
        self.record_indices: list[int] = []  # position of each kept record in the source
        self.skipped: dict[int, str] = {}
        for index, record in enumerate(_read_records(source)):
            try:
                _check_conversations(record)
                image = record.get("image")
                if image is None:
                    if any(IMAGE_TOKEN in turn["value"] for turn in record["conversations"]):
                        raise MalformedRecordError(f"a turn holds {IMAGE_TOKEN!r} but the record has no 'image'")
                elif isinstance(image, (str, os.PathLike)):
                    path = self._image_path(image)
                    if "://" not in path and not os.path.isfile(path):
                        problem = "is a folder, not an image file" if os.path.isdir(path) else "does not exist"
                        raise MalformedRecordError(f"its image path {path!r} {problem}")
                elif isinstance(image, (bool, int, float, list, dict)):  # JSON values that cannot be an image
                    raise MalformedRecordError(
                        f"its 'image' is a {type(image).__name__}, not an image file path (or an image in memory)"
                    )
            except MalformedRecordError as error:
                self._report(index, error)
                continue
            self.records.append(record)
            self.record_indices.append(index)
        if self.skipped:
            examples = "; ".join(f"record {index}: {reason}" for index, reason in list(self.skipped.items())[:3])
            if not self.records:
                raise ValueError(f"LlavaDataset: all {len(self.skipped)} records are malformed, e.g. {examples}.")
            logger.warning(
                f"LlavaDataset skipped {len(self.skipped)} of {len(self.skipped) + len(self.records)} records "
                f"(see `dataset.skipped`), e.g. {examples}"
            )
        elif not self.records:
            source_name = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "The source"
            raise ValueError(f"{source_name} holds no records: expected a JSON list of LLaVA-format records.")

    def _report(self, index: int, error: Exception) -> None:
        """Fails naming the source record (on_error="raise") or counts it as skipped."""
        if self.on_error == "raise":
            raise MalformedRecordError(
                f"record {index}: {error} (pass on_error='skip' to leave such records out)"
            ) from error
        self.skipped[index] = str(error)

    def _image_path(self, image: str | os.PathLike) -> str:
        path = os.fspath(image)
        return path if self.image_folder is None or "://" in path else os.path.join(self.image_folder, path)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        # As a Python list: negative indices count from the end, and IndexError past it (which also ends `for`).
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"LlavaDataset indices must be integers, not {type(index).__name__}.") from None
        if not -len(self.records) <= index < len(self.records):
            raise IndexError(f"LlavaDataset index {index} is out of range for {len(self.records)} records.")
        index %= len(self.records)
        for position in (*range(index, len(self.records)), *range(index)):
            record = self.records[position]
            image = record.get("image")
            try:
                if isinstance(image, (str, os.PathLike)):
                    image = self._image_path(image)
                image = None if image is None else load_rgb_image(image)
            except (OSError, ValueError, TypeError) as error:
                self._report(self.record_indices[position], error)
                logger.warning(f"LlavaDataset skipped record {self.record_indices[position]}: {error}")
                continue
            return {"conversations": record["conversations"], "image": image}
        raise MalformedRecordError("LlavaDataset: no record has a readable image")


class VisualRWKVDataCollator:
    r"""
    Formats, tokenizes, labels and right-pads LLaVA-format samples for `VisualRWKVForConditionalGeneration`.

    The prompt is the processor's chat template with its per-turn tokenization (the same ids as inference), so a
    model is trained on exactly the prompts it is later asked with. Labels follow the original (see the module
    docstring).

    Args:
        processor: A `VisualRWKVProcessor`.
        image_position: `"first"`, `"middle"` (the sandwich) or `"last"`; `None` uses the processor's (the
            sandwich, unless set otherwise).
        max_length: Longest sequence kept. Longer samples lose their end (the answer side): the cut never comes
            before the first trained token after the image, so the instruction and the whole image span are kept.
            A sample whose instruction alone does not fit is handled by `on_error`.
        on_error: `"raise"` fails on a sample that cannot be used (malformed, or too long to keep its instruction),
            naming the problem; `"skip"` drops it from its batch, counts it in `skipped` (reason -> count) and logs a
            warning. A batch left empty raises.

    Samples are dicts `{"conversations": [...], "image": image or None}` (what `LlavaDataset` gives). The batch holds
    `input_ids`, `attention_mask` and `labels` (batch, seq) and, when any sample has an image, `pixel_values` with one
    image per such sample in batch order (text-only samples need none).
    """

    def __init__(
        self,
        processor,
        image_position: str | None = None,
        max_length: int | None = None,
        on_error: str = "raise",
        pad_token_id: int = 0,
    ):
        self.processor = processor
        self.image_position = check_image_position(image_position or processor.image_position)
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be positive, got {max_length}.")
        self.max_length = max_length
        self.on_error = _check_choice("on_error", on_error, ON_ERROR_CHOICES)
        self.pad_token_id = pad_token_id
        # The original ignores the tokens of "Assistant:" that open every assistant turn.
        self.assistant_prefix_length = len(
            processor.tokenizer.encode(GENERATION_PROMPT, add_special_tokens=False, split_special_tokens=True)
        )
        self.skipped: Counter = Counter()

    def tokenize(self, sample: dict) -> tuple[list[int], list[int]]:
        """`input_ids` and `labels` of one sample, truncated to `max_length`. Raises `MalformedRecordError`."""
        if not isinstance(sample, dict) or "conversations" not in sample:
            raise MalformedRecordError(
                "a sample must be a dict with 'conversations' (and 'image'); with Trainer, set "
                "`remove_unused_columns=False` so that these keys reach the collator"
            )
        messages, marker_turn = _check_conversations(sample)
        has_image = sample.get("image") is not None
        if has_image and marker_turn is None:
            marker_turn = 0
        elif not has_image and marker_turn is not None:
            raise MalformedRecordError(f"turn {marker_turn} holds {IMAGE_TOKEN!r} but the sample has no image")
        if has_image:  # the chat template takes the image as a part ("<image>" in a message's text is text)
            text = messages[marker_turn]["content"].replace(IMAGE_TOKEN, "")
            messages[marker_turn] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        prompt = self.processor.apply_chat_template(messages, image_position=self.image_position, tokenize=False)
        turn_ids = self.processor.tokenize_turns(prompt, has_image)
        if len(turn_ids) != len(messages):
            raise MalformedRecordError(f"its {len(messages)} turns formatted into {len(turn_ids)}")

        input_ids, labels = [], []
        min_length = None  # the instruction (through the image turn) and the first trained token after it
        for turn_index, (message, ids) in enumerate(zip(messages, turn_ids)):
            if message["role"] == "user":
                turn_labels = [IGNORE_INDEX] * len(ids)
            else:
                prefix = min(self.assistant_prefix_length, len(ids))
                turn_labels = [IGNORE_INDEX] * prefix + ids[prefix:]
                if min_length is None and turn_index > (marker_turn or 0) and len(ids) > prefix:
                    min_length = len(input_ids) + prefix + 1
            input_ids.extend(ids)
            labels.extend(turn_labels)
        if min_length is None:
            raise MalformedRecordError("no answer token to learn after the instruction")
        if self.max_length is not None and len(input_ids) > self.max_length:
            if min_length > self.max_length:
                raise MalformedRecordError(
                    f"its instruction and first answer token take {min_length} tokens, more than max_length "
                    f"{self.max_length} (the image alone takes {self.processor.num_image_tokens})"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("VisualRWKVDataCollator: the batch holds no samples.")
        rows, images = [], []
        for sample in samples:
            try:
                rows.append(self.tokenize(sample))
            except MalformedRecordError as error:
                if self.on_error == "raise":
                    raise
                self.skipped[str(error)] += 1
                total = sum(self.skipped.values())
                logger.warning(f"VisualRWKVDataCollator skipped a sample: {error} ({total} so far)")
                continue
            if sample.get("image") is not None:
                images.append(sample["image"])
        if not rows:
            raise ValueError(f"VisualRWKVDataCollator: every sample of this batch was skipped ({dict(self.skipped)}).")

        length = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if images:
            batch["pixel_values"] = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return batch


__all__ = ["LlavaDataset", "MalformedRecordError", "VisualRWKVDataCollator"]
