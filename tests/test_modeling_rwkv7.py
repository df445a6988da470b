import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from visualrwkv_hf import Rwkv7ForCausalLM, Rwkv7Model, RwkvWorldTokenizer, lora_config
from visualrwkv_hf.convert_rwkv7 import convert_blinkdl_to_hf
from visualrwkv_hf.ops import wkv7_reference
from visualrwkv_hf.remote_code import add_remote_code

from rwkv7_reference import tiny_checkpoint
from test_modeling_rwkv6 import (
    PADDED_CALLS,
    PROMPT_LAYOUTS,
    assert_padding_anywhere_is_exact,
    assert_same_generation,
    greedy,
    laid_out,
    left_padded,
)

VOCAB = 97


def tiny_model(seed=0, vocab_size=VOCAB, chunk_size=4) -> Rwkv7ForCausalLM:
    """3 blocks of 32 (4 heads of 8) with trained-like random weights (every LoRA matters); chunks of 4 so that
    sequences span several chunks of the chunked WKV7 form."""
    config, state_dict = convert_blinkdl_to_hf(tiny_checkpoint(seed=seed, vocab_size=vocab_size), "float32")
    config.wkv_chunk_size = chunk_size
    model = Rwkv7ForCausalLM(config)
    model.load_state_dict(state_dict)
    return model.eval()


def random_ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 5, 13])
def test_cached_decode_equals_full_recompute(split):
    model = tiny_model()
    ids = random_ids(2, 17)
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :split], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(split, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        assert out.cache is cache
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_time_mix_equals_the_block_math_with_the_float64_wkv7_reference():
    """An independent restatement of the x070 time-mix (BlinkDL's formulas, BlinkDL's value-major WKV state through
    the float64 reference) against the layer, on block 1 (which has the value residual)."""
    model = tiny_model()
    attention = model.model.blocks[1].attention
    x, v_first = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    ours, _ = attention(x, v_first)

    p = {name: t.double() for name, t in attention.named_parameters()}
    x, v_first = x.double(), v_first.double()
    xx = torch.nn.functional.pad(x, (0, 0, 1, -1)) - x
    xr, xw, xk, xv, xa, xg = (x + xx * p[f"x_{s}"] for s in "rwkvag")
    r, k, v = xr @ p["att_receptance.weight"].T, xk @ p["att_key.weight"].T, xv @ p["att_value.weight"].T
    w = -torch.nn.functional.softplus(-(p["w0"] + torch.tanh(xw @ p["w1"]) @ p["w2"])) - 0.5
    a = torch.sigmoid(p["a0"] + (xa @ p["a1"]) @ p["a2"])
    g = torch.sigmoid(xg @ p["g1"]) @ p["g2"]
    v = v + (v_first - v) * torch.sigmoid(p["v0"] + (xv @ p["v1"]) @ p["v2"])
    kk = torch.nn.functional.normalize((k * p["k_k"]).view(2, 9, 4, 8), dim=-1).view(2, 9, 32)
    k = k * (1 + (a - 1) * p["k_a"])
    heads = lambda t: t.view(2, 9, 4, 8)  # noqa: E731
    y, _ = wkv7_reference(heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a))
    y = torch.nn.functional.group_norm(y.reshape(18, 32), 4, p["ln_x.weight"], p["ln_x.bias"], 6.4e-4).view(2, 9, 32)
    y = y + ((r * k * p["r_k"].view(32)).view(2, 9, 4, 8).sum(-1, keepdim=True) * v.view(2, 9, 4, 8)).view(2, 9, 32)
    expected = (y * g) @ p["att_output.weight"].T
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_value_residual_reaches_later_blocks_and_block_0_has_none():
    model = tiny_model()
    assert not any(hasattr(model.model.blocks[0].attention, name) for name in ("v0", "v1", "v2"))
    assert all(hasattr(block.attention, "v2") for block in model.model.blocks[1:])
    ids = random_ids(1, 6)
    hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # v-first is block 0's value: changing block 1's residual weight towards it changes block 1's output
    model.model.blocks[1].attention.v0.add_(3.0)
    changed = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(changed[1], hidden[1], rtol=0, atol=0)
    assert not torch.allclose(changed[2], hidden[2])


@torch.no_grad()
def test_forward_creates_recurrent_cache_with_constant_size():
    model = tiny_model()
    cache = model(random_ids(1, 9), use_cache=True).cache
    assert isinstance(cache, DynamicCache) and len(cache.layers) == 3
    sizes = [[t.shape for t in (*layer.conv_states.values(), layer.recurrent_states[0])] for layer in cache.layers]
    for token in range(20):
        model(torch.tensor([[token + 1]]), cache=cache, use_cache=True)
    assert [[t.shape for t in (*layer.conv_states.values(), layer.recurrent_states[0])] for layer in cache.layers] == sizes
    layer = cache.layers[0]
    assert layer.conv_states[0].shape == layer.conv_states[1].shape == (1, 32, 1)
    assert layer.recurrent_states[0].shape == (1, 4, 8, 8) and layer.recurrent_states[0].dtype == torch.float32
    assert cache.get_seq_length() == 29


@torch.no_grad()
def test_greedy_sampling_and_beam_search_cached_equal_uncached():
    model = tiny_model()
    ids = random_ids(2, 10)
    cached = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert cached.shape == (2, 22)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False))
    sampling = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=1.3)
    torch.manual_seed(123)
    cached = model.generate(ids, **sampling)
    torch.manual_seed(123)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **sampling))
    beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    cached = model.generate(ids, **beams)
    assert cached.shape == (4, 18) and torch.equal(cached, model.generate(ids, use_cache=False, **beams))


@torch.no_grad()
def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_model()
    rows = [random_ids(1, n, seed=n)[0] for n in (11, 4, 8)]
    ids, mask = left_padded(rows)
    batch = greedy(model, ids, attention_mask=mask, max_new_tokens=10)
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], max_new_tokens=10)
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(row) :])
        for batch_logits, alone_logits in zip(batch.logits, alone.logits, strict=True):
            torch.testing.assert_close(batch_logits[i], alone_logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padding_leaves_state_and_logits_of_real_tokens_untouched():
    model = tiny_model()
    row = random_ids(1, 6)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    alone = model(row, use_cache=True)
    with_pad = model(padded, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(with_pad.logits[:, 5:], alone.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(alone.cache.layers, with_pad.cache.layers):
        torch.testing.assert_close(b.recurrent_states[0], a.recurrent_states[0], rtol=1e-5, atol=1e-5)
        for idx in (0, 1):
            torch.testing.assert_close(b.conv_states[idx], a.conv_states[idx], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_padded_steps_after_real_tokens_leave_the_wkv_state_untouched():
    # Padding in the middle of a row (a cached prefix, then a left-padded follow-up): the key, the delta-rule update
    # and the decay are all masked, so the WKV state passes a padded step unchanged whatever the token shift holds.
    model = tiny_model()
    ids = random_ids(1, 9)
    cache = model(ids[:, :5]).cache
    before = [layer.recurrent_states[0].clone() for layer in cache.layers]
    model(ids[:, 5:], attention_mask=torch.zeros(1, 9, dtype=torch.long), cache=cache)
    for layer, state in zip(cache.layers, before):
        torch.testing.assert_close(layer.recurrent_states[0], state, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("calls", PADDED_CALLS)
def test_padding_anywhere_in_a_row_or_between_calls_is_exact(calls):
    assert_padding_anywhere_is_exact(tiny_model(), *PADDED_CALLS[calls])


@torch.no_grad()
def test_generate_from_rows_padded_anywhere_equals_each_row_alone():
    model = tiny_model()
    rows = [random_ids(1, layout.count("r"), seed=i)[0] for i, layout in enumerate(PROMPT_LAYOUTS)]
    ids, mask = laid_out(rows, PROMPT_LAYOUTS)
    batch = greedy(model, ids, attention_mask=mask)
    for i, row in enumerate(rows):
        alone = greedy(model, row[None])
        assert torch.equal(batch.sequences[i, ids.shape[1] :], alone.sequences[0, len(row) :])
        for batch_logits, alone_logits in zip(batch.logits, alone.logits, strict=True):
            torch.testing.assert_close(batch_logits[i], alone_logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_from_inputs_embeds_equals_input_ids():
    model = tiny_model()
    ids = random_ids(1, 9)
    from_ids = model.generate(ids, max_new_tokens=8, do_sample=False)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds[0], from_ids[0, 9:])


@torch.no_grad()
def test_prompt_reuse_with_a_copied_cache_equals_a_fresh_generate():
    model = tiny_model()
    prefix = random_ids(1, 9)
    prefix_cache = model(prefix).cache
    for seed in (3, 4):
        prompt = torch.cat([prefix, random_ids(1, 5, seed=seed)], 1)
        assert_same_generation(greedy(model, prompt, cache=copy.deepcopy(prefix_cache)), greedy(model, prompt))
    assert prefix_cache.get_seq_length() == 9


@torch.no_grad()
def test_the_cache_contract_is_enforced():
    model = tiny_model()
    prompt = random_ids(1, 8)
    cache = model(prompt[:, :5]).cache
    model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match=r"already seen 11 positions, but the prompt has 8"):
        model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match=r"one recurrent `LinearAttentionLayer` per block \(3\)"):
        model(prompt, cache=DynamicCache())
    with pytest.raises(ValueError, match="stateful"):
        model.generate(prompt, assistant_model=tiny_model(seed=1), max_new_tokens=3)


@torch.no_grad()
def test_logits_to_keep_hidden_states_and_tuples():
    model = tiny_model()
    ids = random_ids(1, 7)
    out = model(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == 1 + 3 and out.logits.dtype == torch.float32
    torch.testing.assert_close(model(ids, logits_to_keep=2, use_cache=False).logits, out.logits[:, -2:])
    torch.testing.assert_close(model(ids, use_cache=False, return_dict=False)[0], out.logits)


def test_loss_is_shifted_cross_entropy():
    model = tiny_model()
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)


def test_gradients_reach_every_parameter_and_checkpointing_keeps_them():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = random_ids(2, 9)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    # every parameter but the embedding rows of tokens not in the batch takes part
    assert grads[0].keys() == grads[1].keys() == {n for n, _ in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_mode_builds_no_cache():
    assert tiny_model().train()(random_ids(1, 5)).cache is None


@pytest.mark.parametrize(
    "preset, modules",
    [
        ("time_mix", {"att_receptance", "att_key", "att_value", "att_output"}),
        ("channel_mix", {"ffn_key", "ffn_value"}),
        ("language_model", {"att_receptance", "att_key", "att_value", "att_output", "ffn_key", "ffn_value"}),
    ],
)
def test_lora_presets_adapt_the_rwkv7_linears(preset, modules):
    from peft import get_peft_model

    model = get_peft_model(tiny_model(), lora_config(preset, r=2))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == modules
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    # one optimiser step on the adapters changes the model's output
    ids = random_ids(2, 8)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    model.train()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: the first step only moves it
            torch.nn.init.normal_(p, std=0.01)
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        assert not torch.allclose(model.eval()(ids, use_cache=False).logits, before)


@torch.no_grad()
def test_save_and_load_round_trip_through_the_auto_classes(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    RwkvWorldTokenizer().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is Rwkv7ForCausalLM
    ids = random_ids(2, 9)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is Rwkv7Model
    torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is RwkvWorldTokenizer


@torch.no_grad()
def test_bfloat16_model_keeps_state_in_float32():
    model = tiny_model().to(torch.bfloat16)
    ids = random_ids(1, 6)
    out = model(ids, use_cache=True)
    assert out.cache.layers[0].recurrent_states[0].dtype == torch.float32
    reference = tiny_model()(ids, use_cache=False).logits
    assert (out.logits - reference).abs().max() < 0.1 * reference.abs().max()


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=None)
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_ids(2, 4), attention_mask=torch.ones(3, 4))


@torch.no_grad()
def test_text_streamer_prints_what_generate_returns(capsys):
    from transformers import TextStreamer

    tokenizer = RwkvWorldTokenizer()
    model = tiny_model(vocab_size=65536)
    inputs = tokenizer("User: hi\n\nAssistant:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out[0, inputs.input_ids.shape[1] :]).rstrip("\n")


REMOTE = r"""
import os, sys
sys.path[:] = [entry for entry in sys.path if not os.path.isdir(os.path.join(entry, "visualrwkv_hf"))]
try:
    import visualrwkv_hf
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("visualrwkv_hf is still importable")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, output = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)("User: hi\n\nAssistant:", return_tensors="pt").input_ids
with torch.no_grad():
    torch.save({"class": type(model).__name__, "ids": ids, "logits": model(ids).logits}, output)
"""


@torch.no_grad()
def test_a_folder_with_remote_code_loads_without_the_package(tmp_path):
    model = tiny_model(vocab_size=65536)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    RwkvWorldTokenizer().save_pretrained(folder)
    add_remote_code(folder)
    env_free = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE, str(folder), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert env_free.returncode == 0, env_free.stderr
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert result["class"] == "Rwkv7ForCausalLM"
    torch.testing.assert_close(result["logits"], model(result["ids"]).logits, rtol=0, atol=0)
