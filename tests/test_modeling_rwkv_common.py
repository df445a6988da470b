"""The pieces every RWKV language model shares: the cache slots and their accessors, token shift, the backbone's
input handling, and the flags of the one PreTrainedModel base."""

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from visualrwkv_hf import Rwkv6ForCausalLM, VisualRWKVForConditionalGeneration
from visualrwkv_hf.modeling_rwkv_common import (
    CHANNEL_MIX_SHIFT,
    TIME_MIX_SHIFT,
    WKV_STATE,
    RwkvPreTrainedModel,
    previous_wkv_state,
    recurrent_backbone_inputs,
    token_shift,
)

from test_modeling_rwkv6 import random_ids, tiny_config, tiny_model


def test_token_shift_reads_the_cached_last_token_and_caches_the_new_one():
    config = tiny_config(num_hidden_layers=1)
    cache = DynamicCache(config=config)
    first, second = torch.randn(2, 3, 32), torch.randn(2, 2, 32)
    shifted = token_shift(first, cache, 0, CHANNEL_MIX_SHIFT)
    assert torch.equal(shifted, torch.cat([torch.zeros(2, 1, 32), first[:, :-1]], 1))
    assert torch.equal(cache.get_conv_state(0, CHANNEL_MIX_SHIFT)[..., -1], first[:, -1])
    assert cache.get_conv_state(0, TIME_MIX_SHIFT) is None  # the other slot is untouched
    assert torch.equal(token_shift(second, cache, 0, CHANNEL_MIX_SHIFT), torch.cat([first[:, -1:], second[:, :-1]], 1))
    assert torch.equal(token_shift(first, None, 0, TIME_MIX_SHIFT), shifted)  # without a cache: zeros first


def test_token_shift_skips_padding_wherever_it_lies():
    # x_{t-1} is the last real position before t, else the cached last token (zeros without one); the cache keeps
    # the last real token, or its previous value for a row with none in the call. Checked against a loop.
    config = tiny_config(num_hidden_layers=1)
    x, previous = torch.randn(4, 6, 32), torch.randn(4, 1, 32)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])

    def loop(last):
        shifted = torch.empty_like(x)
        last = last.clone()
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                shifted[b, t] = last[b]
                if mask[b, t]:
                    last[b] = x[b, t]
        return shifted, last

    expected, expected_last = loop(torch.zeros(4, 32))
    assert torch.equal(token_shift(x, None, 0, TIME_MIX_SHIFT, mask), expected)
    fresh = DynamicCache(config=config)
    assert torch.equal(token_shift(x, fresh, 0, TIME_MIX_SHIFT, mask), expected)
    assert torch.equal(fresh.get_conv_state(0, TIME_MIX_SHIFT)[..., 0], expected_last)

    cache = DynamicCache(config=config)
    token_shift(previous, cache, 0, TIME_MIX_SHIFT)
    expected, expected_last = loop(previous[:, 0])
    assert torch.equal(token_shift(x, cache, 0, TIME_MIX_SHIFT, mask), expected)
    assert torch.equal(cache.get_conv_state(0, TIME_MIX_SHIFT)[..., 0], expected_last)
    assert torch.equal(expected_last[3], previous[3, 0])  # the all-padding row kept its cached token
    assert cache.get_seq_length() == 1 + 6  # padded positions are counted as seen


@torch.no_grad()
def test_the_wkv_state_is_read_through_its_accessor():
    model = tiny_model()
    cache = DynamicCache(config=model.config)
    assert previous_wkv_state(cache, 0) is None and previous_wkv_state(None, 0) is None
    model(random_ids(1, 5), cache=cache)
    for layer_idx, layer in enumerate(cache.layers):
        assert previous_wkv_state(cache, layer_idx) is layer.recurrent_states[WKV_STATE]
        assert layer.recurrent_states[WKV_STATE].shape == (1, 4, 8, 8)


def test_backbone_inputs_default_to_a_cache_in_eval_and_none_in_training():
    model = tiny_model().model
    ids = random_ids(2, 4)
    _, cache, _ = recurrent_backbone_inputs(model, ids, None, None, None, None)
    assert isinstance(cache, DynamicCache)
    model.train()
    assert recurrent_backbone_inputs(model, ids, None, None, None, None)[1] is None
    assert recurrent_backbone_inputs(model, ids, None, None, None, True)[1] is not None


def test_backbone_inputs_keep_the_padding_mask_only_where_it_masks_something():
    model = tiny_model().model
    ids = random_ids(2, 4)
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert recurrent_backbone_inputs(model, ids, None, torch.ones(2, 4), None, False)[2] is None
    assert torch.equal(recurrent_backbone_inputs(model, ids, None, padded, None, False)[2], padded)
    # a mask covering cached positions too: its last columns belong to this call
    longer = torch.cat([padded, torch.tensor([[1, 0], [1, 1]])], 1)
    assert torch.equal(recurrent_backbone_inputs(model, ids[:, :2], None, longer, None, False)[2], longer[:, -2:])
    # a decode step (one new token per row) never holds padding
    assert recurrent_backbone_inputs(model, ids[:, :1], None, padded, None, False)[2] is None
    with pytest.raises(ValueError, match=r"`attention_mask` must be \(batch, seq\) = \(2, 4\)"):
        recurrent_backbone_inputs(model, ids, None, torch.ones(3, 4), None, False)
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        recurrent_backbone_inputs(model, None, None, None, None, False)


@torch.no_grad()
def test_models_return_transformers_output_classes():
    model = tiny_model()
    ids = random_ids(1, 5)
    out = model(ids, output_hidden_states=True)
    assert type(out) is CausalLMOutputWithPast and out.cache is not None and len(out.hidden_states) == 4
    assert type(model.model(ids)) is BaseModelOutputWithPast
    # output_hidden_states may select hidden states by index, as for transformers' own models
    (last_block,) = [h for h in model(ids, output_hidden_states=[-1]).hidden_states if h is not None]
    torch.testing.assert_close(last_block, out.hidden_states[-1])


def test_one_base_class_carries_the_shared_flags():
    for model_class in (Rwkv6ForCausalLM, VisualRWKVForConditionalGeneration):
        assert issubclass(model_class, RwkvPreTrainedModel)
        assert model_class._supports_default_dynamic_cache() and model_class.supports_gradient_checkpointing
