import json

import pytest
from transformers import AutoConfig

from visualrwkv_hf import Rwkv6Config, Rwkv7Config


@pytest.mark.parametrize(
    "hidden, ranks",
    [
        # BlinkDL's formula; 0.1B and 1.5B as released (the 0.4B file predates it and stores 64/64/32/128)
        (768, (64, 64, 32, 128)),
        (1024, (64, 64, 32, 160)),
        (2048, (96, 96, 64, 256)),
        (2560, (96, 96, 64, 320)),
        (4096, (128, 128, 96, 480)),
    ],
)
def test_default_lora_ranks_follow_blinkdls_formula(hidden, ranks):
    config = Rwkv7Config(hidden_size=hidden)
    assert (config.decay_low_rank_dim, config.a_low_rank_dim, config.v_low_rank_dim, config.gate_low_rank_dim) == ranks
    assert config.intermediate_size == 4 * hidden and config.num_heads == hidden // 64


def test_small_widths_get_the_minimum_rank_of_32():
    config = Rwkv7Config(hidden_size=64, head_size=16)
    assert (config.decay_low_rank_dim, config.a_low_rank_dim, config.v_low_rank_dim, config.gate_low_rank_dim) == (
        32, 32, 32, 32,
    )


def test_defaults_are_the_0b1_world_model():
    config = Rwkv7Config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_size) == (65536, 768, 12, 64)
    assert config.group_norm_epsilon == pytest.approx(6.4e-4)
    assert config.layer_types == ["linear_attention"] * 12
    assert config.number_of_conv_states == 2
    assert (config.pad_token_id, config.eos_token_id, config.tie_word_embeddings) == (0, 261, False)


def test_explicit_sizes_are_kept():
    config = Rwkv7Config(hidden_size=64, head_size=16, intermediate_size=100, decay_low_rank_dim=8, gate_low_rank_dim=5)
    assert (config.intermediate_size, config.decay_low_rank_dim, config.gate_low_rank_dim) == (100, 8, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, head_size=64), "multiple of `head_size`"),
        (dict(hidden_size=64, head_size=16, tie_word_embeddings=True), "not tied"),
        (dict(hidden_size=64, head_size=16, wkv_chunk_size=24), "power of two"),
        (dict(hidden_size=64, head_size=16, a_low_rank_dim=0), "a_low_rank_dim"),
        (dict(hidden_size=64, head_size=0), "head_size"),
    ],
)
def test_bad_sizes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rwkv7Config(**kwargs)


def test_save_and_load_round_trip_through_auto_config(tmp_path):
    config = Rwkv7Config(hidden_size=64, head_size=16, num_hidden_layers=3, v_low_rank_dim=8)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "visualrwkv_rwkv7"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is Rwkv7Config
    fields = ("hidden_size", "head_size", "num_hidden_layers", "intermediate_size", "decay_low_rank_dim",
              "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim", "wkv_chunk_size", "eos_token_id")
    assert [getattr(loaded, f) for f in fields] == [getattr(config, f) for f in fields]


def test_a_folder_of_another_model_type_is_refused(tmp_path):
    Rwkv6Config(hidden_size=64, head_size=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"`visualrwkv_rwkv6` configuration, not a `visualrwkv_rwkv7` one"):
        Rwkv7Config.from_pretrained(tmp_path)
