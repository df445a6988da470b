"""The float16 overflow guard (`Rwkv6Config.rescale_every`) of the RWKV-6 language model and VisualRWKV.

The models here are tiny, so their residual streams are made to grow as released models' do (see `grow_residual`)
until float16 overflows without the guard; BlinkDL's `rwkv` package, which rescales the same way, is the oracle.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import test_modeling_rwkv6 as lm
import test_modeling_visualrwkv as vlm
from rwkv6_reference import reference_rwkv
from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM
from visualrwkv_hf.convert_rwkv6 import convert_hf_to_blinkdl

EVERY = 2  # the guard's period in these 8-block models (BlinkDL's 6 needs many more blocks to matter)
LOG2_SCALE = 9  # how far the grown stream is scaled up: past 65504 unguarded, within float16 range guarded


@torch.no_grad()
def grow_residual(text_model, log2_scale=LOG2_SCALE):
    """
    Makes a text model's residual stream grow with depth as released models' do, then scales the whole stream by
    2^log2_scale. Each group of EVERY blocks writes 4x more than the one before (att_output x 300 * 4^group,
    ffn_value x 4^group); then the ln0 output and both mixers' outputs are multiplied by 2^log2_scale (through ln0's
    and ln_x's affine parameters and ffn_value), which the LayerNorms undo: up to their epsilon the model computes
    what its `log2_scale=0` twin computes, but in float16 its stream passes 65504 in the last blocks.
    """
    scale = 2.0**log2_scale
    pre_norm = text_model.blocks[0].pre_norm
    pre_norm.weight.mul_(scale)
    pre_norm.bias.mul_(scale)
    for block in text_model.blocks:
        growth = 4.0 ** (block.layer_idx // EVERY)
        block.attention.att_output.weight.mul_(300 * growth)
        block.attention.ln_x.weight.mul_(scale)
        block.attention.ln_x.bias.mul_(scale)
        block.feed_forward.ffn_value.weight.mul_(growth * scale)
    return text_model


def overflowing_model(log2_scale=LOG2_SCALE, **overrides):
    """An 8-block language model (well conditioned: the default initializer range) with a grown residual stream."""
    torch.manual_seed(0)
    settings = dict(num_hidden_layers=8, initializer_range=0.02, rescale_every=EVERY, eos_token_id=None)
    config = lm.tiny_config(**{**settings, **overrides})
    model = Rwkv6ForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.blocks:
            for p in (block.attention.time_maa_w1, block.attention.time_decay_w1):
                p.normal_(0, 0.3)
    grow_residual(model.model, log2_scale)
    return model


def in_float16(model, rescale_every=EVERY):
    model = copy.deepcopy(model).half()
    model.config.rescale_every = rescale_every
    return model


def max_error(logits, reference):
    return (logits.float() - reference).abs().max().item()


# ---------------------------------------------------------------------------------------------- configuration


def test_default_is_blinkdls_float16_rescale_layer(tmp_path, monkeypatch):
    monkeypatch.delenv("RWKV_RESCALE_LAYER", raising=False)
    model = overflowing_model(num_hidden_layers=2)
    torch.save(convert_hf_to_blinkdl(model.state_dict(), model.config), tmp_path / "model.pth")
    assert Rwkv6Config().rescale_every == reference_rwkv(tmp_path / "model.pth", "cpu fp16").RESCALE_LAYER
    assert reference_rwkv(tmp_path / "model.pth", "cpu fp32").RESCALE_LAYER == 0  # fp32 never rescales there either


def test_negative_rescale_every_is_refused():
    with pytest.raises(ValueError, match=r"`rescale_every` must be 0 \(no float16 rescaling\) or a positive"):
        Rwkv6Config(rescale_every=-1)
    assert Rwkv6Config(rescale_every=0).rescale_every == 0


# ---------------------------------------------------------------------------------------------- the guard


@torch.no_grad()
def test_float16_overflows_without_the_guard_and_is_close_to_float32_with_it():
    model, twin = overflowing_model(), overflowing_model(log2_scale=0)
    ids = lm.random_ids(2, 17)
    reference = model(ids).logits
    torch.testing.assert_close(twin(ids).logits, reference, rtol=0, atol=1e-3)  # the scale-up: only LayerNorm epsilon
    assert not in_float16(model, rescale_every=0)(ids).logits.isfinite().all()
    guarded = in_float16(model)(ids).logits
    assert guarded.isfinite().all()
    # Within float16 rounding: no further from float32 than float16 gets on the twin, which never overflows.
    twin_error = max_error(in_float16(twin, rescale_every=0)(ids).logits, twin(ids).logits)
    assert max_error(guarded, reference) <= 1.5 * twin_error


@torch.no_grad()
def test_float16_guard_agrees_with_blinkdls_rescaled_float16(tmp_path, monkeypatch):
    model = overflowing_model()
    torch.save(convert_hf_to_blinkdl(model.state_dict(), model.config), tmp_path / "model.pth")
    ids = lm.random_ids(1, 17)
    reference = model(ids).logits[0]
    monkeypatch.setenv("RWKV_RESCALE_LAYER", "0")
    unscaled, _ = reference_rwkv(tmp_path / "model.pth", "cpu fp16").forward(ids[0].tolist(), None, full_output=True)
    assert not unscaled.isfinite().all()  # the synthetic model overflows BlinkDL's float16 too
    monkeypatch.setenv("RWKV_RESCALE_LAYER", str(EVERY))
    blinkdl, _ = reference_rwkv(tmp_path / "model.pth", "cpu fp16").forward(ids[0].tolist(), None, full_output=True)
    ours = in_float16(model)(ids).logits[0]
    assert blinkdl.isfinite().all() and ours.isfinite().all()
    # Both rescale alike and differ only in float16 rounding order: no further apart than BlinkDL's own error, twice.
    assert max_error(ours, blinkdl) <= 2 * max_error(blinkdl, reference)


@torch.no_grad()
def test_float16_hidden_states_are_returned_at_the_documented_scale():
    twin = overflowing_model(log2_scale=0)
    ids = lm.random_ids(2, 9)
    guarded = in_float16(twin)(ids, output_hidden_states=True)
    plain = in_float16(twin, rescale_every=0)(ids, output_hidden_states=True)
    for i, (scaled, unscaled) in enumerate(zip(guarded.hidden_states, plain.hidden_states, strict=True)):
        # entry 0 holds the embeddings; entry i the output of block i - 1, divided by 2^(i // rescale_every)
        tolerance = 1e-2 * unscaled.abs().max().item()  # float16 rounding, grown through the blocks
        torch.testing.assert_close(scaled * 2 ** (i // EVERY), unscaled, rtol=0, atol=tolerance)
    assert not torch.equal(guarded.hidden_states[-1], plain.hidden_states[-1])  # the guard did rescale


@torch.no_grad()
@pytest.mark.parametrize("dtype, training", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)])
def test_float32_bfloat16_and_training_are_bit_identical_with_the_guard_on_or_off(dtype, training):
    twin = overflowing_model(log2_scale=0).to(dtype).train(training)
    ids = lm.random_ids(2, 9)
    on = twin(ids, output_hidden_states=True)
    twin.config.rescale_every = 0
    off = twin(ids, output_hidden_states=True)
    assert torch.equal(on.logits, off.logits)
    assert all(torch.equal(a, b) for a, b in zip(on.hidden_states, off.hidden_states, strict=True))


@torch.no_grad()
def test_float16_autocast_turns_the_guard_on():
    model = overflowing_model()
    ids = lm.random_ids(1, 9)
    with torch.autocast("cpu", dtype=torch.float16):
        guarded = model(ids).logits
        model.config.rescale_every = 0
        unguarded = model(ids).logits
    assert not unguarded.isfinite().all()
    assert guarded.isfinite().all()
    model.config.rescale_every = EVERY
    torch.testing.assert_close(guarded, model(ids).logits, rtol=0, atol=0.05)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch"])  # the compiled kernel where it builds, and the torch forms
def test_float16_cached_decode_equals_full_recompute_under_the_guard(backend, monkeypatch):
    monkeypatch.setenv("VISUALRWKV_WKV_BACKEND", backend)
    model = in_float16(overflowing_model())
    ids = lm.random_ids(2, 17)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :5], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(5, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
    assert full.isfinite().all()
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-2)


@torch.no_grad()
def test_float16_generate_leaves_the_weights_and_saves_them_unchanged(tmp_path):
    model = in_float16(overflowing_model())
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = lm.random_ids(1, 6)
    generated = model.generate(
        ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    assert all(scores.isfinite().all() for scores in generated.scores)
    recomputed = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(generated.sequences, recomputed)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert loaded.config.rescale_every == EVERY
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in weights.items())
    again = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(again, generated.sequences)


@torch.no_grad()
def test_lora_on_the_output_projections_under_the_guard_and_its_merge():
    peft_model = get_peft_model(overflowing_model(), LoraConfig(r=2, target_modules=["att_output", "ffn_value"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.05)  # as if trained (lora_B starts at zero)
    ids = lm.random_ids(2, 9)
    reference = peft_model.eval()(input_ids=ids).logits
    half = peft_model.half()
    config = half.base_model.model.config
    config.rescale_every = 0
    assert not half(input_ids=ids).logits.isfinite().all()
    config.rescale_every = EVERY
    # The guard scales the inputs of att_output / ffn_value, which reach the adapter's path too.
    adapted = half(input_ids=ids).logits
    assert adapted.isfinite().all()
    torch.testing.assert_close(adapted, reference, rtol=0, atol=5e-2)
    layer = half.base_model.model.model.blocks[-1].feed_forward.ffn_value
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    merged = half.merge_and_unload()
    assert torch.equal(merged.model.blocks[-1].feed_forward.ffn_value.weight, expected)  # guard never in the weights
    torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=5e-2)


# ---------------------------------------------------------------------------------------------- VisualRWKV


@torch.no_grad()
@pytest.mark.parametrize("scan_mode", ["bidirectional", "multidirectional"])
def test_visualrwkv_float16_guard_with_image_scanning_and_cache(scan_mode):
    torch.manual_seed(0)
    config = vlm.tiny_config(scan_mode=scan_mode)
    config.text_config.num_hidden_layers = 8
    config.text_config.rescale_every = EVERY
    config.text_config.initializer_range = 0.02
    model = vlm.VisualRWKVForConditionalGeneration(config).eval()
    grow_residual(model.model.language_model)
    ids, pixel_values = vlm.prompt(3, 9, 17), vlm.images(1)
    reference = model(ids, pixel_values=pixel_values).logits
    half = copy.deepcopy(model).half()
    half.config.text_config.rescale_every = 0
    assert not half(ids, pixel_values=pixel_values.half()).logits.isfinite().all()
    half.config.text_config.rescale_every = EVERY
    full = half(ids, pixel_values=pixel_values.half(), use_cache=False).logits
    assert full.isfinite().all()
    torch.testing.assert_close(full, reference, rtol=0, atol=5e-2)
    split = 3 + 17 + 2  # the prefill holds the whole image span
    out = half(ids[:, :split], pixel_values=pixel_values.half(), use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(split, ids.shape[1]):
        out = half(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=2e-2)
