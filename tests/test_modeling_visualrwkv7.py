"""VisualRWKV-7 (v0700): the three-encoder backbone, the input-gated MLP projector and an RWKV-7 language model
(modeling_visualrwkv.py with an `Rwkv7Config` text config), several images per prompt, and the behaviours every family
keeps (padded batches, cache reuse, pipeline, LoRA presets, remote code, bad inputs). Tiny towers on the real 448 /
1024 px inputs: the vision tower is the slow part, so one model is shared and each image is encoded once
(`features`)."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer, pipeline
from transformers.modeling_outputs import BaseModelOutputWithPooling

from visualrwkv_hf import (
    Rwkv7Model,
    RwkvWorldTokenizer,
    VisualRWKVConfig,
    VisualRWKVForConditionalGeneration,
    VisualRWKVProcessor,
    freeze_for_training,
    lora_config,
)
from visualrwkv_hf.image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor

import test_modeling_rwkv6 as text_model_tests
from test_modeling_sam_dino_siglip import TINY_VISION_CONFIG
from test_modeling_visualrwkv_hd import random_image, remote_code_run_equals_the_package

IMAGE_ID = 65535  # the original's placeholder id
TOKENS_PER_IMAGE = 1024
TEXT = {"model_type": "visualrwkv_rwkv7", "hidden_size": 32, "num_hidden_layers": 2, "head_size": 8,
        "wkv_chunk_size": 16}
QUESTIONS = ("Compare them.", "Describe the whole picture, please.")

greedy = text_model_tests.greedy


def assert_same_generation(reused, fresh):
    text_model_tests.assert_same_generation(reused, fresh, tol=1e-4)


def tiny_config(**overrides) -> VisualRWKVConfig:
    vision = {"model_type": "visualrwkv_sam_dino_siglip"}
    vision |= {f"{name}_config": kwargs for name, kwargs in TINY_VISION_CONFIG.items()}
    settings = dict(
        vision_config=vision, text_config=TEXT, projector_type="input_gated_mlp", scan_mode="unidirectional",
        image_position="first", image_token_id=IMAGE_ID,
    )
    return VisualRWKVConfig(**settings | overrides)


def tiny_model(seed: int = 0, **overrides) -> VisualRWKVForConditionalGeneration:
    torch.manual_seed(seed)
    model = VisualRWKVForConditionalGeneration(tiny_config(**overrides)).eval()
    with torch.no_grad():
        # visible image features (the projector's default init is small) and data-dependent LoRAs (x070 starts them
        # at zero), so that image content and token order really matter
        for parameter in model.model.multi_modal_projector.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.5)
        for block in model.model.language_model.blocks:
            for parameter in (block.attention.w1, block.attention.a1, block.attention.g1):
                parameter.normal_(0, 0.3)
    return model


def tiny_processor(**kwargs) -> VisualRWKVProcessor:
    return VisualRWKVProcessor(
        image_processor=SamDinoSiglipImageProcessor(), tokenizer=RwkvWorldTokenizer(),
        num_image_tokens=TOKENS_PER_IMAGE, image_position="first", image_token_id=IMAGE_ID, **kwargs,
    )


def chat(seeds, question) -> list[dict]:
    content = [{"type": "image", "image": random_image(seed)} for seed in seeds]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def prompt_ids(processor, num_images: int, text: str) -> torch.LongTensor:
    """(1, seq) ids of a user turn with `num_images` images first (the processor's tokenization, no pixels made)."""
    prompt = "User: " + "<image>\n" * num_images + f"{text}\n\nAssistant:"
    return torch.tensor([sum(processor.tokenize_turns(prompt, has_image=True), [])])


@pytest.fixture(scope="module")
def v7():
    return tiny_model(), tiny_processor()


@pytest.fixture(scope="module")
def vision_outputs(v7):
    """`get_image_features` of `random_image(seed)`, computed once per seed."""
    model, processor = v7
    outputs = {}

    def of(seed: int) -> BaseModelOutputWithPooling:
        if seed not in outputs:
            pixels = processor.image_processor([random_image(seed)], return_tensors="pt")
            with torch.no_grad():
                outputs[seed] = model.get_image_features(**pixels, return_dict=True)
        return outputs[seed]

    return of


@pytest.fixture(scope="module")
def features(vision_outputs):
    """`mm_encoder_outputs["image"]` for the images of the given seeds, in order."""
    return lambda *seeds: BaseModelOutputWithPooling(
        pooler_output=torch.cat([vision_outputs(seed).pooler_output for seed in seeds])
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory, v7) -> Path:
    folder = tmp_path_factory.mktemp("v7")
    model, processor = v7
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- the model


@torch.no_grad()
def test_the_language_model_is_rwkv7_reading_every_image_in_order(v7, features):
    model, processor = v7
    assert type(model.model.language_model) is Rwkv7Model
    assert {"Rwkv6Block", "Rwkv7Block"} <= set(model._no_split_modules)
    ids = prompt_ids(processor, 2, QUESTIONS[0])
    assert int((ids == IMAGE_ID).sum()) == 2 * TOKENS_PER_IMAGE
    hidden = model.model(ids, mm_encoder_outputs={"image": features(1, 2)}).last_hidden_state
    # Oracle: the embeddings with each image's features written over its own span, through RWKV-7 as it is.
    embeds = model.get_input_embeddings()(ids)
    starts = [int(start) for start in torch.nonzero(ids[0] == IMAGE_ID).flatten()[::TOKENS_PER_IMAGE]]
    for start, seed in zip(starts, (1, 2)):
        embeds[0, start : start + TOKENS_PER_IMAGE] = features(seed).pooler_output[0]
    expected = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    # the images are told apart: swapped, the text after them reads something else
    swapped = model.model(ids, mm_encoder_outputs={"image": features(2, 1)}).last_hidden_state
    assert (swapped[0, -5:] - hidden[0, -5:]).abs().max() > 1e-3


@torch.no_grad()
def test_grid_pooling_is_adaptive_average_pooling_of_the_32x32_map_before_the_projector(v7, vision_outputs):
    model, processor = v7
    pooled = tiny_model(grid_size=12)  # 144 tokens: windows that overlap, as nn.AdaptiveAvgPool2d(12)
    pooled.load_state_dict(model.state_dict())
    pixels = processor.image_processor([random_image(1)], return_tensors="pt")
    features = pooled.get_image_features(**pixels).pooler_output
    feature_map = vision_outputs(1).last_hidden_state  # (1, 1024, 3 widths), row-major 32 x 32
    grid = feature_map.transpose(1, 2).unflatten(2, (32, 32))
    expected = model.model.multi_modal_projector(nn.AdaptiveAvgPool2d(12)(grid).flatten(2).transpose(1, 2))
    assert features.shape == (1, 144, 32) and pooled.config.num_image_tokens == 144
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padded_batch_with_different_image_counts_equals_each_alone(v7, features):
    model, processor = v7
    rows = [((3, 4), QUESTIONS[0]), ((), QUESTIONS[1]), ((5,), QUESTIONS[1])]
    batch = processor(
        images=[[random_image(seed) for seed in seeds] for seeds, _ in rows], text=[q for _, q in rows],
        padding=True, return_tensors="pt",
    )
    assert batch["pixel_values"].shape[0] == batch["high_res_pixel_values"].shape[0] == 3
    outputs = model.model(**batch)
    for row, (seeds, question) in enumerate(rows):
        alone = processor(images=[random_image(seed) for seed in seeds] or None, text=question, return_tensors="pt")
        mm = {"mm_encoder_outputs": {"image": features(*seeds)}} if seeds else {}
        expected = model.model(input_ids=alone["input_ids"], **mm).last_hidden_state[0]
        torch.testing.assert_close(outputs.last_hidden_state[row, -len(expected) :], expected, rtol=1e-4,
                                   atol=1e-4)


@torch.no_grad()
def test_greedy_sampling_and_streaming_with_the_cache_equal_recomputing(v7, features, capsys):
    model, processor = v7
    inputs = {"input_ids": prompt_ids(processor, 2, QUESTIONS[0])}
    kwargs = dict(mm_encoder_outputs={"image": features(1, 2)}, max_new_tokens=3, eos_token_id=None)
    cached = greedy(model, inputs["input_ids"], **kwargs)
    assert_same_generation(cached, greedy(model, inputs["input_ids"], use_cache=False, **kwargs))
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        sampled.append(model.generate(inputs["input_ids"], do_sample=True, top_k=0, use_cache=use_cache, **kwargs))
    assert torch.equal(*sampled)
    capsys.readouterr()
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True)
    model.generate(inputs["input_ids"], streamer=streamer, do_sample=False, **kwargs)
    new_ids = cached.sequences[0, inputs["input_ids"].shape[1] :]
    assert capsys.readouterr().out == processor.tokenizer.decode(new_ids) + "\n"


@torch.no_grad()
def test_beam_search_over_a_padded_batch_equals_each_prompt_alone(v7, features):
    model, processor = v7
    rows = [((1, 2), QUESTIONS[0]), ((3,), QUESTIONS[1])]
    batch = processor(images=[[random_image(s) for s in seeds] for seeds, _ in rows], text=[q for _, q in rows],
                      padding=True, return_tensors="pt")
    beams = dict(num_beams=2, max_new_tokens=3, do_sample=False, eos_token_id=None)
    together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              mm_encoder_outputs={"image": features(1, 2, 3)}, **beams)
    for row, (seeds, question) in enumerate(rows):
        alone = processor(images=[random_image(s) for s in seeds], text=question, return_tensors="pt")["input_ids"]
        expected = model.generate(input_ids=alone, mm_encoder_outputs={"image": features(*seeds)}, **beams)
        assert torch.equal(together[row, -expected.shape[1] :], expected[0])


@torch.no_grad()
@pytest.mark.parametrize("pass_seen_images", [True, False])
def test_a_follow_up_turn_from_the_cache_equals_recomputing(v7, features, pass_seen_images):
    """Turn 1 shows two images, turn 2 a third: continuing turn 1's cache, the images already in it are dropped
    (or need not be passed), and the answer is the full recomputation's."""
    model, processor = v7
    out = greedy(model, prompt_ids(processor, 2, QUESTIONS[0]), mm_encoder_outputs={"image": features(1, 2)},
                 max_new_tokens=3, eos_token_id=None)
    follow_up = prompt_ids(processor, 1, QUESTIONS[1])
    conversation = torch.cat([out.sequences, torch.tensor([[261]]), follow_up], 1)
    seeds = (1, 2, 3) if pass_seen_images else (3,)
    reused = greedy(model, conversation, cache=out.cache, mm_encoder_outputs={"image": features(*seeds)},
                    max_new_tokens=3, eos_token_id=None)
    fresh = greedy(model, conversation, mm_encoder_outputs={"image": features(1, 2, 3)}, max_new_tokens=3,
                   eos_token_id=None)
    assert_same_generation(reused, fresh)


# ---------------------------------------------------------------------------------------------- prompt padding


@torch.no_grad()
def test_prompt_padding_prepends_turn_ends_the_model_reads(v7, features):
    model, processor = v7
    padded_processor = tiny_processor(prompt_pad_multiple=16)
    image = random_image(1)
    plain = processor(images=image, text=QUESTIONS[1], return_tensors="pt")
    padded = padded_processor(images=image, text=QUESTIONS[1], return_tensors="pt")
    pad = (16 - plain["input_ids"].shape[1] % 16) % 16
    assert pad and padded["input_ids"].shape[1] == plain["input_ids"].shape[1] + pad
    assert padded["input_ids"][0, :pad].tolist() == [261] * pad and padded["attention_mask"].all()
    assert torch.equal(padded["input_ids"][:, pad:], plain["input_ids"])
    # The pad is context the model reads, as the original's inference: not padding, which would change nothing.
    # (Text only: this tiny random model's state forgets everything before a 1024-token image span.)
    text = padded_processor(text=QUESTIONS[1], return_tensors="pt")
    unpadded = processor(text=QUESTIONS[1], return_tensors="pt")["input_ids"]
    text_pad = text["input_ids"].shape[1] - unpadded.shape[1]
    assert text_pad and text["attention_mask"].all()

    def last_logits(attention_mask):
        return model(input_ids=text["input_ids"], attention_mask=attention_mask, logits_to_keep=1).logits[0, -1]

    as_padding = text["attention_mask"].clone()
    as_padding[:, :text_pad] = 0
    read, unread = last_logits(text["attention_mask"]), last_logits(as_padding)
    torch.testing.assert_close(unread, model(input_ids=unpadded, logits_to_keep=1).logits[0, -1])
    assert (read - unread).abs().max() / unread.abs().max() > 1e-5


def test_pipeline_with_prompt_padding_answers_as_generate(folder, v7):
    model, _ = v7
    padded_processor = tiny_processor(prompt_pad_multiple=16)
    pipe = pipeline("image-text-to-text", model=model, processor=padded_processor)
    messages = chat((1,), QUESTIONS[0])
    output = pipe(text=messages, max_new_tokens=3)
    inputs = padded_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] % 16 == 0
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = padded_processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0]
    assert output[0]["generated_text"][-1]["content"] == expected


# ---------------------------------------------------------------------------------------------- integration


def test_pipeline_answers_a_two_image_chat_from_a_saved_folder(folder):
    pipe = pipeline("image-text-to-text", model=str(folder))
    assert pipe.processor.image_token_id == IMAGE_ID and pipe.model.config.text_config.model_type == TEXT[
        "model_type"]
    messages = chat((1, 2), QUESTIONS[0])
    output = pipe(text=messages, max_new_tokens=3)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert (processor.image_token_id, processor.image_position) == (IMAGE_ID, "first")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 2
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    expected = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0]
    assert output[0]["generated_text"][-1]["content"] == expected


def test_lora_presets_adapt_every_rwkv7_and_projector_linear_and_no_tower():
    from peft import get_peft_model

    model = tiny_model()
    language_linears = {name for name, module in model.model.language_model.named_modules()
                        if isinstance(module, nn.Linear)}
    peft_model = get_peft_model(model, lora_config("all", r=2))
    adapted = {name.split(".base_layer")[0] for name, _ in peft_model.named_modules() if name.endswith("base_layer")}
    prefix = "base_model.model.model."
    assert {name[len(prefix + "language_model.") :] for name in adapted if "language_model" in name} == (
        language_linears
    )
    assert {name[len(prefix) :] for name in adapted if "language_model" not in name} == {
        "multi_modal_projector.gate", "multi_modal_projector.out_proj"
    }
    assert not any("vision_tower" in name and "lora_" in name for name, _ in peft_model.named_parameters())


def test_training_freezes_the_towers_and_trains_the_projector_and_rwkv7(v7):
    model, processor = freeze_for_training(tiny_model()), v7[1]
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    inputs = processor(images=random_image(1), text=QUESTIONS[0], return_tensors="pt")
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_ID, -100)
    model(**inputs, labels=labels).loss.backward()
    assert model.model.multi_modal_projector.gate.weight.grad.abs().sum() > 0
    assert model.model.language_model.blocks[0].attention.w1.grad.abs().sum() > 0


def test_remote_code_folder_loads_without_the_package(folder, tmp_path, monkeypatch, v7):
    written = remote_code_run_equals_the_package(folder, v7[1], QUESTIONS[0], tmp_path, monkeypatch)
    assert {"modeling_rwkv7.py", "configuration_rwkv7.py", "wkv7.py"} <= set(written)


# ---------------------------------------------------------------------------------------------- bad inputs


@torch.no_grad()
def test_bad_image_spans_and_counts_are_refused(v7, features):
    model, processor = v7
    ids = prompt_ids(processor, 2, QUESTIONS[0])
    with pytest.raises(ValueError, match="Got 1 images for 1 rows with image placeholders, which hold 2 image spans"):
        model(ids, mm_encoder_outputs={"image": features(1)})
    with pytest.raises(ValueError, match="Got 3 images for 1 rows with image placeholders, which hold 2 image spans"):
        model(ids, mm_encoder_outputs={"image": features(1, 2, 3)})
    second_image = int(torch.nonzero(ids[0] == IMAGE_ID)[TOKENS_PER_IMAGE])
    # a prefill that stops inside the second image
    with pytest.raises(ValueError, match="each image needs exactly 1024 contiguous placeholders, all in the same call"):
        model(ids[:, : second_image + 10], mm_encoder_outputs={"image": features(1, 2)}, use_cache=True)
    # the rest of the second image's span after a cache that holds its start
    cache = model(ids[:, :second_image], mm_encoder_outputs={"image": features(1)}, use_cache=True).cache
    with pytest.raises(ValueError, match=r"Row 0 holds 1014 image placeholder tokens \(positions 0 to 1013\)"):
        model(ids[:, second_image + 10 :], mm_encoder_outputs={"image": features(2)}, cache=cache)


def test_several_images_need_image_position_first(v7):
    processor = v7[1]
    two = [random_image(1), random_image(2)]
    with pytest.raises(ValueError, match="with image_position 'middle' VisualRWKV takes one image a prompt"):
        processor(images=two, text=QUESTIONS[0], image_position="middle")
    with pytest.raises(ValueError, match="With image_position 'last', VisualRWKV takes one image per conversation; "
                                         "several images go first"):
        processor.apply_chat_template(chat((1, 2), QUESTIONS[0]), image_position="last")
    with pytest.raises(ValueError, match="Prompt 0 has 2 images but 1 '<image>' marker"):
        processor(images=two, text=f"User: <image>\n{QUESTIONS[0]}\n\nAssistant:")


@torch.no_grad()
def test_a_tiny_image_is_resized_not_refused(v7):
    model, processor = v7
    inputs = processor(images=[random_image(9, size=(1, 1)), random_image(9, size=(3, 2000))], text=QUESTIONS[0],
                       return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 1, 3, 448, 448)
    assert inputs["high_res_pixel_values"].shape == (2, 1, 3, 1024, 1024)
    assert torch.isfinite(model(**inputs, logits_to_keep=1).logits).all()


@torch.no_grad()
def test_several_images_per_row_need_unidirectional_scanning():
    """The rule is the scan mode's, whatever the language model: a tiny RWKV-6 + CLIP model reads two images in a
    row in order when it does not scan, and refuses them when it scans."""
    from test_modeling_visualrwkv import images, prompt
    from test_modeling_visualrwkv import tiny_model as tiny_rwkv6_model

    two_images = torch.cat([prompt(2, 1, 17, seed=1), prompt(0, 3, 17, seed=2)], 1)
    pixel_values = images(2)
    model = tiny_rwkv6_model(scan_mode="unidirectional")
    features = model.get_image_features(pixel_values).pooler_output
    embeds = model.get_input_embeddings()(two_images)
    embeds[two_images == model.config.image_token_id] = features.reshape(-1, features.shape[-1])
    torch.testing.assert_close(
        model.model(two_images, pixel_values=pixel_values).last_hidden_state,
        model.model.language_model(inputs_embeds=embeds).last_hidden_state,
    )
    with pytest.raises(ValueError, match="Row 0 holds 2 images, but `scan_mode='bidirectional'` reorders one image "
                                         "span per row"):
        tiny_rwkv6_model(scan_mode="bidirectional")(two_images, pixel_values=pixel_values)
