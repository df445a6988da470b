import json
import re

import pytest
from transformers import AutoConfig

from visualrwkv_hf import Rwkv6Config, VisualRWKVConfig


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
