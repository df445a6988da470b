import json
import re

import pytest
from transformers import AutoConfig, LlamaConfig

from visualrwkv_hf import Rwkv6Config, Rwkv7Config, VisualRWKVConfig


def test_another_model_type_is_refused():
    with pytest.raises(ValueError, match="This is a `llava` configuration, not a `visualrwkv` one"):
        VisualRWKVConfig.from_dict({**VisualRWKVConfig().to_dict(), "model_type": "llava"})


def test_from_pretrained_names_the_folder_of_another_model_type(tmp_path):
    Rwkv6Config(hidden_size=64, head_size=16).save_pretrained(tmp_path / "text")
    expected = f"{tmp_path / 'text'}'s config.json is a `visualrwkv_rwkv6` configuration, not a `visualrwkv` one"
    with pytest.raises(ValueError, match=re.escape(expected + ": VisualRWKVConfig cannot load it")):
        VisualRWKVConfig.from_pretrained(tmp_path / "text")


def test_the_text_config_still_loads_from_a_vision_language_folder(tmp_path):
    """transformers reads a composite folder's `text_config` for the text config class: that is no mismatch."""
    text = Rwkv6Config(hidden_size=64, head_size=16, num_hidden_layers=3)
    VisualRWKVConfig(text_config=text.to_dict()).save_pretrained(tmp_path)
    loaded = Rwkv6Config.from_pretrained(tmp_path)
    assert (loaded.model_type, loaded.hidden_size, loaded.num_hidden_layers) == ("visualrwkv_rwkv6", 64, 3)


def test_a_folder_whose_text_config_has_the_old_model_type_loads(tmp_path):
    VisualRWKVConfig(text_config={"hidden_size": 64, "head_size": 16, "num_hidden_layers": 3}).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"]["model_type"] = "visualrwkv_text"  # as folders were saved before the rename
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for loaded in (VisualRWKVConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded.text_config) is Rwkv6Config
        assert (loaded.text_config.model_type, loaded.text_config.num_hidden_layers) == ("visualrwkv_rwkv6", 3)
    assert Rwkv6Config.from_pretrained(tmp_path).num_hidden_layers == 3


# ------------------------------------------------------------------ VisualRWKV-7: an RWKV-7 language model

RWKV7_TEXT = {"model_type": "visualrwkv_rwkv7", "hidden_size": 32, "num_hidden_layers": 2, "head_size": 8}


def rwkv7_config(**overrides) -> VisualRWKVConfig:
    settings = dict(text_config=RWKV7_TEXT, scan_mode="unidirectional", image_position="first", image_token_id=65535)
    return VisualRWKVConfig(**{**settings, **overrides})


def test_a_text_config_naming_rwkv7_builds_an_rwkv7_config_and_round_trips(tmp_path):
    config = rwkv7_config()
    assert type(config.text_config) is Rwkv7Config and config.rwkv7_text
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (32, 2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["text_config"]["model_type"] == "visualrwkv_rwkv7"
    for loaded in (VisualRWKVConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded.text_config) is Rwkv7Config
        assert loaded.to_diff_dict() == config.to_diff_dict()
    # an Rwkv7Config instance is taken as it is; the default stays RWKV-6
    assert VisualRWKVConfig(text_config=Rwkv7Config(**RWKV7_TEXT), scan_mode="unidirectional").rwkv7_text
    assert type(VisualRWKVConfig().text_config) is Rwkv6Config and not VisualRWKVConfig().rwkv7_text


@pytest.mark.parametrize("scan_mode", ["bidirectional", "multidirectional"])
def test_rwkv7_refuses_scanning(scan_mode):
    with pytest.raises(ValueError, match=f"`scan_mode` must be 'unidirectional', got '{scan_mode}'"):
        rwkv7_config(scan_mode=scan_mode)


def test_a_foreign_language_model_config_is_refused():
    with pytest.raises(ValueError, match="`text_config` is a 'llama' configuration; VisualRWKV's language model is"):
        VisualRWKVConfig(text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="`text_config` is a LlamaConfig"):
        VisualRWKVConfig(text_config=LlamaConfig())


def test_the_three_encoder_map_pools_adaptively_to_any_grid_size():
    vision = {"model_type": "visualrwkv_sam_dino_siglip"}
    # VisualRWKV-7's num_token_per_image = grid_size ** 2 (144 does not tile 32 x 32: adaptive windows overlap)
    for grid_size, tokens in ((-1, 1024), (4, 16), (12, 144), (32, 1024)):
        assert rwkv7_config(vision_config=vision, grid_size=grid_size).num_image_tokens == tokens
    with pytest.raises(ValueError, match="larger than the vision backbone's 32 x 32 feature map"):
        rwkv7_config(vision_config=vision, grid_size=33)
