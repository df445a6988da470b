"""VisualRWKVProcessor: the original's prompt format and ids (checked against BlinkDL's reference tokenizer), images to
pixel values, batching, errors, decoding, save/load. Image decoding itself is tested in test_image_loading.py."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from visualrwkv_hf import demo
from visualrwkv_hf.configuration_visualrwkv import VisualRWKVConfig
from visualrwkv_hf.processing_visualrwkv import (
    CHAT_TEMPLATE,
    VisualRWKVProcessor,
    default_image_processor,
)
from visualrwkv_hf.tokenization_rwkv_world import VOCAB_FILE_NAME, RwkvWorldTokenizer


rwkv_tokenizer = pytest.importorskip("rwkv.rwkv_tokenizer", reason="the reference comes with `pip install rwkv`")

IMAGE_ID = 65530
QUESTION = "What color is the bus?\nAnswer the question using a single word or phrase."
SUFFIX = "Answer the question using a single word or phrase."
# Spec section 5, literally.
MIDDLE_HEAD = [24281, 59, 30031, 38083, 4600, 22590, 21399, 64, 11]  # "User: What color is the bus?\n"
USER_PREFIX = [24281, 59, 33]  # "User: "
ASSISTANT_RED = [5585, 41693, 59, 20733, 261]  # "Assistant: Red\n\n"
GENERATION_PROMPT = [5585, 41693, 59]  # "Assistant:"


@pytest.fixture(scope="module")
def reference():
    return rwkv_tokenizer.TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv_tokenizer.__file__), VOCAB_FILE_NAME))


@pytest.fixture(scope="module")
def processor():
    return VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer())


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))


def bus_chat(with_answer: bool) -> list[dict]:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return chat + [{"role": "assistant", "content": "Red"}] if with_answer else chat


def prompt_ids(processor, chat, image, **template_kwargs) -> list[int]:
    prompt = processor.apply_chat_template(chat, **template_kwargs)
    return processor(images=image, text=prompt)["input_ids"][0]


# ---------------------------------------------------------------- exact ids


@pytest.mark.parametrize("with_answer", [False, True])
def test_middle_ids_are_the_spec_ids(processor, reference, image, with_answer):
    ids = prompt_ids(processor, bus_chat(with_answer), image, add_generation_prompt=not with_answer)
    tail = reference.encode("\nWhat color is the bus?\n" + SUFFIX + "\n\n")
    ending = ASSISTANT_RED if with_answer else GENERATION_PROMPT
    assert reference.encode("User: What color is the bus?\n") == MIDDLE_HEAD
    assert tail[:3] == [11, 24326, 38083] and tail[-2:] == [47, 261]
    assert reference.encode("Assistant: Red\n\n") == ASSISTANT_RED
    assert reference.encode("Assistant:") == GENERATION_PROMPT
    assert ids == MIDDLE_HEAD + [IMAGE_ID] * 577 + tail + ending


def test_middle_is_the_default_and_first_and_last_ids(processor, reference, image):
    chat = bus_chat(with_answer=True)
    assert prompt_ids(processor, chat, image) == prompt_ids(processor, chat, image, image_position="middle")

    first = prompt_ids(processor, chat, image, image_position="first")
    assert reference.encode("User: ") == USER_PREFIX
    assert first == USER_PREFIX + [IMAGE_ID] * 577 + reference.encode("\n" + QUESTION + "\n\n") + ASSISTANT_RED

    last = prompt_ids(processor, chat, image, image_position="last")
    assert last == reference.encode("User: " + QUESTION + "\n") + [IMAGE_ID] * 577 + [261] + ASSISTANT_RED


def test_bare_text_is_formatted_with_the_call_time_image_position(processor, image):
    for position in ("first", "middle", "last"):
        from_call = processor(images=image, text=QUESTION, image_position=position)["input_ids"][0]
        expected = prompt_ids(processor, bus_chat(False), image, add_generation_prompt=True, image_position=position)
        assert from_call == expected
    last_processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), image_position="last")
    assert last_processor(images=image, text=QUESTION)["input_ids"][0] == processor(
        images=image, text=QUESTION, image_position="last"
    )["input_ids"][0]
    assert processor.decode(processor(text="Hello")["input_ids"][0]) == "User: Hello\n\nAssistant:"


def test_each_turn_is_tokenized_on_its_own(processor, reference):
    # Tokens cross the turn boundary when the whole prompt is tokenized at once; the original never does that.
    chat = [
        {"role": "user", "content": "Say ?"},
        {"role": "assistant", "content": "?"},
        {"role": "user", "content": "Again"},
    ]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    turns = ["User: Say ?\n\n", "Assistant: ?\n\n", "User: Again\n\n", "Assistant:"]
    assert prompt == "".join(turns)
    per_turn = [token for turn in turns for token in reference.encode(turn)]
    assert processor(text=prompt)["input_ids"][0] == per_turn
    # Only "<image>" is special in a prompt: other added tokens in the text are plain bytes, as in the original.
    literal = "User: <|endoftext|>\n\nAssistant:"
    loose = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(split_special_tokens=False))
    assert loose(text=literal)["input_ids"][0] == reference.encode("User: <|endoftext|>\n\n") + GENERATION_PROMPT


def test_image_splits_the_text_around_it(reference):
    # "What\n" and "\nWhat" tokenized separately, as the original does, not as one string with a marker in it.
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=1)
    ids = processor(images=Image.new("RGB", (8, 8)), text="User: a.\n<image>\n.b\n\n")["input_ids"][0]
    assert ids == reference.encode("User: a.\n") + [IMAGE_ID] + reference.encode("\n.b\n\n")


# ---------------------------------------------------------------- chat template semantics


def test_multi_turn_sandwich_holds_every_human_turn(processor):
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red"}]},
        {"role": "user", "content": [{"type": "text", "text": "  How many wheels?  "}]},
        {"role": "assistant", "content": "Four"},
        {"role": "user", "content": "Is it moving?"},
    ]
    expected = {
        "middle": "User: What color is the bus?\nHow many wheels?\nIs it moving?\n<image>\n" + QUESTION + "\n\n",
        "first": "User: <image>\n" + QUESTION + "\n\n",
        "last": "User: " + QUESTION + "\n<image>\n\n",
    }
    rest = "Assistant: Red\n\nUser: How many wheels?\n\nAssistant: Four\n\nUser: Is it moving?\n\nAssistant:"
    for position, first_turn in expected.items():
        assert processor.apply_chat_template(chat, add_generation_prompt=True, image_position=position) == (
            first_turn + rest
        )


def test_image_turn_later_in_the_conversation(processor):
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "What is this?\n" + SUFFIX}, {"type": "image"}]},
    ]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == (
        "User: Hi\n\nAssistant: Hello!\n\n"
        "User: Hi\nWhat is this?\n<image>\nWhat is this?\n" + SUFFIX + "\n\nAssistant:"
    )


def test_blank_lines_collapse_and_text_is_stripped(processor):
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n a\n\n\nb \n \t\n c\r\n\r\nd "}]},
        {"role": "assistant", "content": "x\n\ny\n\n"},
        {"role": "user", "content": "p\n\n\n\nq"},
    ]
    rendered = processor.apply_chat_template(chat, image_position="first")
    assert rendered == "User: <image>\na\nb \n c\r\nd\n\nAssistant: x\ny\n\nUser: p\nq\n\n"
    sandwich = processor.apply_chat_template(chat)
    assert sandwich.startswith("User: a\nb \n c\r\nd\np\nq\n<image>\na\nb \n c\r\nd\n\n")


def original_format(messages: list[tuple[str, str]], image_position: str) -> str:
    """The original's formatting (VisualRWKV-v6/v6.0/src/dataset.py), re-implemented here with its regular expression
    as an oracle; other human turns are collapsed in the sandwich too (the documented difference)."""

    def collapse(text):
        return re.sub(r"\n(\s*\n)+", "\n", text)

    image_texts = [text for _, text in messages if "<image>" in text]
    human_texts = []
    for role, text in messages:
        if role == "user":
            if "<image>" in text:
                text = text.replace("<image>", "").strip().replace(SUFFIX, "").strip()
            human_texts.append(collapse(text.strip()))
    rendered = ""
    for role, text in messages:
        if text in image_texts:
            text = collapse(text.replace("<image>", "").strip())
            text = {
                "first": "<image>\n" + text,
                "middle": "\n".join(human_texts) + "\n<image>\n" + text,
                "last": text + "\n<image>",
            }[image_position].strip()
        else:
            text = collapse(text.strip())
        speaker = "User" if role == "user" else "Assistant"
        rendered += f"{speaker}: {text}\n\n" if text else f"{speaker}:"
    return rendered


def test_template_matches_the_original_rules_on_random_conversations(processor):
    rng = random.Random(0)
    pieces = ["a", "b c", " ", "  ", "\n", "\n", "\t", "\r", "\x0c", "\u00a0", "\u3000", SUFFIX, "é", "?", "x\ny"]

    def random_text():
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))

    for _ in range(300):
        messages = [("user" if turn % 2 == 0 else "assistant", random_text()) for turn in range(rng.randint(1, 6))]
        user_turns = [index for index, (role, _) in enumerate(messages) if role == "user"]
        image_turn = rng.choice(user_turns)
        marked = [
            (role, "<image>" * (index == image_turn) + text) if rng.random() < 0.5 or index != image_turn
            else (role, text + "<image>")
            for index, (role, text) in enumerate(messages)
        ]
        # The chat holds the image as a part; the oracle reads the original's "<image>" marker.
        chat = [
            {"role": role, "content": [{"type": "image"}, {"type": "text", "text": text.replace("<image>", "")}]}
            if "<image>" in text else {"role": role, "content": text}
            for role, text in marked
        ]
        for position in ("first", "middle", "last"):
            assert processor.apply_chat_template(chat, image_position=position) == original_format(marked, position)


def test_template_refuses_unknown_positions(processor):
    with pytest.raises(ValueError, match="image_position"):
        processor.apply_chat_template(bus_chat(False), image_position="centre")
    with pytest.raises(ValueError, match="image_position"):
        VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), image_position="top")


def test_apply_chat_template_tokenizes_images_from_the_messages(processor, image):
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    out = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", image_position="first"
    )
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}
    assert out["input_ids"][0, :4].tolist() == USER_PREFIX + [IMAGE_ID]
    assert out["input_ids"][0, -3:].tolist() == GENERATION_PROMPT
    assert out["pixel_values"].shape == (1, 3, 336, 336)


def test_continue_final_message(processor):
    chat = bus_chat(False) + [{"role": "assistant", "content": "The bus is"}]
    assert processor.apply_chat_template(chat, continue_final_message=True).endswith("\n\nAssistant: The bus is")


# ---------------------------------------------------------------- images, batches


def test_prompt_defaults_are_the_model_configs(tmp_path):
    # One source of truth: the processor, the demo's processor and the saved chat template (which a tokenizer or a
    # server renders without this package) default to what VisualRWKVConfig says, and a saved processor keeps them.
    config = VisualRWKVConfig()
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer())
    assert (processor.image_position, processor.num_image_tokens) == (config.image_position, config.num_image_tokens)
    _, demo_processor = demo.build_model()
    assert demo_processor.image_position == config.image_position
    chat = bus_chat(with_answer=True)
    assert processor.tokenizer.apply_chat_template(chat, chat_template=CHAT_TEMPLATE, tokenize=False) == (
        processor.apply_chat_template(chat, image_position=config.image_position)
    )
    VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), image_position="last", num_image_tokens=5).save_pretrained(
        tmp_path
    )
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.image_position, loaded.num_image_tokens) == ("last", 5)


def test_image_expands_to_num_image_tokens_contiguous(image):
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=37)
    ids = processor(images=image, text=QUESTION)["input_ids"][0]
    positions = [index for index, token in enumerate(ids) if token == IMAGE_ID]
    assert len(positions) == 37 and positions == list(range(positions[0], positions[0] + 37))


def test_pixel_values_equal_the_clip_image_processor_on_the_rgb_image(processor, image):
    pixels = processor(images=image, text=QUESTION, return_tensors="pt")["pixel_values"]
    expected = default_image_processor()(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336)
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    clip = processor.image_processor
    assert clip.size == {"shortest_edge": 336} and clip.crop_size == {"height": 336, "width": 336}
    assert clip.do_center_crop and not getattr(clip, "do_pad", False)


def test_padded_batch_rows_equal_single_prompts(processor, image):
    texts = [QUESTION, "User: Hi\n\nAssistant:", "Describe it."]
    images = [[image], [], [image]]
    singles = [processor(images=sample, text=text)["input_ids"][0] for text, sample in zip(texts, images)]
    longest = max(len(row) for row in singles)
    for side in ("left", "right"):
        batch = processor(images=images, text=texts, padding=True, padding_side=side, return_tensors="pt")
        assert batch["input_ids"].shape == (3, longest) and batch["pixel_values"].shape == (2, 3, 336, 336)
        for row, single in enumerate(singles):
            mask = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][mask].tolist() == single
            assert batch["input_ids"][row][~mask].eq(0).all()
            pad = longest - len(single)
            assert mask.tolist() == ([False] * pad + [True] * len(single) if side == "left" else
                                     [True] * len(single) + [False] * pad)
    # A flat list with one image per text, and one image per text that holds the marker, mean the same.
    marked = ["User: <image>\nA\n\nAssistant:", "User: B\n\nAssistant:"]
    assert processor(images=[image], text=marked, padding=True)["input_ids"] == processor(
        images=[[image], []], text=marked, padding=True
    )["input_ids"]


def test_images_without_text(processor, image):
    out = processor(images=[image, image], return_tensors="pt")
    assert list(out) == ["pixel_values"] and out["pixel_values"].shape == (2, 3, 336, 336)


def test_any_image_processor_works(image):
    siglip = SiglipImageProcessorPil(size={"height": 224, "width": 224})
    processor = VisualRWKVProcessor(image_processor=siglip, tokenizer=RwkvWorldTokenizer(), num_image_tokens=196)
    out = processor(images=image, text=QUESTION, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert (out["input_ids"] == IMAGE_ID).sum() == 196
    torch.testing.assert_close(out["pixel_values"], siglip(image, return_tensors="pt")["pixel_values"])


# ---------------------------------------------------------------- errors


def test_mismatched_images_and_markers_fail_clearly(processor, image):
    formatted = "User: <image>\nWhat?\n\nAssistant:"
    cases = [
        (dict(images=[image, image], text=QUESTION), "one image per prompt"),
        (dict(images=[image, image], text=formatted), "one image per prompt"),
        (dict(images=[[image, image]], text=[QUESTION]), "takes one image"),
        (dict(images=[[image]], text=[QUESTION, QUESTION]), "one list"),
        (dict(images=[[image], image], text=[QUESTION, QUESTION]), "one list"),
        (dict(images=image, text="User: What?\n\nAssistant:"), "an image but no '<image>' marker"),
        (dict(images=image, text="User: <image><image>\n\nAssistant:"), "2 '<image>' markers"),
        (dict(images=image, text="What is <image>?\n<image>"), "cannot also hold the text '<image>'"),
        (dict(images=image, text=QUESTION, truncation=True, max_length=10), "does not truncate"),
        (dict(images=image, text=QUESTION, image_position="centre"), "image_position"),
        (dict(images=image, text=[QUESTION, 3]), "string"),
        (dict(), "needs `images`, `text` or both"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            processor(**kwargs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        processor(images="/no/such/bus.jpg", text=QUESTION)


def test_nan_image_tensors_are_refused(processor):
    pixels = torch.rand(3, 8, 8)
    pixels[1, 2, 3] = float("nan")
    for image in (pixels, pixels.to(torch.bfloat16), pixels.numpy().astype(np.float16)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            processor(images=image, text=QUESTION)


# ---------------------------------------------------------------- decoding, saving


def test_post_process_cuts_at_the_turn_end(processor, image):
    new_tokens = torch.tensor([[20733, 261, 24281, 59], [20733, 11, 20733, 261]])
    assert processor.post_process_image_text_to_text(new_tokens) == ["Red", "Red\n Red"]
    prompt = processor(images=image, text=QUESTION)["input_ids"][0]
    full = processor.post_process_image_text_to_text([prompt + [20733, 261, 0, 0]])[0]
    decoded_prompt = processor.post_process_image_text_to_text([prompt])[0]
    # The image-text-to-text pipeline decodes prompt and prompt + answer and keeps what follows the prompt.
    assert decoded_prompt.endswith("Assistant:") and full == decoded_prompt + "Red"
    assert processor.post_process_image_text_to_text(torch.tensor([20733, 261, 5585])) == "Red"
    assert processor.batch_decode([[20733, 261]]) == [" Red\n\n"] and processor.decode([20733]) == " Red"


def test_save_and_auto_processor_round_trip(tmp_path, image):
    # The package registers AutoProcessor on import once its __init__ has the line; the test does not rely on it.
    AutoProcessor.register(VisualRWKVConfig, VisualRWKVProcessor, exist_ok=True)
    original = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), image_position="last", num_image_tokens=37)
    original.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VisualRWKVProcessor
    assert (loaded.image_position, loaded.num_image_tokens, loaded.image_token_id) == ("last", 37, IMAGE_ID)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    for inputs in (dict(conversation=chat, add_generation_prompt=True, tokenize=True, return_dict=True), dict()):
        call = (lambda p: p.apply_chat_template(**inputs)) if inputs else (lambda p: p(images=image, text=QUESTION))
        before, after = call(original), call(loaded)
        assert set(before) == set(after) == {"input_ids", "attention_mask", "pixel_values"}
        assert before["input_ids"] == after["input_ids"] and before["attention_mask"] == after["attention_mask"]
        assert np.array_equal(np.asarray(before["pixel_values"]), np.asarray(after["pixel_values"]))
        assert before["input_ids"][0][-len(GENERATION_PROMPT) - 1 - 37 :][:37] == [IMAGE_ID] * 37  # "last"


# ---------------------------------------------------------------- "<image>" as text, empty inputs, options


def test_image_written_in_a_text_only_prompt_stays_text(processor, reference, image):
    question = "What does <image> do in HTML?"
    formatted = f"User: {question}\n\nAssistant:"
    as_text = reference.encode(f"User: {question}\n\n") + GENERATION_PROMPT
    chats = (
        [{"role": "user", "content": question}],
        [{"role": "user", "content": [{"type": "text", "text": question}]}],
    )
    for chat in chats:
        assert processor.apply_chat_template(chat, add_generation_prompt=True) == formatted
        assert processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)[0] == as_text
    for text in (question, formatted):
        assert processor(text=text)["input_ids"][0] == as_text
    # In a batch, only the prompt that has the image reads its marker as the image.
    batch = processor(images=[[image], []], text=["<image>\nWhat color?", question], padding=True)
    alone = [processor(images=image, text="What color?")["input_ids"][0], as_text]
    for row, mask, expected in zip(batch["input_ids"], batch["attention_mask"], alone):
        assert [token for token, keep in zip(row, mask) if keep] == expected
    # A conversation with an image keeps other "<image>" text, so that the prompt is ambiguous: refused by name.
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    with pytest.raises(ValueError, match="cannot also hold the text '<image>'"):
        processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)


def test_empty_inputs_are_refused(processor, image):
    with pytest.raises(ValueError, match="conversation is empty"):
        processor.apply_chat_template([])
    with pytest.raises(Exception, match="conversation is empty"):  # one empty chat in a batch, from the template
        processor.apply_chat_template([[{"role": "user", "content": "Hi"}], []])
    for kwargs, message in [
        (dict(text=""), "Prompt 0 is empty"),
        (dict(text=["Hi", " \n"]), "Prompt 1 is empty"),
        (dict(text=[]), "empty list"),
        (dict(images=[]), "`images` is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            processor(**kwargs)
    # An image with no question is a prompt (the image alone).
    assert processor(images=image, text="")["input_ids"][0].count(IMAGE_ID) == 577


def test_padding_to_a_max_length_shorter_than_a_prompt_is_refused(processor, image):
    rows = processor(images=[[image], []], text=[QUESTION, "Hi"], padding="max_length", max_length=620)
    assert [len(row) for row in rows["input_ids"]] == [620, 620]
    length = len(processor(images=image, text=QUESTION)["input_ids"][0])
    with pytest.raises(ValueError, match=f"Prompt 0 has {length} tokens, more than max_length=600"):
        processor(images=[[image], []], text=[QUESTION, "Hi"], padding="max_length", max_length=600)
    with pytest.raises(ValueError, match="does not truncate"):
        processor(images=image, text=QUESTION, padding="max_length", max_length=590, truncation=True)


def test_tokenizer_options_it_cannot_honour_are_refused(processor):
    for option in ("return_offsets_mapping", "return_special_tokens_mask", "return_length", "return_token_type_ids"):
        with pytest.raises(ValueError, match=f"does not support `{option}`"):
            processor(text="Hi", **{option: True})


# ---------------------------------------------------------------- system messages


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def test_system_message_opens_the_first_user_turn(processor, image):
    system_parts = {"role": "system", "content": [{"type": "text", "text": "  You are a helpful assistant.\n\n"}]}
    chat = bus_chat(with_answer=True) + [{"role": "user", "content": "Sure?"}]
    folded = copy_chat(chat)
    folded[0]["content"][1]["text"] = SYSTEM["content"] + "\n" + QUESTION
    for position in ("first", "middle", "last"):
        expected = processor.apply_chat_template(folded, add_generation_prompt=True, image_position=position)
        for system in (SYSTEM, system_parts):
            got = processor.apply_chat_template([system] + chat, add_generation_prompt=True, image_position=position)
            assert got == expected
    assert processor.apply_chat_template([SYSTEM] + chat, image_position="last").startswith(
        "User: You are a helpful assistant.\nWhat color is the bus?\n" + SUFFIX + "\n<image>\n\n"
    )
    # The first user turn gets it wherever it is; an empty system message changes nothing.
    text_chat = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template([SYSTEM] + text_chat) == (
        "Assistant: Hello.\n\nUser: You are a helpful assistant.\nHi\n\n"
    )
    assert processor.apply_chat_template([{"role": "system", "content": " "}] + text_chat) == (
        processor.apply_chat_template(text_chat)
    )
    # Tokenized, with the image from the message.
    chat[0]["content"][0]["image"] = image
    assert processor.apply_chat_template([SYSTEM] + chat, tokenize=True)[0] == processor(
        images=image, text=processor.apply_chat_template(folded)
    )["input_ids"][0]


def copy_chat(chat: list[dict]) -> list[dict]:
    return [
        {**message, "content": [dict(part) for part in message["content"]]}
        if isinstance(message["content"], list) else dict(message)
        for message in chat
    ]


def test_conversations_the_model_cannot_take_are_refused(processor):
    image_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    for chat, message in [
        ([SYSTEM], "folded into the first user message, and this conversation has none"),
        ([SYSTEM, {"role": "assistant", "content": "Hi"}], "has none"),
        ([{"role": "user", "content": "Hi"}, SYSTEM], "not a 'system' message at position 1"),
        ([{"role": "tool", "content": "42"}], "not a 'tool' message at position 0"),
        ([{"role": "system", "content": [{"type": "image"}]}, image_turn], "system message holds text only"),
        ([image_turn, {"role": "assistant", "content": "A"}, image_turn], "one image per conversation"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], "one image per conversation"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "image"}]}], "in a user"),
        ([{"role": "user", "content": [{"type": "video"}]}], "not a 'video' part"),
        ([{"role": "user", "content": "Hi"}, {"role": "user", "content": ["Hi"]}], r"not 'Hi' \(message 1\)"),
        ([{"role": "user", "content": [{"type": "text"}]}], "text part needs a 'text' string"),
        ([{"role": "user"}], "needs a 'content'"),
        ([{"role": "user", "content": None}], "needs a 'content'"),
        ([{"role": "user", "content": 5}], "needs a 'content'"),
        ([{"content": "Hi"}], "needs a 'role'"),
    ]:
        with pytest.raises(Exception, match=message):
            processor.apply_chat_template(chat)


def test_folders_saved_with_the_earlier_template_get_the_current_one(tmp_path):
    AutoProcessor.register(VisualRWKVConfig, VisualRWKVProcessor, exist_ok=True)
    VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer()).save_pretrained(tmp_path)
    earlier = os.path.join(os.path.dirname(__file__), "fixtures", "chat_template_saved_before_system_messages.jinja")
    (tmp_path / "chat_template.jinja").write_text(open(earlier, encoding="utf-8").read(), encoding="utf-8")
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.apply_chat_template([SYSTEM, {"role": "user", "content": "Hi"}]) == (
        "User: You are a helpful assistant.\nHi\n\n"
    )
    # A template of the user's own is kept as it is.
    own = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(own, encoding="utf-8")
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == own


# ---------------------------------------------------------------- VisualRWKV-7: several images first, its ids, padding

V7_IMAGE_ID = 65535  # the original's placeholder id


def v7_processor(**kwargs) -> VisualRWKVProcessor:
    # CLIP's image processor keeps these fast: the prompt ids do not depend on it
    return VisualRWKVProcessor(
        tokenizer=RwkvWorldTokenizer(), image_position="first", num_image_tokens=1024, image_token_id=V7_IMAGE_ID,
        **kwargs,
    )


def test_v7_ids_for_one_image_are_the_spec_ids(reference, image):
    ids = v7_processor()(images=image, text="What color is the bus?")["input_ids"][0]
    tail = reference.encode("\nWhat color is the bus?\n\n")
    assert tail[0] == 11 and tail[-1] == 261
    assert ids == USER_PREFIX + [V7_IMAGE_ID] * 1024 + tail + GENERATION_PROMPT


def test_v7_ids_for_several_images_put_one_line_per_image_first(reference, image):
    """The original's `tokenize_with_image_token`: the prompt split at each "<image>", every piece tokenized alone."""
    processor = v7_processor()
    chat = [
        {"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "Same."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
    ]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert prompt == "User: <image>\n<image>\nCompare.\n\nAssistant: Same.\n\nUser: <image>\nAnd this?\n\nAssistant:"
    ids = processor(images=[image] * 3, text=prompt)["input_ids"][0]
    block = [V7_IMAGE_ID] * 1024
    first_turn = USER_PREFIX + block + reference.encode("\n") + block + reference.encode("\nCompare.\n\n")
    assert ids == (
        first_turn + reference.encode("Assistant: Same.\n\n") + USER_PREFIX + block
        + reference.encode("\nAnd this?\n\n") + GENERATION_PROMPT
    )
    # a plain question with several images is the one-turn chat
    plain = processor(images=[image, image], text="Compare.", return_tensors="pt")
    assert plain["input_ids"][0].tolist() == first_turn + GENERATION_PROMPT
    assert plain["pixel_values"].shape == (2, 3, 336, 336)


def test_v7_template_matches_the_original_rules_on_random_conversations():
    """Each user turn's k images become k lines "<image>" at its start, then the text (VisualRWKV-v7/v7.00's
    dataset.py: markers removed, the image lines prepended)."""
    processor, rng = v7_processor(), random.Random(1)
    pieces = ["a", "b c", " ", "\n", "\n", "é", "?", "x\ny", "<image>", "<image>"]

    def original(role, text):
        images = text.count("<image>") if role == "user" else 0
        text = re.sub(r"\n(\s*\n)+", "\n", text.replace("<image>", "").strip())
        return ("\n".join(["<image>"] * images) + "\n" + text).strip() if images else text

    for _ in range(200):
        rendered, chat = "", []
        for turn in range(rng.randint(1, 5)):
            role = "user" if turn % 2 == 0 else "assistant"
            text = "".join(rng.choice(pieces if role == "user" else pieces[:-2]) for _ in range(rng.randint(0, 8)))
            # the images as parts, anywhere around the text (parts of one message are joined by "\n")
            parts = [{"type": "image"}] * text.count("<image>")
            parts.append({"type": "text", "text": text.replace("<image>", "")})
            chat.append({"role": role, "content": rng.sample(parts, len(parts))})
            formatted = original(role, text)
            speaker = "User" if role == "user" else "Assistant"
            rendered += f"{speaker}: {formatted}\n\n" if formatted else f"{speaker}:"
        assert processor.apply_chat_template(chat) == rendered


def test_images_go_to_the_prompts_by_their_markers(image):
    processor = v7_processor()
    texts = ["<image><image> Compare.", "Hi", "<image>What?"]
    by_markers = processor(images=[image] * 3, text=texts, padding=True)
    nested = processor(images=[[image, image], [], [image]], text=texts, padding=True)
    assert by_markers["input_ids"] == nested["input_ids"]
    assert [row.count(V7_IMAGE_ID) for row in nested["input_ids"]] == [2048, 0, 1024]
    with pytest.raises(ValueError, match="Got 2 images for 3 prompts, which hold 3 '<image>' markers"):
        processor(images=[image] * 2, text=texts)


def test_image_token_id_defaults_to_the_tokenizers_and_is_saved(tmp_path, image):
    assert VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer()).image_token_id == IMAGE_ID
    v7_processor(prompt_pad_multiple=16).save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.image_token_id, loaded.prompt_pad_multiple, loaded.image_position) == (V7_IMAGE_ID, 16, "first")
    assert loaded(images=image, text="Hi")["input_ids"][0].count(V7_IMAGE_ID) == 1024
    for bad, message in ((-1, "`image_token_id` must be a non-negative token id"), ("x", "non-negative")):
        with pytest.raises(ValueError, match=message):
            VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), image_token_id=bad)


@pytest.mark.parametrize("multiple", [16, 7])
def test_prompt_pad_multiple_prepends_turn_ends_per_row(image, multiple):
    plain, padded = v7_processor(), v7_processor(prompt_pad_multiple=multiple)
    texts = ["Hi", "What color is the bus?", "Describe it in a few more words, please."]
    for text, images in zip(texts, ([], [image], [image, image])):
        ids = plain(images=images or None, text=text)["input_ids"][0]
        pad = (multiple - len(ids) % multiple) % multiple
        assert padded(images=images or None, text=text)["input_ids"][0] == [261] * pad + ids
    # in a batch, each row is padded by its own length, as real tokens, then the batch is left-padded as usual
    batch = padded(images=[[], [image]], text=texts[:2], padding=True)
    for row, mask, text, images in zip(batch["input_ids"], batch["attention_mask"], texts, ([], [image])):
        alone = padded(images=images or None, text=text)["input_ids"][0]
        assert len(alone) % multiple == 0
        assert [token for token, keep in zip(row, mask) if keep] == alone
    # apply_chat_template tokenizes through the same path; the training collators' turns stay unpadded
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    templated = padded.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert templated["input_ids"][0] == padded(images=image, text="Hi")["input_ids"][0]
    prompt = padded.apply_chat_template(chat, add_generation_prompt=True)
    assert sum(padded.tokenize_turns(prompt), []) == plain(images=image, text="Hi")["input_ids"][0]


def test_prompt_pad_multiple_is_refused_unless_a_non_negative_integer():
    for bad in (-16, 1.5, "16"):
        with pytest.raises(ValueError, match="`prompt_pad_multiple` must be 0 \\(no padding\\) or a positive integer"):
            v7_processor(prompt_pad_multiple=bad)
