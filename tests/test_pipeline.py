"""`pipeline("image-text-to-text")` end to end on a tiny random VisualRWKV folder: chat messages and plain calls give
what `generate()` plus the processor's post-processing gives, streaming, padded batches, images as paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, TextStreamer, pipeline
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from visualrwkv_hf import (
    RwkvWorldTokenizer,
    VisualRWKVConfig,
    VisualRWKVForConditionalGeneration,
    VisualRWKVProcessor,
)

IMAGE_SIZE = 28  # the tiny CLIP: 4 x 4 patches of 7 pixels, 17 image tokens with the cls token
MAX_NEW_TOKENS = 8
QUESTIONS = ("What color?", "Describe the whole picture in a few more words, please.")


def save_tiny_visualrwkv(folder: Path, seed: int = 0) -> Path:
    """A random VisualRWKV (tiny CLIP, 4 RWKV-6 blocks of width 32, the World vocabulary) with a processor whose
    image processor matches the tiny CLIP, saved to `folder`."""
    config = VisualRWKVConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=7,
        ),
        text_config=dict(
            hidden_size=32, num_hidden_layers=4, head_size=8, time_mix_extra_dim=4, time_decay_extra_dim=6,
            initializer_range=0.3, wkv_chunk_size=4,
        ),
    )
    torch.manual_seed(seed)
    model = VisualRWKVForConditionalGeneration(config).eval()
    # Random data-dependent LoRAs and a strong projector, so that the image and the token order change the answer.
    with torch.no_grad():
        for block in model.model.language_model.blocks:
            for weight in (block.attention.time_maa_w1, block.attention.time_decay_w1):
                weight.normal_(0, 0.3)
        model.model.multi_modal_projector.linear.weight.normal_(0, 0.3)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = VisualRWKVProcessor(
        image_processor=image_processor, tokenizer=RwkvWorldTokenizer(), num_image_tokens=config.num_image_tokens
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def random_image(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def chat(image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def chat_answer(output: list[dict]) -> str:
    """The assistant message the pipeline appended to a chat."""
    (result,) = output
    message = result["generated_text"][-1]
    assert message["role"] == "assistant"
    return message["content"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_visualrwkv(tmp_path_factory.mktemp("tiny-visualrwkv"))


@pytest.fixture(scope="module")
def pipe(folder):
    return pipeline("image-text-to-text", model=str(folder))


@pytest.fixture(scope="module")
def model(folder):
    return VisualRWKVForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [random_image(0), random_image(1, size=(64, 30))]


def generate_new_ids(model, processor, messages, **template_kwargs) -> torch.Tensor:
    """Greedy `generate()` on the chat's prompt; the new token ids, (1, new)."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        **template_kwargs,
    )
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return generated[:, inputs["input_ids"].shape[1]:]


def generate_answer(model, processor, messages, **template_kwargs) -> str:
    new_ids = generate_new_ids(model, processor, messages, **template_kwargs)
    return processor.post_process_image_text_to_text(new_ids)[0]


def test_pipeline_loads_the_package_classes(pipe):
    assert type(pipe.model) is VisualRWKVForConditionalGeneration
    assert type(pipe.processor) is VisualRWKVProcessor


def test_chat_answer_equals_generate(pipe, model, processor, images):
    for image, question in zip(images, QUESTIONS):
        messages = chat(image, question)
        output = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)
        assert output[0]["generated_text"][:-1] == messages
        assert chat_answer(output) == generate_answer(model, processor, messages)
    # The tiny model really reads the image: another image, same question, another answer.
    assert chat_answer(pipe(text=chat(images[1], QUESTIONS[0]), max_new_tokens=MAX_NEW_TOKENS)) != chat_answer(
        pipe(text=chat(images[0], QUESTIONS[0]), max_new_tokens=MAX_NEW_TOKENS)
    )


def test_plain_image_and_text_call_equals_the_chat(pipe, images):
    image, question = images[0], QUESTIONS[0]
    answer = chat_answer(pipe(text=chat(image, question), max_new_tokens=MAX_NEW_TOKENS))
    (new_text,) = pipe(images=image, text=question, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert new_text == {"input_text": question, "generated_text": answer}
    (full_text,) = pipe(images=image, text=question, max_new_tokens=MAX_NEW_TOKENS)
    assert full_text["generated_text"] == question + answer


def test_image_position_per_call(pipe, model, processor, images):
    messages = chat(images[0], QUESTIONS[1])
    answers = {}
    for position in ("first", "middle", "last"):
        expected = generate_answer(model, processor, messages, image_position=position)
        answers[position] = chat_answer(pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, image_position=position))
        assert answers[position] == expected
        (plain,) = pipe(
            images=images[0], text=QUESTIONS[1], max_new_tokens=MAX_NEW_TOKENS, return_full_text=False,
            image_position=position,
        )
        assert plain["generated_text"] == expected
    assert len(set(answers.values())) > 1  # the prompts differ, and so do the answers


def test_text_only_chat(pipe, model, processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}]
    assert chat_answer(pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)) == generate_answer(
        model, processor, messages
    )


def test_streaming_prints_the_answer(pipe, model, processor, images, capsys):
    messages = chat(images[0], QUESTIONS[0])
    capsys.readouterr()
    streamer = TextStreamer(pipe.processor.tokenizer, skip_prompt=True)
    answer = chat_answer(pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, generate_kwargs={"streamer": streamer}))
    printed = capsys.readouterr().out
    new_ids = generate_new_ids(model, processor, messages)
    # The streamer prints every new token (the turn end "\n\n" included, when generated), then a newline.
    assert printed == processor.tokenizer.decode(new_ids[0]) + "\n"
    assert printed.split("\n\n", 1)[0].strip() == answer


def test_padded_batch_gives_what_each_prompt_gives_alone(pipe, images):
    lengths = [len(pipe.processor(images=image, text=text)["input_ids"][0]) for image, text in zip(images, QUESTIONS)]
    assert lengths[0] != lengths[1]  # so the batch is padded
    chats = [chat(image, question) for image, question in zip(images, QUESTIONS)]
    alone = [chat_answer(pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)) for messages in chats]
    batched = pipe(text=chats, max_new_tokens=MAX_NEW_TOKENS, batch_size=2)
    assert [chat_answer(output) for output in batched] == alone

    plain = pipe(images=images, text=list(QUESTIONS), max_new_tokens=MAX_NEW_TOKENS, batch_size=2,
                 return_full_text=False)
    assert [output["generated_text"] for output in plain] == alone


def test_image_as_a_file_path_or_a_pil_image(pipe, images, tmp_path):
    path = tmp_path / "image.png"  # lossless, so the file holds exactly the PIL image's pixels
    images[0].save(path)
    from_pil = chat_answer(pipe(text=chat(images[0], QUESTIONS[0]), max_new_tokens=MAX_NEW_TOKENS))
    assert chat_answer(pipe(text=chat(str(path), QUESTIONS[0]), max_new_tokens=MAX_NEW_TOKENS)) == from_pil
    (plain,) = pipe(images=str(path), text=QUESTIONS[0], max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert plain["generated_text"] == from_pil


def test_processor_pads_on_the_left_unless_told_otherwise(processor):
    # Generation appends after the last column: only left padding keeps each row's new tokens next to its prompt.
    assert processor.tokenizer.padding_side == "left"
    assert VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer()).tokenizer.padding_side == "left"
    explicit = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(padding_side="right"))
    assert explicit.tokenizer.padding_side == "right"


def test_system_message_is_folded_into_the_first_user_turn(pipe, model, processor, images):
    system = {"role": "system", "content": "You are a helpful assistant."}
    messages = chat(images[0], QUESTIONS[0])
    folded = chat(images[0], system["content"] + "\n" + QUESTIONS[0])
    answer = chat_answer(pipe(text=[system] + messages, max_new_tokens=MAX_NEW_TOKENS))
    assert answer == generate_answer(model, processor, folded)


def test_image_written_in_a_text_only_prompt_is_text(pipe, model, processor):
    question = "What does <image> mean in HTML?"
    # The oracle: the prompt's turns tokenized as plain text, "<image>" included.
    encode = processor.tokenizer.encode
    input_ids = torch.tensor([encode(f"User: {question}\n\n") + encode("Assistant:")])
    assert processor.image_token_id not in input_ids
    generated = model.generate(input_ids=input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = processor.post_process_image_text_to_text(generated[:, input_ids.shape[1]:])[0]
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    assert chat_answer(pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)) == expected
    (plain,) = pipe(text=question, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert plain["generated_text"] == expected


def test_a_photo_file_is_read_upright(pipe, images, tmp_path):
    path = tmp_path / "turned.png"  # stored upside down, with the EXIF tag that says so, as cameras do
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(np.asarray(images[0])[::-1, ::-1]).save(path, exif=exif)
    upright = chat_answer(pipe(text=chat(images[0], QUESTIONS[0]), max_new_tokens=MAX_NEW_TOKENS))
    assert chat_answer(pipe(text=chat(str(path), QUESTIONS[0]), max_new_tokens=MAX_NEW_TOKENS)) == upright
    (plain,) = pipe(images=str(path), text=QUESTIONS[0], max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert plain["generated_text"] == upright
