import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    CLIPVisionModel,
    SiglipVisionModel,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)

from visualrwkv_hf import (
    Rwkv6Config,
    VisualRWKVConfig,
    VisualRWKVForConditionalGeneration,
    VisualRWKVModel,
)
from visualrwkv_hf.scanning import SCAN_MODES

import test_modeling_rwkv6 as text_model_tests

VOCAB = 97
IMAGE = 96  # the image placeholder id of the tiny vocabulary
NUM_LAYERS = 4


def vision_config(model_type="clip_vision_model", image_size=28, patch_size=7):
    return dict(
        model_type=model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size,
    )


def tiny_config(vision=None, **overrides):
    text = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=NUM_LAYERS, head_size=8, time_mix_extra_dim=4,
        time_decay_extra_dim=6, initializer_range=0.3, wkv_chunk_size=4, eos_token_id=None,
    )
    overrides = {"image_token_id": IMAGE, **overrides}
    return VisualRWKVConfig(vision_config=vision or vision_config(), text_config=text, **overrides)


def tiny_model(seed=0, vision=None, **overrides):
    torch.manual_seed(seed)
    model = VisualRWKVForConditionalGeneration(tiny_config(vision, **overrides)).eval()
    # Random data-dependent LoRAs and a strong projector, so token order and image content really matter.
    with torch.no_grad():
        for block in model.model.language_model.blocks:
            for p in (block.attention.time_maa_w1, block.attention.time_decay_w1):
                p.normal_(0, 0.3)
        model.model.multi_modal_projector.linear.weight.normal_(0, 0.3)
    return model


def images(n, size=28, seed=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt(before, after, num_image_tokens, seed=1):
    """Random text ids, `num_image_tokens` placeholders (none if 0), more random text: (1, seq)."""
    text = torch.randint(1, IMAGE, (before + after,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([text[:before], torch.full((num_image_tokens,), IMAGE), text[before:]])[None]


def reference_vision_features(model, pixel_values, model_class=CLIPVisionModel):
    """The selected hidden state from transformers' own vision model holding the same weights."""
    vision = model_class(model.config.vision_config).eval()
    vision.load_state_dict(model.model.vision_tower.state_dict())
    return vision(pixel_values, output_hidden_states=True)


# ---------------------------------------------------------------------------------------------- configuration


def test_defaults_reproduce_the_released_1b6_model():
    config = VisualRWKVConfig()
    vision = config.vision_config
    assert vision.model_type == "clip_vision_model"
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.patch_size, vision.image_size, vision.intermediate_size) == (14, 336, 4096)
    assert (vision.hidden_act, vision.projection_dim) == ("quick_gelu", 768)
    assert isinstance(config.text_config, Rwkv6Config)
    assert (config.text_config.num_hidden_layers, config.text_config.hidden_size) == (24, 2048)
    assert (config.image_token_id, config.vision_feature_layer, config.grid_size) == (65530, -1, -1)
    assert (config.scan_mode, config.image_position, config.projector_bias) == ("bidirectional", "middle", False)
    assert config.vision_has_cls_token is True
    assert config.patch_grid == config.image_grid == (24, 24)
    assert config.num_image_tokens == 577


@pytest.mark.parametrize(
    "grid_size, tokens", [(-1, 577), (12, 145), (8, 65), (6, 37), (4, 17), (3, 10), (2, 5), (0, 1), (1, 2)]
)
def test_image_token_counts(grid_size, tokens):
    assert VisualRWKVConfig(grid_size=grid_size).num_image_tokens == tokens


def test_config_round_trips_through_dict_and_auto_config(tmp_path):
    config = tiny_config(scan_mode="multidirectional", image_position="first", grid_size=2, projector_bias=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VisualRWKVConfig) and isinstance(loaded.text_config, Rwkv6Config)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert (loaded.scan_mode, loaded.image_position, loaded.grid_size, loaded.num_image_tokens) == (
        "multidirectional", "first", 2, 5,
    )


def test_siglip_vision_config_has_no_cls_token():
    config = tiny_config(vision_config("siglip_vision_model"))
    assert config.vision_has_cls_token is False and config.num_image_tokens == 16


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scan_mode="diagonal"), ValueError, "Unknown `scan_mode` 'diagonal'"),
        (dict(image_position="center"), ValueError, "Unknown `image_position` 'center'"),
        (dict(grid_size=3), ValueError, "does not divide the 4 x 4 patch grid"),
        (dict(grid_size=8), ValueError, "does not divide"),
        (dict(grid_size=-2), ValueError, "grid_size"),
        (dict(image_token_id=VOCAB), ValueError, "image_token_id"),
        (dict(vision_feature_layer=3), ValueError, "vision_feature_layer"),
        (dict(tie_word_embeddings=True), ValueError, "not tied"),
    ],
)
def test_invalid_configurations_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**kwargs)


def test_multidirectional_needs_a_square_grid():
    rectangular = vision_config(image_size=[28, 56])
    assert tiny_config(rectangular, scan_mode="bidirectional").image_grid == (4, 8)
    with pytest.raises(ValueError, match="square grid; this configuration gives a 4 x 8 grid"):
        tiny_config(rectangular, scan_mode="multidirectional")
    # Pooling with kernel 2 keeps it 2 x 4: still not square.
    with pytest.raises(ValueError, match="2 x 4 grid"):
        tiny_config(rectangular, scan_mode="multidirectional", grid_size=2)


def test_cls_only_needs_a_cls_token_and_unknown_encoders_must_say():
    with pytest.raises(ValueError, match="has none"):
        tiny_config(vision_config("siglip_vision_model"), grid_size=0)
    with pytest.raises(ValueError, match="vision_has_cls_token"):
        tiny_config(dict(model_type="vit", hidden_size=32, num_hidden_layers=2, image_size=28, patch_size=7))
    assert tiny_config(
        dict(model_type="vit", hidden_size=32, num_hidden_layers=2, image_size=28, patch_size=7),
        vision_has_cls_token=True,
    ).num_image_tokens == 17


# ---------------------------------------------------------------------------------------------- image features


@torch.no_grad()
def test_image_features_are_the_last_clip_layer_with_cls_last_then_projected():
    model = tiny_model()
    pixel_values = images(2)
    reference = reference_vision_features(model, pixel_values)
    last = reference.last_hidden_state  # CLIP: the encoder output, before post_layernorm
    expected = model.model.multi_modal_projector(torch.cat([last[:, 1:], last[:, :1]], dim=1))
    features = model.get_image_features(pixel_values).pooler_output
    assert features.shape == (2, 17, 32)
    torch.testing.assert_close(features, expected)
    # No post_layernorm: the features differ from what the post-layernormed output would give.
    post = reference.pooler_output  # post_layernorm(cls)
    assert not torch.allclose(model.model.multi_modal_projector(post), features[:, -1])


@torch.no_grad()
def test_siglip_features_skip_post_layernorm_and_have_no_cls():
    vision = vision_config("siglip_vision_model")
    model = tiny_model(vision=vision)
    pixel_values = images(2)
    reference = reference_vision_features(model, pixel_values, SiglipVisionModel)
    features = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(features, model.model.multi_modal_projector(reference.hidden_states[-1]))
    assert features.shape == (2, 16, 32)
    ids = prompt(2, 3, 16)
    assert model(ids, pixel_values=pixel_values[:1]).logits.shape == (1, 21, VOCAB)


@torch.no_grad()
@pytest.mark.parametrize("grid_size, tokens", [(-1, 65), (0, 1), (1, 2), (2, 5), (4, 17), (8, 65)])
def test_grid_pooling_matches_avg_pool2d(grid_size, tokens):
    vision = vision_config(image_size=56)  # an 8 x 8 patch grid
    model = tiny_model(vision=vision, grid_size=grid_size)
    pixel_values = images(2, size=56)
    last = reference_vision_features(model, pixel_values).last_hidden_state
    patch_grid = last[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
    if grid_size == -1:
        patches = last[:, 1:]
    elif grid_size == 0:
        patches = last[:, :0]
    else:
        patches = F.avg_pool2d(patch_grid, 8 // grid_size).flatten(2).transpose(1, 2)
    expected = model.model.multi_modal_projector(torch.cat([patches, last[:, :1]], dim=1))
    features = model.get_image_features(pixel_values).pooler_output
    assert features.shape == (2, tokens, 32) and model.config.num_image_tokens == tokens
    torch.testing.assert_close(features, expected)
    if grid_size == 1:
        torch.testing.assert_close(features[:, 0], model.model.multi_modal_projector(last[:, 1:].mean(1)))


def test_wrong_image_size_gets_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"must be \(images, channels, 28, 28\)"):
        model(prompt(2, 4, 17), pixel_values=images(1, size=35))


# ---------------------------------------------------------------------------------------------- scanning


def documented_patch_order(scan_mode, block_idx, side):
    """The paper's reading order of a side x side grid in block `block_idx`, written out independently."""
    row_major = [r * side + c for r in range(side) for c in range(side)]
    column_major = [r * side + c for c in range(side) for r in range(side)]
    if scan_mode == "unidirectional":
        return row_major
    if scan_mode == "bidirectional":
        return row_major if block_idx % 2 == 0 else row_major[::-1]
    return [row_major, row_major[::-1], column_major, column_major[::-1]][block_idx % 4]


def manual_scan_forward(model, ids, pixel_values):
    """Every block run by hand on the sequence with its patch span reordered, then restored; per-block outputs."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    mask = ids == IMAGE
    embeds[mask] = inner.get_image_features(pixel_values).pooler_output.reshape(-1, embeds.shape[-1])
    hidden, outputs = embeds, []
    for block_idx, block in enumerate(inner.language_model.blocks):
        permutation = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
        for row in range(ids.shape[0]):
            if mask[row].any():
                start = int(mask[row].nonzero()[0])
                order = documented_patch_order(model.config.scan_mode, block_idx, 4)
                permutation[row, start : start + 16] = start + torch.tensor(order)
        reordered = torch.stack([hidden[row, permutation[row]] for row in range(ids.shape[0])])
        block_output = block(reordered)
        hidden = torch.empty_like(hidden)
        for row in range(ids.shape[0]):
            hidden[row, permutation[row]] = block_output[row]
        outputs.append(hidden)
    logits = model.lm_head(inner.language_model.norm_out(hidden))
    return outputs, logits


@torch.no_grad()
@pytest.mark.parametrize("scan_mode", SCAN_MODES)
def test_each_block_reads_its_documented_order_and_restores_positions(scan_mode):
    model = tiny_model(scan_mode=scan_mode)
    # Two rows with their images at different offsets.
    ids = torch.cat([prompt(2, 6, 17, seed=1), prompt(6, 2, 17, seed=3)])
    pixel_values = images(2)
    out = model(ids, pixel_values=pixel_values, output_hidden_states=True, use_cache=False)
    expected_blocks, expected_logits = manual_scan_forward(model, ids, pixel_values)
    assert len(out.hidden_states) == NUM_LAYERS + 1
    for block_idx in range(NUM_LAYERS):
        torch.testing.assert_close(out.hidden_states[block_idx + 1], expected_blocks[block_idx])
    torch.testing.assert_close(out.logits, expected_logits)


@torch.no_grad()
def test_scan_modes_really_change_the_output():
    ids, pixel_values = prompt(2, 4, 17), images(1)
    logits = [tiny_model(scan_mode=mode)(ids, pixel_values=pixel_values).logits for mode in SCAN_MODES]
    for i in range(len(logits)):
        for j in range(i):
            # Same weights, different orders: the text after the image sees a different state.
            assert not torch.allclose(logits[i][:, -1], logits[j][:, -1], atol=1e-4)


# ---------------------------------------------------------------------------------------------- generation


@torch.no_grad()
@pytest.mark.parametrize("scan_mode", SCAN_MODES)
def test_cached_generate_equals_full_recompute(scan_mode):
    model = tiny_model(scan_mode=scan_mode)
    ids, pixel_values = prompt(3, 4, 17), images(1)
    cached = model.generate(
        ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    uncached = model.generate(ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    full = model(cached.sequences, pixel_values=pixel_values, use_cache=False).logits
    for step, step_logits in enumerate(cached.logits):
        torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_generate_never_produces_the_image_placeholder(tmp_path):
    model = tiny_model()
    # Make the placeholder the most likely next token everywhere.
    model.lm_head.register_forward_hook(lambda module, args, logits: logits.index_add(
        -1, torch.tensor([IMAGE]), torch.full((*logits.shape[:-1], 1), 100.0)
    ))
    ids, pixel_values = prompt(3, 4, 17), images(1)
    assert model(ids, pixel_values=pixel_values).logits[0, -1].argmax() == IMAGE
    generated = model.generate(ids, pixel_values=pixel_values, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 28) and not (generated[:, ids.shape[1] :] == IMAGE).any()
    model.save_pretrained(tmp_path)
    assert AutoModelForImageTextToText.from_pretrained(tmp_path).generation_config.suppress_tokens == [IMAGE]


@torch.no_grad()
def test_decode_after_prefill_equals_full_forward():
    model = tiny_model(scan_mode="multidirectional")
    ids, pixel_values = prompt(3, 9, 17), images(1)
    full = model(ids, pixel_values=pixel_values, use_cache=False).logits
    split = 3 + 17 + 2  # the prefill holds the whole image span
    out = model(ids[:, :split], pixel_values=pixel_values, use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(split, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def left_pad(rows):
    length = max(row.shape[1] for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - row.shape[1] :] = row[0]
        attention_mask[i, length - row.shape[1] :] = 1
    return ids, attention_mask


@torch.no_grad()
@pytest.mark.parametrize("scan_mode", ["bidirectional", "multidirectional"])
def test_padded_batch_generates_what_each_row_generates_alone(scan_mode):
    model = tiny_model(scan_mode=scan_mode)
    # Images at different offsets, and a text-only row in between.
    rows = [prompt(2, 5, 17, seed=1), prompt(4, 5, 0, seed=4), prompt(7, 3, 17, seed=5)]
    row_images = [images(1, seed=7), None, images(1, seed=8)]
    ids, attention_mask = left_pad(rows)
    batch = model.generate(
        ids, attention_mask=attention_mask, pixel_values=torch.cat([row_images[0], row_images[2]]),
        max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )
    for i, (row, pixel_values) in enumerate(zip(rows, row_images)):
        alone = model.generate(
            row, pixel_values=pixel_values, max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, row.shape[1] :])
        for batch_logits, alone_logits in zip(batch.logits, alone.logits):
            torch.testing.assert_close(batch_logits[i], alone_logits[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("scan_mode", ["bidirectional", "multidirectional"])
def test_padding_inside_and_after_image_rows_equals_each_row_alone(scan_mode):
    # Padding between text tokens before the image, between the image and the text, and on the right (the training
    # collators' side): every block reads its own order with the padding skipped by the token shifts.
    model = tiny_model(scan_mode=scan_mode)
    rows, row_images = [prompt(4, 5, 17, seed=1), prompt(2, 3, 17, seed=2)], images(2, seed=7)
    real = torch.ones(2, 30, dtype=torch.bool)
    real[0, [1, 2, 28, 29]] = False  # two pads after the first text token, two at the end
    real[1, [0, 20, 21, 22, 23, 24, 25, 29]] = False  # one pad first, six after the image, one at the end
    ids = torch.zeros(2, 30, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, real[i]] = row[0]
    batch = model(ids, attention_mask=real.long(), pixel_values=row_images)
    for i, row in enumerate(rows):
        alone = model(row, pixel_values=row_images[i : i + 1])
        torch.testing.assert_close(batch.logits[i, real[i]], alone.logits[0], rtol=1e-4, atol=1e-4)
        for padded_state, alone_state in zip(
            text_model_tests.row_states(batch.cache, i), text_model_tests.row_states(alone.cache, 0), strict=True
        ):
            torch.testing.assert_close(padded_state, alone_state, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_text_only_runs_the_language_model_alone():
    model = tiny_model()
    ids = torch.randint(1, IMAGE, (2, 8), generator=torch.Generator().manual_seed(3))
    out = model(ids)
    language_model = model.model.language_model
    expected = model.lm_head(language_model(ids, use_cache=False).last_hidden_state)
    torch.testing.assert_close(out.logits, expected)
    assert out.image_outputs is None
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 11)


@torch.no_grad()
def test_outputs_are_llava_style_multimodal_outputs():
    model = tiny_model()
    ids, pixel_values = prompt(2, 6, 17), images(1)
    out = model(ids, pixel_values=pixel_values)
    assert type(out) is MultimodalCausalLMOutputWithPast and out.cache is not None
    torch.testing.assert_close(out.image_outputs.pooler_output, model.get_image_features(pixel_values).pooler_output)
    base = model.model(ids, pixel_values=pixel_values)
    assert type(base) is MultimodalBaseModelOutputWithPast
    torch.testing.assert_close(model.lm_head(base.last_hidden_state), out.logits)
    as_tuple = model(ids, pixel_values=pixel_values, use_cache=False, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits)


@torch.no_grad()
def test_inputs_embeds_find_the_placeholders_too():
    model = tiny_model()
    ids, pixel_values = prompt(2, 4, 17), images(1)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(
        model(inputs_embeds=embeds, pixel_values=pixel_values).logits, model(ids, pixel_values=pixel_values).logits
    )


# ---------------------------------------------------------------------------------------------- errors


@torch.no_grad()
def test_a_partial_image_span_is_refused():
    model = tiny_model()
    ids, pixel_values = prompt(2, 4, 17), images(1)
    # A prefill that stops inside the image span.
    with pytest.raises(ValueError, match="exactly 17 contiguous placeholders, all in the same call"):
        model(ids[:, :10], pixel_values=pixel_values, use_cache=True)
    # The rest of a span after a cached prefix.
    cache = model(ids[:, :2], use_cache=True).cache
    with pytest.raises(ValueError, match="exactly 17 contiguous"):
        model(ids[:, 2:12], pixel_values=pixel_values, cache=cache, use_cache=True)
    # Right count, not contiguous.
    split = torch.cat([ids[:, :5], torch.tensor([[5]]), ids[:, 5:]], dim=1)
    with pytest.raises(ValueError, match="positions 2 to 19"):
        model(split, pixel_values=pixel_values)


@torch.no_grad()
def test_image_count_must_match_the_rows_with_placeholders():
    model = tiny_model()
    ids = prompt(2, 4, 17)
    with pytest.raises(ValueError, match="Got 2 images for 1 rows"):
        model(ids, pixel_values=images(2))
    with pytest.raises(ValueError, match="Got 0 images for 1 rows"):
        model(ids)
    text = torch.randint(1, IMAGE, (1, 23))
    with pytest.raises(ValueError, match="Got 1 images for 0 rows"):
        model(text, pixel_values=images(1))
    with pytest.raises(ValueError, match="Got 1 images for 2 rows"):
        model(torch.cat([ids, ids]), pixel_values=images(1))


# ---------------------------------------------------------------------------------------------- integration


@torch.no_grad()
def test_save_and_load_through_auto_classes_gives_identical_outputs(tmp_path):
    model = tiny_model(scan_mode="multidirectional")
    ids, pixel_values = prompt(2, 4, 17), images(1)
    expected = model(ids, pixel_values=pixel_values).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is VisualRWKVForConditionalGeneration
    assert loaded.config.scan_mode == "multidirectional"
    assert torch.equal(loaded(ids, pixel_values=pixel_values).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is VisualRWKVModel


def test_loss_accepts_trainer_kwargs_and_gradient_checkpointing_trains():
    model = tiny_model()
    model.activation_checkpointing_enable()
    model.train()
    ids, pixel_values = prompt(2, 6, 17), images(1)
    labels = ids.masked_fill(ids == IMAGE, -100)
    out = model(ids, pixel_values=pixel_values, labels=labels, num_items_in_batch=torch.tensor(4))
    reference = model(ids, pixel_values=pixel_values, labels=labels)
    valid = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss, reference.loss * valid / 4)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear.weight.grad.abs().sum() > 0
    assert model.model.language_model.blocks[1].attention.att_key.weight.grad.abs().sum() > 0


def test_input_embeddings_resolve_and_head_is_untied():
    model = tiny_model()
    assert model.get_input_embeddings() is model.model.language_model.embeddings
    assert model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.model.multi_modal_projector.linear.bias is None
    assert tiny_model(projector_bias=True).model.multi_modal_projector.linear.bias is not None


@torch.no_grad()
def test_beam_search_with_images_cached_equals_uncached():
    model = tiny_model(scan_mode="multidirectional")
    ids, attention_mask = left_pad([prompt(2, 3, 17, seed=1), prompt(5, 1, 17, seed=2)])
    kwargs = dict(attention_mask=attention_mask, pixel_values=images(2), num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


# ---------------------------------------------------------------------------------------------- reuse


# the text model's helpers, with a shorter answer and the image path's looser logit tolerance
greedy = partial(text_model_tests.greedy, max_new_tokens=5)
assert_same_generation = partial(text_model_tests.assert_same_generation, tol=1e-4)


def text(length, seed):
    return torch.randint(1, IMAGE, (1, length), generator=torch.Generator().manual_seed(seed))


def count_vision_tower_runs(model):
    runs = []
    model.model.vision_tower.register_forward_hook(lambda *args: runs.append(1))
    return runs


@torch.no_grad()
@pytest.mark.parametrize("scan_mode", ["bidirectional", "multidirectional"])
def test_image_prefix_state_is_reused_across_questions(scan_mode):
    # image first: the prompt up to the end of the image span is the same for every question
    model = tiny_model(scan_mode=scan_mode)
    prefix, pixel_values = prompt(2, 0, 17), images(1)
    prefix_cache = model(prefix, pixel_values=pixel_values).cache
    runs = count_vision_tower_runs(model)
    for seed in (3, 4):
        ids = torch.cat([prefix, text(6, seed)], 1)
        before = len(runs)
        reused = greedy(model, ids, cache=copy.deepcopy(prefix_cache))  # no image: it is in the state
        assert len(runs) == before
        assert_same_generation(reused, greedy(model, ids, pixel_values=pixel_values))
        # the prompt's images may be passed as they are: the one already in the state is not read again
        reused = greedy(model, ids, pixel_values=pixel_values, cache=copy.deepcopy(prefix_cache))
        assert_same_generation(reused, greedy(model, ids, pixel_values=pixel_values))


@torch.no_grad()
def test_padded_batch_image_prefix_reuse_equals_a_fresh_generate():
    model = tiny_model(scan_mode="multidirectional")
    rows = [prompt(2, 1, 17, seed=1), prompt(4, 0, 0, seed=4), prompt(5, 2, 17, seed=5)]
    prefix, mask = left_pad(rows)
    pixel_values = images(2, seed=7)
    prefix_cache = model(prefix, attention_mask=mask, pixel_values=pixel_values).cache
    ids = torch.cat([prefix, text(3, 8).repeat(3, 1)], 1)
    ids_mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], 1)
    reused = greedy(model, ids, attention_mask=ids_mask, cache=copy.deepcopy(prefix_cache))
    assert_same_generation(reused, greedy(model, ids, attention_mask=ids_mask, pixel_values=pixel_values))


@torch.no_grad()
def test_an_image_in_the_new_part_is_read_while_a_cached_one_is_skipped():
    model = tiny_model()
    # row 0's image is in the cached prefix, row 1's comes after it
    prefix = torch.cat([prompt(2, 0, 17, seed=1), text(19, 2)])
    ids = torch.cat([prefix, torch.cat([text(20, 3), prompt(1, 2, 17, seed=4)])], 1)
    pixel_values = images(2, seed=9)
    prefix_cache = model(prefix, pixel_values=pixel_values[:1]).cache
    reused = greedy(model, ids, pixel_values=pixel_values, cache=copy.deepcopy(prefix_cache))
    assert_same_generation(reused, greedy(model, ids, pixel_values=pixel_values))


@torch.no_grad()
@pytest.mark.parametrize("pass_image_again", [False, True])
def test_the_returned_cache_continues_an_image_conversation_exactly(pass_image_again):
    model = tiny_model()
    pixel_values = images(1)
    conversation, cache = prompt(3, 4, 17), None
    for turn in range(2):
        kwargs = {"pixel_values": pixel_values} if cache is None or pass_image_again else {}
        out = greedy(model, conversation, cache=cache, **kwargs)
        if cache is not None:
            assert_same_generation(out, greedy(model, conversation, pixel_values=pixel_values))
        conversation, cache = torch.cat([out.sequences, text(5, 20 + turn)], 1), out.cache


@torch.no_grad()
def test_image_features_passed_back_skip_the_vision_tower():
    model = tiny_model(scan_mode="multidirectional")
    ids, pixel_values = prompt(3, 4, 17), images(1)
    features = model.get_image_features(pixel_values)
    # as LLaVA's: the vision tower's output, the projected features in `pooler_output`
    assert isinstance(features, BaseModelOutputWithPooling) and features.pooler_output.shape == (1, 17, 32)
    assert len(features.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    runs = count_vision_tower_runs(model)
    from_features = model(ids, mm_encoder_outputs={"image": features})
    from_pixels = model(ids, pixel_values=pixel_values)
    assert len(runs) == 1
    torch.testing.assert_close(from_features.logits, from_pixels.logits, rtol=0, atol=0)
    torch.testing.assert_close(
        from_features.image_outputs.pooler_output, from_pixels.image_outputs.pooler_output, rtol=0, atol=0
    )
    for seed in (5, 6):  # several questions about one image, the vision tower not run again
        question = prompt(3, 4, 17, seed=seed)
        before = len(runs)
        reused = greedy(model, question, mm_encoder_outputs={"image": features})
        assert len(runs) == before
        assert_same_generation(reused, greedy(model, question, pixel_values=pixel_values))
    # beam search expands the features it is given (a copy of them, so they stay reusable)
    ids, pixel_values = torch.cat([prompt(2, 5, 17, seed=1), prompt(4, 3, 17, seed=2)]), images(2, seed=3)
    features = model.get_image_features(pixel_values)
    beams = dict(num_beams=3, max_new_tokens=4, do_sample=False)
    expected = model.generate(ids, pixel_values=pixel_values, **beams)
    for _ in range(2):
        assert torch.equal(model.generate(ids, mm_encoder_outputs={"image": features}, **beams), expected)
    assert features.pooler_output.shape == (2, 17, 32)


def test_bad_image_features_get_clear_errors():
    model = tiny_model()
    ids, pixel_values = prompt(2, 4, 17), images(1)
    features = model.get_image_features(pixel_values)
    with pytest.raises(ValueError, match="either as `pixel_values` or as pre-computed features"):
        model(ids, pixel_values=pixel_values, mm_encoder_outputs={"image": features})
    with pytest.raises(TypeError, match=r"get_image_features\(pixel_values\)"):
        model(ids, mm_encoder_outputs={"image": features.pooler_output})
    with pytest.raises(ValueError, match=r"reads 17 vectors of size 32 per image"):
        model(ids, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=torch.zeros(1, 16, 32))})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_pixel_values_are_refused(bad):
    model = tiny_model()
    ids, pixel_values = prompt(2, 4, 17), images(2)
    pixel_values[1, 0, 3, 5] = bad
    batch = torch.cat([ids, ids])
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] hold NaN or infinite values"):
        model(batch, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.generate(batch, pixel_values=pixel_values, max_new_tokens=2)


@torch.no_grad()
def test_past_key_values_works_exactly_as_cache_with_images():
    model = tiny_model()
    ids, pixel_values = prompt(3, 6, 17), images(1)
    cache = model(ids[:, :22], pixel_values=pixel_values).cache
    with pytest.warns(FutureWarning, match="past_key_values"):
        as_past = model(ids[:, 22:], past_key_values=copy.deepcopy(cache))
    torch.testing.assert_close(as_past.logits, model(ids[:, 22:], cache=copy.deepcopy(cache)).logits, rtol=0, atol=0)
    torch.testing.assert_close(
        as_past.logits, model(ids, pixel_values=pixel_values).logits[:, 22:], rtol=1e-4, atol=1e-4
    )
    with pytest.warns(FutureWarning, match="past_key_values"):
        reused = greedy(model, ids, past_key_values=copy.deepcopy(cache))
    assert_same_generation(reused, greedy(model, ids, pixel_values=pixel_values))


@torch.no_grad()
def test_assisted_decoding_with_images_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="stateful"):
        model.generate(prompt(2, 4, 17), pixel_values=images(1), prompt_lookup_num_tokens=2, max_new_tokens=3)
