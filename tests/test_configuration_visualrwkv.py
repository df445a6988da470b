import json
import re

import pytest

from visualrwkv_hf import VisualRWKVConfig, VisualRWKVTextConfig


@pytest.mark.parametrize(
    "hidden, ffn, mix_rank, decay_rank",
    [(2048, 7168, 32, 64), (2560, 8960, 32, 64), (4096, 14336, 64, 128), (768, 2688, 32, 64)],
)
def test_derived_sizes_follow_the_original(hidden, ffn, mix_rank, decay_rank):
    config = VisualRWKVTextConfig(hidden_size=hidden)
    assert config.intermediate_size == ffn == int((hidden * 3.5) // 32 * 32)
    assert config.time_mix_extra_dim == mix_rank
    assert config.time_decay_extra_dim == decay_rank
    assert config.num_heads == hidden // 64


def test_released_1b6_defaults():
    config = VisualRWKVTextConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_size) == (65536, 2048, 24, 64)
    assert config.group_norm_epsilon == pytest.approx(1e-5 * 64)
    assert config.layer_types == ["linear_attention"] * 24
    assert config.number_of_conv_states == 2
    assert (config.pad_token_id, config.eos_token_id) == (0, 261)
    assert config.tie_word_embeddings is False


def test_explicit_sizes_are_kept():
    config = VisualRWKVTextConfig(hidden_size=64, head_size=16, intermediate_size=100, time_mix_extra_dim=4)
    assert (config.intermediate_size, config.time_mix_extra_dim, config.num_heads) == (100, 4, 4)


def test_width_not_multiple_of_head_size_is_refused():
    with pytest.raises(ValueError, match="multiple of `head_size`"):
        VisualRWKVTextConfig(hidden_size=100, head_size=64)


def test_tied_embeddings_are_refused():
    with pytest.raises(ValueError, match="not tied"):
        VisualRWKVTextConfig(hidden_size=64, head_size=16, tie_word_embeddings=True)


@pytest.mark.parametrize("field", ["num_hidden_layers", "head_size", "time_decay_extra_dim"])
def test_non_positive_sizes_are_refused(field):
    with pytest.raises(ValueError, match=field):
        VisualRWKVTextConfig(**{"hidden_size": 64, "head_size": 16, field: 0})


def test_dict_round_trip():
    config = VisualRWKVTextConfig(hidden_size=64, head_size=16, num_hidden_layers=3)
    again = VisualRWKVTextConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_wkv_chunk_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        VisualRWKVTextConfig(hidden_size=64, head_size=16, wkv_chunk_size=24)


def test_another_model_type_is_refused():
    with pytest.raises(ValueError, match="This is a `llama` configuration, not a `visualrwkv_text` one"):
        VisualRWKVTextConfig(model_type="llama", hidden_size=64, head_size=16)
    with pytest.raises(ValueError, match="This is a `llava` configuration, not a `visualrwkv` one"):
        VisualRWKVConfig.from_dict({**VisualRWKVConfig().to_dict(), "model_type": "llava"})


def test_from_pretrained_names_the_folder_of_another_model_type(tmp_path):
    VisualRWKVTextConfig(hidden_size=64, head_size=16).save_pretrained(tmp_path / "text")
    expected = f"{tmp_path / 'text'}'s config.json is a `visualrwkv_text` configuration, not a `visualrwkv` one"
    with pytest.raises(ValueError, match=re.escape(expected + ": VisualRWKVConfig cannot load it")):
        VisualRWKVConfig.from_pretrained(tmp_path / "text")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="is a `llama` configuration, not a `visualrwkv_text` one"):
        VisualRWKVTextConfig.from_pretrained(tmp_path / "llama")


def test_the_text_config_still_loads_from_a_vision_language_folder(tmp_path):
    """transformers reads a composite folder's `text_config` for the text config class: that is no mismatch."""
    text = VisualRWKVTextConfig(hidden_size=64, head_size=16, num_hidden_layers=3)
    VisualRWKVConfig(text_config=text.to_dict()).save_pretrained(tmp_path)
    loaded = VisualRWKVTextConfig.from_pretrained(tmp_path)
    assert (loaded.model_type, loaded.hidden_size, loaded.num_hidden_layers) == ("visualrwkv_text", 64, 3)
