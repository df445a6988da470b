"""Rwkv6Config: derived sizes, validation, and folders saved under the old model type."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM


@pytest.mark.parametrize(
    "hidden, ffn, mix_rank, decay_rank",
    [(2048, 7168, 32, 64), (2560, 8960, 32, 64), (4096, 14336, 64, 128), (768, 2688, 32, 64)],
)
def test_derived_sizes_follow_the_original(hidden, ffn, mix_rank, decay_rank):
    config = Rwkv6Config(hidden_size=hidden)
    assert config.intermediate_size == ffn == int((hidden * 3.5) // 32 * 32)
    assert config.time_mix_extra_dim == mix_rank
    assert config.time_decay_extra_dim == decay_rank
    assert config.num_heads == hidden // 64


def test_released_1b6_defaults():
    config = Rwkv6Config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_size) == (65536, 2048, 24, 64)
    assert config.group_norm_epsilon == pytest.approx(1e-5 * 64)
    assert config.layer_types == ["linear_attention"] * 24
    assert config.number_of_conv_states == 2
    assert (config.pad_token_id, config.eos_token_id) == (0, 261)
    assert config.tie_word_embeddings is False


def test_explicit_sizes_are_kept():
    config = Rwkv6Config(hidden_size=64, head_size=16, intermediate_size=100, time_mix_extra_dim=4)
    assert (config.intermediate_size, config.time_mix_extra_dim, config.num_heads) == (100, 4, 4)


def test_width_not_multiple_of_head_size_is_refused():
    with pytest.raises(ValueError, match="multiple of `head_size`"):
        Rwkv6Config(hidden_size=100, head_size=64)


def test_tied_embeddings_are_refused():
    with pytest.raises(ValueError, match="not tied"):
        Rwkv6Config(hidden_size=64, head_size=16, tie_word_embeddings=True)


@pytest.mark.parametrize("field", ["num_hidden_layers", "head_size", "time_decay_extra_dim"])
def test_non_positive_sizes_are_refused(field):
    with pytest.raises(ValueError, match=field):
        Rwkv6Config(**{"hidden_size": 64, "head_size": 16, field: 0})


def test_dict_round_trip():
    config = Rwkv6Config(hidden_size=64, head_size=16, num_hidden_layers=3)
    again = Rwkv6Config.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()


def test_wkv_chunk_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Rwkv6Config(hidden_size=64, head_size=16, wkv_chunk_size=24)


def test_another_model_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="This is a `llama` configuration, not a `visualrwkv_rwkv6` one"):
        Rwkv6Config(model_type="llama", hidden_size=64, head_size=16)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="is a `llama` configuration, not a `visualrwkv_rwkv6` one"):
        Rwkv6Config.from_pretrained(tmp_path)


def old_text_folder(folder, **sizes):
    """An RWKV-6 folder as the package saved it before the model type was renamed ("visualrwkv_text")."""
    model = Rwkv6ForCausalLM(Rwkv6Config(**sizes)).eval()
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "visualrwkv_text"}))
    return model


@torch.no_grad()
def test_a_folder_saved_under_the_old_model_type_loads_and_saves_under_the_new_one(tmp_path):
    model = old_text_folder(tmp_path / "old", vocab_size=128, hidden_size=32, num_hidden_layers=2, head_size=8)
    config = Rwkv6Config.from_pretrained(tmp_path / "old")
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("visualrwkv_rwkv6", 32, 2)
    assert type(AutoConfig.from_pretrained(tmp_path / "old")) is Rwkv6Config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert type(loaded) is Rwkv6ForCausalLM
    ids = torch.randint(0, 128, (1, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == "visualrwkv_rwkv6"
