import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from visualrwkv_hf import Rwkv6Config, Rwkv6ForCausalLM, Rwkv6Model

VOCAB = 97


def tiny_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, head_size=8, time_mix_extra_dim=4,
        time_decay_extra_dim=6, initializer_range=0.3, wkv_chunk_size=4,
    )
    kwargs.update(overrides)
    return Rwkv6Config(**kwargs)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Rwkv6ForCausalLM(tiny_config(**overrides)).eval()
    # Random data-dependent LoRAs, so token shift and decay really depend on the input.
    with torch.no_grad():
        for block in model.model.blocks:
            for p in (block.attention.time_maa_w1, block.attention.time_decay_w1):
                p.normal_(0, 0.3)
    return model


def random_ids(batch, length, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch"])  # the compiled kernel where it builds, and the torch forms
@pytest.mark.parametrize("split", [1, 5, 13])
def test_cached_decode_equals_full_recompute(split, backend, monkeypatch):
    monkeypatch.setenv("VISUALRWKV_WKV_BACKEND", backend)
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


@torch.no_grad()
def test_greedy_generate_cached_equals_uncached():
    model = tiny_model()
    ids = random_ids(2, 10)
    cached = model.generate(ids, max_new_tokens=12, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (2, 22)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_sampling_cached_equals_uncached_with_same_seed():
    model = tiny_model()
    ids = random_ids(2, 6)
    torch.manual_seed(123)
    cached = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.3)
    torch.manual_seed(123)
    uncached = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.3, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_beam_search_cached_equals_uncached():
    model = tiny_model()
    ids = random_ids(2, 7)
    kwargs = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    cached = model.generate(ids, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 15)
    assert torch.equal(cached, uncached)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_left_padded_batch_generates_what_each_row_generates_alone(backend, monkeypatch):
    monkeypatch.setenv("VISUALRWKV_WKV_BACKEND", backend)
    model = tiny_model()
    rows = [random_ids(1, n, seed=n)[0] for n in (11, 4, 8)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batch[i, width:], alone[0, len(row) :])


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
        torch.testing.assert_close(b.recurrent_states[0], a.recurrent_states[0], rtol=1e-4, atol=1e-5)
        for idx in (0, 1):
            torch.testing.assert_close(b.conv_states[idx], a.conv_states[idx], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_generate_from_inputs_embeds_equals_input_ids():
    model = tiny_model()
    ids = random_ids(1, 9)
    from_ids = model.generate(ids, max_new_tokens=8, do_sample=False)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(from_embeds[0], from_ids[0, 9:])


@torch.no_grad()
def test_assisted_decoding_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="stateful"):
        model.generate(random_ids(1, 4), assistant_model=tiny_model(seed=1), max_new_tokens=3)


@torch.no_grad()
def test_logits_to_keep_and_hidden_states():
    model = tiny_model()
    ids = random_ids(1, 7)
    out = model(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == 1 + 3 and out.logits.dtype == torch.float32
    torch.testing.assert_close(model(ids, logits_to_keep=2, use_cache=False).logits, out.logits[:, -2:])
    as_tuple = model(ids, use_cache=False, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits)


def test_loss_is_shifted_cross_entropy_and_honours_num_items_in_batch():
    model = tiny_model()
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    summed = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss, summed / 40)
    assert model.training is False or out.cache is None


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = random_ids(2, 9)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_mode_builds_no_cache():
    model = tiny_model().train()
    assert model(random_ids(1, 5)).cache is None


def test_distinct_linear_names_let_peft_target_mixers_apart():
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in tiny_model().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"att_receptance", "att_key", "att_value", "att_gate", "att_output",
                     "ffn_key", "ffn_receptance", "ffn_value", "lm_head"}
    time_mix_only = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["att_key", "att_value"]))
    adapted = {n for n, _ in time_mix_only.named_parameters() if "lora_A" in n}
    assert adapted and all(".attention.att_key" in n or ".attention.att_value" in n for n in adapted)
    everything = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n for n, _ in everything.named_parameters() if "lora_A" in n}
    assert any("feed_forward.ffn_value" in n for n in adapted) and not any("lm_head" in n for n in adapted)


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is Rwkv6ForCausalLM
    ids = random_ids(2, 9)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    base = Rwkv6Model.from_pretrained(tmp_path)
    torch.testing.assert_close(base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0)


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

    from visualrwkv_hf import RwkvWorldTokenizer

    tokenizer = RwkvWorldTokenizer()
    model = tiny_model(vocab_size=65536)
    inputs = tokenizer("User: hi\n\nAssistant:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out[0, inputs.input_ids.shape[1] :]).rstrip("\n")


@torch.no_grad()
def test_generation_stops_at_the_eos_token():
    model = tiny_model()
    ids = random_ids(1, 5)
    free = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, 5:].tolist()
    stop = free[3]
    stopped = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=stop)[0, 5:].tolist()
    assert stopped == free[: free.index(stop) + 1]


# ---------------------------------------------------------------------------------------------- the cache contract


# float32 rounding between a row alone and in a batch: their linear layers see different row counts, which run
# different kernels (DecodeLinear's for a few rows, MKL's GEMM for many) summing in different orders
LAYOUT_TOL = 3e-5


def greedy(model, ids, max_new_tokens=6, **kwargs):
    """Greedy generation with the per-step logits and the cache returned."""
    return model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
        **kwargs,
    )


def assert_same_generation(reused, fresh, tol=LAYOUT_TOL):
    assert torch.equal(reused.sequences, fresh.sequences)
    for reused_logits, fresh_logits in zip(reused.logits, fresh.logits, strict=True):
        torch.testing.assert_close(reused_logits, fresh_logits, rtol=tol, atol=tol)


def left_padded(rows):
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def laid_out(rows, layouts):
    """A batch of `rows` laid out by `layouts`, one string per row: "r" the row's next token, "p" padding (id 0)."""
    ids = torch.zeros(len(rows), len(layouts[0]), dtype=torch.long)
    mask = torch.tensor([[char == "r" for char in layout] for layout in layouts], dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, mask[i].bool()] = row
    return ids, mask


def row_states(cache, i):
    """A copy of row `i` of every state a cache holds (per block, both token-shift vectors and the WKV state): the
    cache is updated in place."""
    return [
        state[i].clone() for layer in cache.layers for state in (*layer.conv_states.values(), layer.recurrent_states[0])
    ]


def assert_padding_anywhere_is_exact(model, first_layouts, second_layouts, decode_steps=3):
    """
    A batch whose rows are padded anywhere (left, middle, right), then a second call continuing its cache with rows
    padded differently, then one-token decode steps: at every real position each row's logits, and after every call
    each row's cache (both token shifts and the WKV state), equal those of the row run alone without padding.
    """
    batch = len(first_layouts)
    calls = []
    for seed, layouts in enumerate((first_layouts, second_layouts)):
        rows = [random_ids(1, layout.count("r"), seed=10 * seed + i)[0] for i, layout in enumerate(layouts)]
        calls.append((rows, *laid_out(rows, layouts)))
    steps = random_ids(batch, decode_steps, seed=99)

    cache, past_mask, batched = None, torch.zeros(batch, 0, dtype=torch.long), []
    for _, ids, mask in calls:
        past_mask = torch.cat([past_mask, mask], 1)  # the mask covering the cached positions too, as generate's
        out = model(ids, attention_mask=past_mask, cache=cache, use_cache=True)
        cache = out.cache
        batched.append((out.logits, [row_states(cache, i) for i in range(batch)]))
    step_logits = [model(steps[:, t : t + 1], cache=cache).logits[:, 0] for t in range(decode_steps)]

    for i in range(batch):
        alone_cache = None
        for (rows, _, mask), (logits, states) in zip(calls, batched, strict=True):
            out = model(rows[i][None], cache=alone_cache, use_cache=True)
            alone_cache = out.cache
            torch.testing.assert_close(logits[i, mask[i].bool()], out.logits[0], rtol=1e-5, atol=LAYOUT_TOL)
            for padded_state, alone_state in zip(states[i], row_states(alone_cache, 0), strict=True):
                torch.testing.assert_close(padded_state, alone_state, rtol=1e-4, atol=1e-4)
        for t in range(decode_steps):
            alone = model(steps[i : i + 1, t : t + 1], cache=alone_cache).logits[0, 0]
            torch.testing.assert_close(step_logits[t][i], alone, rtol=1e-5, atol=1e-5)


# Rows padded in the middle and at the end, on the left, on the right, all over
FIRST_LAYOUTS = ("rrpprrrpp", "pprrrrrrr", "rrrrrpppp", "prprprrpr")
# Prompts for generate, which picks the first new token from the last column's logits: that column is real
PROMPT_LAYOUTS = ("rrpprrrrr", "pprrrrrrr", "rrrrrpppr", "prprprrpr")
# (first call, second call) layouts: padding within the first call; left padding only (exact before padding could
# lie anywhere) followed by a left-padded continuation (follow-ups of different lengths); both calls padded anywhere
PADDED_CALLS = {
    "within_a_call": (FIRST_LAYOUTS, ("rrr",) * 4),
    "continuing_a_cache": (("pprrrrrrr", "rrrrrrrrr", "pppprrrrr", "ppppppprr"), ("pprr", "rrrr", "prrr", "pppr")),
    "both": (FIRST_LAYOUTS, ("pprr", "rrrr", "rprp", "prpr")),
}


@torch.no_grad()
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("calls", PADDED_CALLS)
def test_padding_anywhere_in_a_row_or_between_calls_is_exact(calls, backend, monkeypatch):
    monkeypatch.setenv("VISUALRWKV_WKV_BACKEND", backend)
    assert_padding_anywhere_is_exact(tiny_model(), *PADDED_CALLS[calls])


@torch.no_grad()
def test_padded_steps_after_real_tokens_leave_the_wkv_state_untouched():
    # A padded step's input is zero but its token shift holds the last real token, so its key would not be zero:
    # the key is masked with the decay, and the WKV state passes padded steps bit for bit.
    model = tiny_model()
    ids = random_ids(1, 9)
    cache = model(ids[:, :5]).cache
    before = [layer.recurrent_states[0].clone() for layer in cache.layers]
    model(ids[:, 5:], attention_mask=torch.zeros(1, 9, dtype=torch.long), cache=cache)
    for layer, state in zip(cache.layers, before):
        torch.testing.assert_close(layer.recurrent_states[0], state, rtol=0, atol=0)


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
            torch.testing.assert_close(batch_logits[i], alone_logits[0], rtol=1e-5, atol=LAYOUT_TOL)


@torch.no_grad()
def test_the_cache_counts_every_position_it_has_seen_padding_included():
    model = tiny_model()
    ids, mask = left_padded([random_ids(1, 7)[0], random_ids(1, 3, seed=2)[0]])
    cache = model(ids, attention_mask=mask, use_cache=True).cache
    assert cache.get_seq_length() == 7
    for token in range(3):
        model(torch.full((2, 1), token + 1), cache=cache)
    model(random_ids(2, 4), cache=cache)
    assert cache.get_seq_length() == 7 + 3 + 4
    assert all(layer.get_seq_length() == 14 for layer in cache.layers)


@torch.no_grad()
def test_generate_builds_the_cache_and_returns_it_counted():
    model = tiny_model()
    assert model._supports_default_dynamic_cache()
    out = greedy(model, random_ids(2, 9))
    assert isinstance(out.cache, DynamicCache)
    # every position but the last generated token has been fed
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1


@torch.no_grad()
def test_prompt_reuse_with_a_copied_cache_equals_a_fresh_generate():
    model = tiny_model()
    prefix = random_ids(1, 9)
    prefix_cache = model(prefix).cache  # prefilled once
    for seed in (3, 4):  # two different continuations of the same prefix
        prompt = torch.cat([prefix, random_ids(1, 5, seed=seed)], 1)
        assert_same_generation(greedy(model, prompt, cache=copy.deepcopy(prefix_cache)), greedy(model, prompt))
    assert prefix_cache.get_seq_length() == 9  # the copies were used, not the original


@torch.no_grad()
def test_prompt_reuse_in_a_left_padded_batch_equals_a_fresh_generate():
    model = tiny_model()
    ids, mask = left_padded([random_ids(1, 8)[0], random_ids(1, 3, seed=2)[0], random_ids(1, 6, seed=3)[0]])
    prefix_cache = model(ids, attention_mask=mask).cache
    prompt = torch.cat([ids, random_ids(3, 4, seed=5)], 1)
    prompt_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    reused = greedy(model, prompt, attention_mask=prompt_mask, cache=copy.deepcopy(prefix_cache))
    assert_same_generation(reused, greedy(model, prompt, attention_mask=prompt_mask))
    # padding between the cached prefix and the new tokens (rows with follow-ups of different lengths) is exact too
    gap_mask = prompt_mask.clone()
    gap_mask[1, ids.shape[1] : ids.shape[1] + 2] = 0
    reused = greedy(model, prompt, attention_mask=gap_mask, cache=copy.deepcopy(prefix_cache))
    assert_same_generation(reused, greedy(model, prompt, attention_mask=gap_mask))
    # ... and the row with the gap generates what its real tokens generate alone
    row = prompt[1, gap_mask[1].bool()][None]
    alone = greedy(model, row)
    assert torch.equal(reused.sequences[1, prompt.shape[1] :], alone.sequences[0, row.shape[1] :])
    for reused_logits, alone_logits in zip(reused.logits, alone.logits, strict=True):
        torch.testing.assert_close(reused_logits[1], alone_logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_the_returned_cache_continues_a_conversation_exactly():
    model = tiny_model()
    conversation, cache = random_ids(1, 7), None
    for turn in range(3):
        out = greedy(model, conversation, cache=cache)
        if cache is not None:
            assert_same_generation(out, greedy(model, conversation))
        # the answer (the last token is not in the cache yet), then the next question
        conversation, cache = torch.cat([out.sequences, random_ids(1, 4, seed=10 + turn)], 1), out.cache


@torch.no_grad()
def test_a_consumed_cache_is_refused():
    model = tiny_model()
    prompt = random_ids(1, 8)
    cache = model(prompt[:, :5]).cache
    model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)  # updates `cache` in place
    with pytest.raises(ValueError, match=r"already seen 11 positions, but the prompt has 8.*copy.deepcopy"):
        model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False)


@torch.no_grad()
def test_a_cache_without_recurrent_layers_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"one recurrent `LinearAttentionLayer` per block \(3\).*0 layers"):
        model(random_ids(1, 4), cache=DynamicCache())
    with pytest.raises(ValueError, match="per block"):
        model(random_ids(1, 4), cache=DynamicCache(config=tiny_config(num_hidden_layers=2)))


@torch.no_grad()
def test_beam_search_from_a_cache_needs_its_rows_repeated():
    model = tiny_model()
    ids = random_ids(1, 12)
    cache = model(ids[:, :7]).cache
    beams = dict(max_new_tokens=4, num_beams=3, do_sample=False)
    expected = r"holds 1 rows, this call 3.*reorder_cache\(torch.arange\(1\).repeat_interleave\(3\)\)"
    with pytest.raises(ValueError, match=expected):
        model.generate(ids, cache=copy.deepcopy(cache), **beams)
    cache.reorder_cache(torch.arange(1).repeat_interleave(3))
    assert torch.equal(model.generate(ids, cache=cache, **beams), model.generate(ids, **beams))


def test_a_cache_filled_under_inference_mode_gets_a_clear_error_outside_it():
    model = tiny_model()
    ids = random_ids(1, 9)
    with torch.inference_mode():
        cache = model(ids[:, :5]).cache
    with pytest.raises(ValueError, match=r"filled under `torch.inference_mode\(\)`.*copy.deepcopy"):
        model.generate(ids, cache=cache, max_new_tokens=2)
    reused = greedy(model, ids, cache=copy.deepcopy(cache))  # a copy holds ordinary tensors
    with torch.inference_mode():
        assert_same_generation(greedy(model, ids, cache=cache), reused)
    assert_same_generation(reused, greedy(model, ids))


@torch.no_grad()
def test_past_key_values_works_exactly_as_cache():
    model = tiny_model()
    ids = random_ids(2, 11)
    with pytest.warns(FutureWarning, match="past_key_values"):
        cache = model(ids[:, :6], past_key_values=DynamicCache(config=model.config)).cache
    with pytest.warns(FutureWarning, match="past_key_values"):
        as_past = model(ids[:, 6:], past_key_values=copy.deepcopy(cache))
    as_cache = model(ids[:, 6:], cache=copy.deepcopy(cache))
    torch.testing.assert_close(as_past.logits, as_cache.logits, rtol=0, atol=0)
    torch.testing.assert_close(as_past.logits, model(ids).logits[:, 6:], rtol=1e-5, atol=1e-5)
    with pytest.warns(FutureWarning, match="cache_params"):
        assert model.model(ids[:, 6:], cache_params=copy.deepcopy(cache)).cache.get_seq_length() == 11
    with pytest.warns(FutureWarning, match="past_key_values"):
        reused = greedy(model, ids, past_key_values=copy.deepcopy(cache))
    assert_same_generation(reused, greedy(model, ids))


@torch.no_grad()
def test_prompt_lookup_decoding_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="stateful.*cannot be rolled back"):
        model.generate(random_ids(1, 8), prompt_lookup_num_tokens=2, max_new_tokens=3)
