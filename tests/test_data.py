"""LlavaDataset and VisualRWKVDataCollator: ids and label masks against the spec's example, multi-turn masking,
padding, truncation, malformed records, and several images per sample (VisualRWKV-7): each row as the processor gives
the sample alone, every image of the batch in order."""

import itertools
import json
import logging

import pytest
import torch
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from visualrwkv_hf import RwkvWorldTokenizer, VisualRWKVProcessor
from visualrwkv_hf.data import LlavaDataset, MalformedRecordError, VisualRWKVDataCollator
from visualrwkv_hf.image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor

from test_pipeline import random_image

QUESTION = "What color is the bus?\nAnswer the question using a single word or phrase."
NUM_IMAGE_TOKENS = 5
IMAGE_ID = 65530
# Spec section 5 (image position "middle", the sandwich).
SANDWICH_HEAD = [24281, 59, 30031, 38083, 4600, 22590, 21399, 64, 11]  # "User: What color is the bus?\n"
ASSISTANT_RED = [5585, 41693, 59, 20733, 261]  # "Assistant: Red\n\n"


@pytest.fixture(scope="module")
def processor():
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 14}, crop_size={"height": 14, "width": 14})
    return VisualRWKVProcessor(
        image_processor=image_processor, tokenizer=RwkvWorldTokenizer(), num_image_tokens=NUM_IMAGE_TOKENS
    )


def record(*turns, image=None):
    conversations = [{"from": "human" if index % 2 == 0 else "gpt", "value": text} for index, text in enumerate(turns)]
    return {"conversations": conversations, "image": image}


def test_spec_example_ids_and_labels(processor):
    sample = record("<image>\n" + QUESTION, "Red", image=random_image(0))
    ids, labels = VisualRWKVDataCollator(processor).tokenize(sample)
    assert ids[: len(SANDWICH_HEAD)] == SANDWICH_HEAD
    image_start = len(SANDWICH_HEAD)
    assert ids[image_start : image_start + NUM_IMAGE_TOKENS] == [IMAGE_ID] * NUM_IMAGE_TOKENS
    assert ids[image_start + NUM_IMAGE_TOKENS : image_start + NUM_IMAGE_TOKENS + 2] == [11, 24326]
    assert ids[-len(ASSISTANT_RED) - 2 :] == [47, 261] + ASSISTANT_RED
    assert labels[-5:] == [-100, -100, -100, 20733, 261]
    assert labels[:-2] == [-100] * (len(ids) - 2)  # every human and image token ignored


def test_ids_match_the_processor_at_inference(processor):
    """The training prompt up to "Assistant:" is exactly what the processor feeds the model when asked."""
    collator = VisualRWKVDataCollator(processor, image_position="first")
    ids, _ = collator.tokenize(record("<image>\n" + QUESTION, "Red", image=random_image(0)))
    asked = processor(images=[random_image(0)], text=QUESTION, image_position="first")["input_ids"][0]
    assert ids[: len(asked)] == asked
    assert ids[:3] == [24281, 59, 33]  # "User: " (spec, image first)


def test_image_without_marker_goes_into_the_first_human_turn(processor):
    collator = VisualRWKVDataCollator(processor, image_position="last")
    with_marker = collator.tokenize(record(QUESTION + "\n<image>", "Red", image=random_image(0)))
    without_marker = collator.tokenize(record(QUESTION, "Red", image=random_image(0)))
    assert with_marker == without_marker
    assert with_marker[0][-len(ASSISTANT_RED) - 1 :] == [261] + ASSISTANT_RED  # "\n" + image + "\n\n"


def test_multi_turn_masking(processor):
    encode = processor.tokenizer.encode
    ids, labels = VisualRWKVDataCollator(processor).tokenize(
        record("<image>\nWhat is it?", "A bus.", "And its colour?", "Red", image=random_image(1))
    )
    turns = processor.tokenize_turns(
        processor.apply_chat_template(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A bus."},
                {"role": "user", "content": "And its colour?"},
                {"role": "assistant", "content": "Red"},
            ]
        )
    )
    assert ids == [token for turn in turns for token in turn]
    expected = []
    for index, turn in enumerate(turns):
        expected += [-100] * len(turn) if index % 2 == 0 else [-100] * 3 + turn[3:]
    assert labels == expected
    assert turns[1] == encode("Assistant: A bus.\n\n") and turns[3] == ASSISTANT_RED
    assert turns[2] == encode("User: And its colour?\n\n")


def test_collator_right_pads_and_mixes_text_only_samples(processor):
    samples = [record("Hi", "Hello there, friend"), record("<image>\n" + QUESTION, "Red", image=random_image(0))]
    collator = VisualRWKVDataCollator(processor)
    batch = collator(samples)
    lengths = [len(collator.tokenize(sample)[0]) for sample in samples]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["pixel_values"].shape == (1, 3, 14, 14)  # only the sample with an image
    short = min(lengths)
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (max(lengths) - short)
    assert batch["input_ids"][0, short:].eq(0).all() and batch["labels"][0, short:].eq(-100).all()
    assert batch["labels"][0, :short].tolist() == collator.tokenize(samples[0])[1]
    assert "pixel_values" not in collator(samples[:1])


def test_truncation_cuts_the_answer_and_keeps_the_instruction(processor):
    sample = record("<image>\n" + QUESTION, "Red and white, with a blue stripe", image=random_image(0))
    full_ids, full_labels = VisualRWKVDataCollator(processor).tokenize(sample)
    first_answer = full_labels.index(20733) if 20733 in full_labels else len(full_ids) - 8
    max_length = first_answer + 2
    ids, labels = VisualRWKVDataCollator(processor, max_length=max_length).tokenize(sample)
    assert ids == full_ids[:max_length] and labels == full_labels[:max_length]
    assert sum(label != -100 for label in labels) == 2
    # The instruction, the "Assistant:" prefix and one answer token are the least that is kept.
    first_trained = next(index for index, label in enumerate(full_labels) if label != -100)
    VisualRWKVDataCollator(processor, max_length=first_trained + 1).tokenize(sample)
    with pytest.raises(MalformedRecordError, match="more than max_length"):
        VisualRWKVDataCollator(processor, max_length=first_trained).tokenize(sample)


def test_collator_skips_what_does_not_fit_with_a_count(processor, caplog):
    long_sample = record("<image>\n" + QUESTION, "Red", image=random_image(0))
    collator = VisualRWKVDataCollator(processor, max_length=12, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="visualrwkv_hf.data"):
        batch = collator([long_sample, record("Hi", "Yes")])
    assert batch["input_ids"].shape[0] == 1 and "pixel_values" not in batch
    assert sum(collator.skipped.values()) == 1 and "max_length" in caplog.text
    with pytest.raises(ValueError, match="every sample of this batch was skipped"):
        collator([long_sample])
    with pytest.raises(ValueError, match="the batch holds no samples"):
        collator([])


def test_dataset_reads_json_jsonl_and_memory(tmp_path):
    image_path = tmp_path / "images" / "a.png"
    image_path.parent.mkdir()
    random_image(2).save(image_path)
    records = [
        {**record("<image>\nWhat?", "X"), "image": "a.png"},
        {"conversations": record("Hi", "Hello")["conversations"]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(one) for one in records) + "\n")
    for source in (tmp_path / "data.json", str(tmp_path / "data.jsonl")):
        dataset = LlavaDataset(source, image_folder=tmp_path / "images")
        assert len(dataset) == 2 and dataset.skipped == {}
        assert dataset[0]["image"].mode == "RGB" and dataset[0]["image"].size == (52, 40)
        assert dataset[1] == {"conversations": records[1]["conversations"], "image": None}
    in_memory = LlavaDataset([{**records[0], "image": random_image(3).convert("RGBA")}])
    assert in_memory[0]["image"].mode == "RGB"


MALFORMED = [
    ({"image": None}, "no 'conversations'"),
    (record("Hi", "Hello", "Bye"), "ends with a human turn"),
    ({"conversations": [{"from": "gpt", "value": "Hi"}, {"from": "human", "value": "?"}]}, "expected 'human'"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "assistant", "value": "?"}]}, "expected 'gpt'"),
    (record("<image>\nWhat?", "X"), "has no 'image'"),
    (record("<image>\nWhat?", "X", image="missing.png"), "does not exist"),
    (record("<image>\nWhat?", "X", image="."), "is a folder, not an image file"),
    (record("<image>\nWhat?", "X", image=7), "its 'image' is a int, not an image file path"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "X"}]}, "turn 0 is not a"),
    (record("<image>\nA <image>", "X", image="a.png"), "2 '<image>' markers"),
    (record("Hi", "  "), "turn 1 is empty"),
]


@pytest.mark.parametrize("bad_record, problem", MALFORMED)
def test_malformed_records_raise_with_index_and_problem(tmp_path, bad_record, problem):
    good = record("Hi", "Hello")
    with pytest.raises(MalformedRecordError, match=f"record 1: .*{problem}"):
        LlavaDataset([good, bad_record, good], image_folder=tmp_path)


def test_malformed_records_skip_with_count_and_one_warning(tmp_path, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    good = record("Hi", "Hello")
    records = [good] + [bad for bad, _ in MALFORMED] + [good, record("<image>\nWhat?", "X", image="corrupt.png")]
    with caplog.at_level(logging.WARNING, logger="visualrwkv_hf.data"):
        dataset = LlavaDataset(records, image_folder=tmp_path, on_error="skip")
    assert len(dataset) == 3 and sorted(dataset.skipped) == list(range(1, len(MALFORMED) + 1))
    assert caplog.text.count("LlavaDataset skipped") == 1 and f"skipped {len(MALFORMED)} of" in caplog.text
    # The corrupt file is found when read: skipped, counted, and the next readable record given instead.
    assert dataset[2] == dataset[0] and len(dataset.skipped) == len(MALFORMED) + 1
    with pytest.raises(MalformedRecordError, match=f"record {len(records) - 1}: .*not an image format"):
        LlavaDataset(records[-1:] * (len(records)), image_folder=tmp_path)[len(records) - 1]


def test_indexing_and_iteration_behave_as_a_list():
    records = [record("Hi", "Hello"), record("Yo", "Hey"), record("Ho", "Ha")]
    dataset = LlavaDataset(records)
    iterated = list(itertools.islice(dataset, 10))  # `for` stops after the last record
    assert [item["conversations"] for item in iterated] == [one["conversations"] for one in records]
    assert dataset[-1] == dataset[2] and dataset[-3] == dataset[0]
    for index in (3, -4, 100):
        with pytest.raises(IndexError, match=f"index {index} is out of range for 3 records"):
            dataset[index]
    assert dataset[torch.tensor(1)] == dataset[1]  # integer-like indices, as samplers may give
    with pytest.raises(TypeError, match="indices must be integers, not slice"):
        dataset[0:2]


def test_sources_without_records_are_refused(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json' holds no records"):
        LlavaDataset(empty)
    with pytest.raises(ValueError, match="The source holds no records"):
        LlavaDataset([])
    with pytest.raises(ValueError, match=r"all 2 records are malformed, e\.g\. record 0: .*record 1:"):
        LlavaDataset([{"image": None}, record("Hi")], on_error="skip")
    binary = tmp_path / "data.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="data.json' is not UTF-8 text"):
        LlavaDataset(binary)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(ValueError, match="holds a JSON int, not a list of records"):
        LlavaDataset(scalar)


def test_an_undecodable_image_names_the_record_and_the_file(tmp_path):
    good = tmp_path / "good.png"
    random_image(0).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    dataset = LlavaDataset([record("Hi", "Hello"), record("<image>\nWhat?", "X", image=str(truncated))])
    with pytest.raises(MalformedRecordError, match=r"record 1: Cannot read image file '.*truncated\.png'"):
        dataset[1]


# ------------------------------------------------------------------ several images per sample (VisualRWKV-7)

V7_IMAGE_ID = 65535  # VisualRWKV-7's placeholder id
V7_TOKENS = 4


@pytest.fixture(scope="module")
def v7_processor():
    """VisualRWKV-7's processor: the three-encoder image processor (pixel_values and high_res_pixel_values), images
    first, its placeholder id; few tokens per image so that the ids read easily."""
    return VisualRWKVProcessor(
        image_processor=SamDinoSiglipImageProcessor(), tokenizer=RwkvWorldTokenizer(), num_image_tokens=V7_TOKENS,
        image_position="first", image_token_id=V7_IMAGE_ID,
    )


def test_several_images_collate_as_the_processor_gives_each_sample_alone(v7_processor):
    images = [random_image(seed) for seed in range(5)]
    samples = [
        record("<image>\n<image>\nCompare them.", "The left is darker.", image=images[:2]),
        record("Hi", "Hello there, friend"),
        # one image in each of two human turns, as the original's multi-turn records
        record("<image>\nWhat is it?", "A bus.", "<image>\nAnd this?", "A car.", image=images[2:4]),
        record("Describe it.", "Noise.", image=images[4]),  # no marker: the image opens the first human turn
    ]
    collator = VisualRWKVDataCollator(v7_processor)
    batch = collator(samples)
    image_parts = [[2, 0], [0, 0], [1, 0, 1, 0], [1, 0]]  # image parts per turn, from the markers
    for row, (sample, parts) in enumerate(zip(samples, image_parts)):
        messages = [
            {"role": "user" if index % 2 == 0 else "assistant",
             "content": [{"type": "image"}] * count + [{"type": "text", "text": turn["value"].replace("<image>", "")}]}
            for index, (turn, count) in enumerate(zip(sample["conversations"], parts, strict=True))
        ]
        sample_images = sample["image"] if isinstance(sample["image"], list) else [sample["image"]] * sum(parts)
        alone = v7_processor(images=sample_images or None, text=v7_processor.apply_chat_template(messages))
        ids = alone["input_ids"][0]
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["attention_mask"][row].sum() == len(ids)
        labels = batch["labels"][row, : len(ids)]
        assert labels[torch.tensor(ids) == V7_IMAGE_ID].eq(-100).all()
    # the original's ids for two images: "User: ", image, "\n", image, "\nCompare them.\n\n", each piece on its own
    encode = v7_processor.tokenizer.encode
    image = [V7_IMAGE_ID] * V7_TOKENS
    expected = encode("User: ") + image + encode("\n") + image + encode("\nCompare them.\n\n")
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert batch["labels"][0, : len(expected)].eq(-100).all()
    assert int((batch["input_ids"] == V7_IMAGE_ID).sum()) == 5 * V7_TOKENS
    # every image of the batch, sample by sample, left to right
    pixels = v7_processor.image_processor(images, return_tensors="pt")
    for name in ("pixel_values", "high_res_pixel_values"):
        assert torch.equal(batch[name], pixels[name]), name


def test_more_images_than_the_prompt_takes_are_refused_naming_the_sample(processor, v7_processor):
    two_images = {**record("<image>\n<image>\nCompare them.", "Same.", image=[random_image(0)] * 2), "id": "cats-7"}
    good = record("Hi", "Hello")
    with pytest.raises(MalformedRecordError, match=r"sample 'cats-7': it has 2 images, but with image_position "
                       r"'middle' VisualRWKV takes one image per sample; .*image_position='first'"):
        VisualRWKVDataCollator(processor)([good, two_images])
    no_id = {key: value for key, value in two_images.items() if key != "id"}
    with pytest.raises(MalformedRecordError, match=r"sample 1 of the batch: it has 2 images, but with image_position "
                       r"'last'"):
        VisualRWKVDataCollator(processor, image_position="last")([good, no_id])
    skipping = VisualRWKVDataCollator(processor, on_error="skip")
    assert skipping([good, two_images])["input_ids"].shape[0] == 1 and sum(skipping.skipped.values()) == 1
    one_marker = record("<image>\nCompare them.", "Same.", image=[random_image(0)] * 2)
    with pytest.raises(MalformedRecordError, match=r"sample 0 of the batch: it holds 1 '<image>' marker for 2 images"):
        VisualRWKVDataCollator(v7_processor)([one_marker])


def test_dataset_reads_a_list_of_images_and_checks_each(tmp_path):
    for name, seed in (("a.png", 0), ("b.png", 1)):
        random_image(seed).save(tmp_path / name)
    two = {**record("<image>\n<image>\nCompare.", "Same."), "image": ["a.png", "b.png"], "id": 3}
    dataset = LlavaDataset([two, {**two, "image": ["a.png"]}], image_folder=tmp_path, on_error="skip")
    item = dataset[0]
    assert [image.size for image in item["image"]] == [(52, 40)] * 2 and item["id"] == 3
    assert item["image"][1].tobytes() == random_image(1).tobytes()
    assert dataset.skipped == {1: "it holds 2 '<image>' markers for an image: one marker where each image goes, or "
                                  "none (the images then open the first human turn)"}
    with pytest.raises(MalformedRecordError, match=r"record 0: its image path '.*c\.png' does not exist"):
        LlavaDataset([{**two, "image": ["a.png", "c.png"]}], image_folder=tmp_path)
    with pytest.raises(MalformedRecordError, match=r"record 0: turn 1 holds '<image>'; only human turns hold images"):
        LlavaDataset([record("<image>\nA?", "<image>", image=["a.png", "b.png"])], image_folder=tmp_path)
