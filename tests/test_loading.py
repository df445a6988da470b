"""`from_pretrained` refuses a folder whose config does not match its weights or names another model type, and still
loads what is right: head-less models from a checkpoint with a head, and PEFT adapters on a loaded model."""

import json
import re
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from visualrwkv_hf import (
    Rwkv6ForCausalLM,
    Rwkv6Model,
    VisualRWKVForConditionalGeneration,
    VisualRWKVModel,
)

from test_modeling_rwkv6 import random_ids
from test_modeling_rwkv6 import tiny_model as tiny_text_model
from test_modeling_visualrwkv import NUM_LAYERS, images, prompt, tiny_model


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loading") / "vlm"
    tiny_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loading") / "text"
    tiny_text_model().save_pretrained(folder)
    return folder


def edited_copy(folder, destination, edit):
    """A copy of a saved folder with its config.json changed by `edit(config_dict)`."""
    shutil.copytree(folder, destination)
    config = json.loads((destination / "config.json").read_text())
    edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


MODEL_CLASSES = [VisualRWKVForConditionalGeneration, AutoModelForImageTextToText, VisualRWKVModel]


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_more_layers_in_the_config_than_in_the_weights_are_refused(vlm_folder, tmp_path, model_class):
    folder = edited_copy(vlm_folder, tmp_path / "more", lambda c: c["text_config"].update(num_hidden_layers=6))
    missing = r"missing from the weights .*layers (model\.)?language_model\.blocks\.\{4, 5\}"
    with pytest.raises(ValueError, match=missing):
        model_class.from_pretrained(folder)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_fewer_layers_in_the_config_than_in_the_weights_are_refused(vlm_folder, tmp_path, model_class):
    folder = edited_copy(vlm_folder, tmp_path / "fewer", lambda c: c["text_config"].update(num_hidden_layers=2))
    extra = r"in the weights but not in the model: layers model\.language_model\.blocks\.\{2, 3\}"
    with pytest.raises(ValueError, match=extra):
        model_class.from_pretrained(folder)


@pytest.mark.parametrize("layers, message", [(5, r"missing from the weights .*layers model\.blocks\.\{3, 4\}\."),
                                             (1, r"not in the model: layers model\.blocks\.\{1, 2\}\.")])
def test_the_text_model_refuses_another_layer_count(text_folder, tmp_path, layers, message):
    folder = edited_copy(text_folder, tmp_path / "text", lambda c: c.update(num_hidden_layers=layers))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_missing_vision_layers_and_a_missing_head_are_named(vlm_folder, tmp_path):
    folder = edited_copy(vlm_folder, tmp_path / "vision", lambda c: c["vision_config"].update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"layers model\.vision_tower\.encoder\.layers\.\{2\}"):
        VisualRWKVForConditionalGeneration.from_pretrained(folder)
    headless = tmp_path / "headless"
    VisualRWKVModel.from_pretrained(vlm_folder).save_pretrained(headless)
    with pytest.raises(ValueError, match=r"missing from the weights \(they would be random\): lm_head\.weight\."):
        VisualRWKVForConditionalGeneration.from_pretrained(headless)


def test_shape_mismatch_names_the_tensors_and_both_shapes(vlm_folder, tmp_path):
    folder = edited_copy(vlm_folder, tmp_path / "wide", lambda c: c["text_config"].update(intermediate_size=64))
    expected = "shapes differ: model.language_model.blocks.0.feed_forward.ffn_key.weight (weights (96, 32), config " \
        "(64, 32))"
    with pytest.raises(ValueError, match=re.escape(expected) + ".* and 2 more"):
        VisualRWKVForConditionalGeneration.from_pretrained(folder)
    # Asked for, the mismatched tensors are re-initialised, as transformers does.
    model, info = VisualRWKVForConditionalGeneration.from_pretrained(
        folder, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert len(info["mismatched_keys"]) == 2 * NUM_LAYERS
    assert model.model.language_model.blocks[0].feed_forward.ffn_key.weight.shape == (64, 32)


def test_a_text_model_is_not_loaded_from_a_vision_language_folder(vlm_folder):
    """Before, every weight was dropped and the model built at random, with a warning only."""
    with pytest.raises(ValueError, match=r"missing from the weights .*layers model\.blocks\.\{0, 1, 2, 3\}.*in the "
                                         r"weights but not in the model: layers model\.language_model\.blocks"):
        Rwkv6ForCausalLM.from_pretrained(vlm_folder)


@pytest.mark.parametrize("model_class", [VisualRWKVForConditionalGeneration, VisualRWKVModel])
def test_another_model_type_is_refused_naming_both_types_and_the_folder(vlm_folder, tmp_path, model_class):
    folder = edited_copy(vlm_folder, tmp_path / "llava", lambda c: c.update(model_type="llava"))
    expected = f"{folder}'s config.json is a `llava` configuration, not a `visualrwkv` one"
    with pytest.raises(ValueError, match=re.escape(expected)):
        model_class.from_pretrained(folder)


def test_text_folder_is_refused_by_the_vision_language_classes(text_folder):
    with pytest.raises(ValueError, match="is a `visualrwkv_rwkv6` configuration, not a `visualrwkv` one"):
        VisualRWKVForConditionalGeneration.from_pretrained(text_folder)


@torch.no_grad()
def test_head_less_models_load_a_checkpoint_with_a_head_quietly_and_exactly(vlm_folder, text_folder):
    full = VisualRWKVForConditionalGeneration.from_pretrained(vlm_folder)
    ids, pixel_values = prompt(2, 3, full.config.num_image_tokens), images(1)
    base, info = AutoModel.from_pretrained(vlm_folder, output_loading_info=True)
    assert type(base) is VisualRWKVModel
    assert info["unexpected_keys"] == set() and info["missing_keys"] == set()  # the head is left out, not reported
    expected = full.model(ids, pixel_values=pixel_values).last_hidden_state
    assert torch.equal(base(ids, pixel_values=pixel_values).last_hidden_state, expected)

    text = Rwkv6ForCausalLM.from_pretrained(text_folder)
    base, info = AutoModel.from_pretrained(text_folder, output_loading_info=True)
    assert type(base) is Rwkv6Model and info["unexpected_keys"] == set()
    ids = random_ids(1, 7)
    assert torch.equal(base(ids).last_hidden_state, text.model(ids).last_hidden_state)


@torch.no_grad()
def test_peft_adapter_saves_and_loads_on_a_loaded_model(text_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(text_folder)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["att_key", "ffn_value"], init_lora_weights=False))
    ids = random_ids(1, 9)
    expected = adapted(ids).logits
    adapted.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(text_folder), tmp_path / "adapter")
    assert torch.equal(reloaded(ids).logits, expected)
    assert not torch.equal(Rwkv6ForCausalLM.from_pretrained(text_folder)(ids).logits, expected)

