"""LLaVA-format training data for VisualRWKV: a dataset that reads and checks the records, and a collator that formats,
tokenizes and labels them as the original VisualRWKV-6 and VisualRWKV-7 training did.

Record format (LLaVA's): `{"image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}`; `"image"` is optional (text-only samples) and may be a list of files (the
original VisualRWKV-7 dataset's several images). Each `"<image>"` marks where one image goes: a human turn holding k
markers takes the next k images, in order (as the original, the markers are then removed and the chat template places
the images by `image_position`: with `"first"`, k lines `"<image>"` open the turn). Without markers, all images go
into the first human turn. Several images per sample need `image_position="first"` (VisualRWKV-7); VisualRWKV-6, HD
and UHD take one.

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
from .processing_visualrwkv import GENERATION_PROMPT, IMAGE_TOKEN, PIXEL_INPUTS, check_image_position, describe_images

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


def _check_conversations(record: Any) -> tuple[list[dict], list[int]]:
    """The record's turns as chat messages and the number of image markers in each turn. Raises
    `MalformedRecordError` (without the record index) for anything the collator cannot label."""
    if not isinstance(record, dict):
        raise MalformedRecordError(f"a record must be a dict, not a {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise MalformedRecordError("it has no 'conversations' list (or an empty one)")
    messages, markers = [], []
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
        if IMAGE_TOKEN in value and expected == "gpt":
            raise MalformedRecordError(f"turn {turn_index} holds {IMAGE_TOKEN!r}; only human turns hold images")
        if IMAGE_TOKEN not in value and not value.strip():
            raise MalformedRecordError(f"turn {turn_index} is empty")
        messages.append({"role": ROLES[expected], "content": value})
        markers.append(value.count(IMAGE_TOKEN))
    if messages[-1]["role"] != "assistant":
        raise MalformedRecordError("it ends with a human turn: there is no answer to learn")
    return messages, markers


def _images_per_turn(markers: list[int], num_images: int) -> list[int]:
    """How many of the record's images each turn takes: one per marker, or all in the first human turn when no turn
    holds a marker. Raises `MalformedRecordError` when the markers and the images do not match."""
    if not num_images:
        if any(markers):
            turn = next(index for index, count in enumerate(markers) if count)
            raise MalformedRecordError(f"turn {turn} holds {IMAGE_TOKEN!r} but the record has no 'image'")
        return markers
    if not any(markers):
        return [num_images] + markers[1:]
    if sum(markers) != num_images:
        raise MalformedRecordError(
            f"it holds {sum(markers)} {IMAGE_TOKEN!r} marker{'s' * (sum(markers) > 1)} for "
            f"{describe_images(num_images)}: one marker where each image goes, or none (the images then open the "
            "first human turn)"
        )
    return markers


def _image_list(image: Any) -> list:
    """A record's `"image"` as a list: none, one, or the given list of several."""
    return [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]


class LlavaDataset(Dataset):
    r"""
    LLaVA-format records (see the module docstring), checked when the dataset is made and read one image at a time.

    Args:
        source: A JSON file holding a list of records, a JSONL file (one record a line), or an in-memory list of
            records. `"image"` is a path or a list of paths; in-memory records may hold images themselves (PIL image,
            array, tensor, bytes) there.
        image_folder: Folder that relative image paths are read from; `None` reads them as given (relative to the
            current directory).
        on_error: `"raise"` fails at the first malformed record or unreadable image with an error that names the
            record and the problem; `"skip"` leaves such records out, counts them in `skipped` (record index ->
            reason) and logs one warning with the count. Records and image paths are checked when the dataset is
            made; images are decoded when read, so a file that exists but is corrupt is found then: `"raise"` fails
            naming the record, `"skip"` logs a warning, adds it to `skipped` (in the process that read it: a
            DataLoader worker's count stays in the worker) and gives the next readable record instead. A source
            without one usable record raises a `ValueError`.

    Items are dicts `{"conversations": [...], "image": RGB PIL image, list of them (when the record lists its images)
    or None}`, with the record's `"id"` when it has one: what `VisualRWKVDataCollator` takes.
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
                _, markers = _check_conversations(record)
                images = _image_list(record.get("image"))
                _images_per_turn(markers, len(images))
                for image in images:
                    self._check_image(image)
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

    def _check_image(self, image: Any) -> None:
        if isinstance(image, (str, os.PathLike)):
            path = self._image_path(image)
            if "://" not in path and not os.path.isfile(path):
                problem = "is a folder, not an image file" if os.path.isdir(path) else "does not exist"
                raise MalformedRecordError(f"its image path {path!r} {problem}")
        elif isinstance(image, (bool, int, float, list, tuple, dict)) or image is None:  # JSON values, not images
            raise MalformedRecordError(
                f"its 'image' is a {type(image).__name__}, not an image file path (or an image in memory)"
            )

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
                images = [
                    load_rgb_image(self._image_path(one) if isinstance(one, (str, os.PathLike)) else one)
                    for one in _image_list(image)
                ]
            except (OSError, ValueError, TypeError) as error:
                self._report(self.record_indices[position], error)
                logger.warning(f"LlavaDataset skipped record {self.record_indices[position]}: {error}")
                continue
            item = {"conversations": record["conversations"]}
            item["image"] = images if isinstance(image, (list, tuple)) else images[0] if images else None
            return item | ({"id": record["id"]} if "id" in record else {})
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
            before the first trained token after the last image, so the instruction and every image span are kept.
            A sample whose instruction alone does not fit is handled by `on_error`.
        on_error: `"raise"` fails on a sample that cannot be used (malformed, too long to keep its instruction, or
            with more images than `image_position` takes), naming the sample (its `"id"`, else its place in the
            batch) and the problem; `"skip"` drops it from its batch, counts it in `skipped` (reason -> count) and
            logs a warning. A batch left empty raises.

    Samples are dicts `{"conversations": [...], "image": image, list of images or None}` (what `LlavaDataset` gives).
    The batch holds `input_ids`, `attention_mask` and `labels` (batch, seq; every image position ignored) and, when
    any sample has an image, the processor's pixel inputs (`pixel_values`, and `high_res_pixel_values` for the
    three-encoder backbone) holding every image of the batch, sample by sample and in order within a sample
    (text-only samples need none): the layout the model reads them in.
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
        messages, markers = _check_conversations(sample)
        num_images = len(_image_list(sample.get("image")))
        images_per_turn = _images_per_turn(markers, num_images)
        if num_images > 1 and self.image_position != "first":
            raise MalformedRecordError(
                f"it has {num_images} images, but with image_position {self.image_position!r} VisualRWKV takes one "
                "image per sample; several images go first in their turn (image_position='first', VisualRWKV-7)"
            )
        for turn_index, count in enumerate(images_per_turn):
            if count:  # the chat template takes images as parts ("<image>" in a message's text is text)
                text = messages[turn_index]["content"].replace(IMAGE_TOKEN, "")
                content = [{"type": "image"}] * count + [{"type": "text", "text": text}]
                messages[turn_index] = {"role": "user", "content": content}
        prompt = self.processor.apply_chat_template(messages, image_position=self.image_position, tokenize=False)
        turn_ids = self.processor.tokenize_turns(prompt, bool(num_images))
        if len(turn_ids) != len(messages):
            raise MalformedRecordError(f"its {len(messages)} turns formatted into {len(turn_ids)}")
        # the instruction runs through the last turn with an image
        last_image_turn = max((index for index, count in enumerate(images_per_turn) if count), default=0)

        input_ids, labels = [], []
        min_length = None  # the instruction (through the image turn) and the first trained token after it
        for turn_index, (message, ids) in enumerate(zip(messages, turn_ids)):
            if message["role"] == "user":
                turn_labels = [IGNORE_INDEX] * len(ids)
            else:
                prefix = min(self.assistant_prefix_length, len(ids))
                turn_labels = [IGNORE_INDEX] * prefix + ids[prefix:]
                if min_length is None and turn_index > last_image_turn and len(ids) > prefix:
                    min_length = len(input_ids) + prefix + 1
            input_ids.extend(ids)
            labels.extend(turn_labels)
        if min_length is None:
            raise MalformedRecordError("no answer token to learn after the instruction")
        if self.max_length is not None and len(input_ids) > self.max_length:
            if min_length > self.max_length:
                raise MalformedRecordError(
                    f"its instruction and first answer token take {min_length} tokens, more than max_length "
                    f"{self.max_length} (each image takes {self.processor.num_image_tokens})"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return input_ids, labels

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("VisualRWKVDataCollator: the batch holds no samples.")
        rows, images = [], []
        for index, sample in enumerate(samples):
            try:
                rows.append(self.tokenize(sample))
            except MalformedRecordError as error:
                if self.on_error == "raise":
                    named = isinstance(sample, dict) and "id" in sample
                    name = repr(sample["id"]) if named else f"{index} of the batch"
                    raise MalformedRecordError(f"sample {name}: {error}") from error
                self.skipped[str(error)] += 1
                total = sum(self.skipped.values())
                logger.warning(f"VisualRWKVDataCollator skipped a sample: {error} ({total} so far)")
                continue
            images.extend(_image_list(sample.get("image")))
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
            pixels = self.processor(images=images, return_tensors="pt")
            batch.update({name: pixels[name] for name in PIXEL_INPUTS if name in pixels})
        return batch


__all__ = ["LlavaDataset", "MalformedRecordError", "VisualRWKVDataCollator"]
