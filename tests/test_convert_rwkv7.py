"""The RWKV-7 converter, and the converted model against BlinkDL's `rwkv` package (RWKV_V7_ON=1, in a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from visualrwkv_hf import Rwkv6ForCausalLM, Rwkv7ForCausalLM
from visualrwkv_hf.cli import main
from visualrwkv_hf.convert_rwkv7 import (
    convert_blinkdl_to_hf,
    convert_hf_to_blinkdl,
    convert_rwkv7_checkpoint,
    export_rwkv7_checkpoint,
    rwkv7_config_from_state_dict,
    rwkv7_parameters,
)

from rwkv6_reference import save_checkpoint
from rwkv6_reference import tiny_checkpoint as tiny_rwkv6_checkpoint
from rwkv7_reference import random_blinkdl_rwkv7, run_reference, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "conversion" / "convert_rwkv7_to_hf.py"
PROMPT_LENGTH = 100
NEW_TOKENS = 32
# fp32 against the oracle: max |difference| / max |reference|.
TOLERANCE = 1e-4

# (hidden_size, head_size, layers, LoRA ranks decay/a/v/gate): the fixed ranks of files trained before 2025-02 with
# 2 heads of 64, and small formula-like ranks with 4 heads of 16.
SHAPES = {"C128-fixed-ranks": (128, 64, 3, (64, 64, 32, 128)), "C64-4heads": (64, 16, 4, (32, 24, 16, 40))}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


class Converted(NamedTuple):
    checkpoint: Path
    output: Path
    model: Rwkv7ForCausalLM
    prompt: list[int]
    reference: dict  # see run_reference


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def converted(request, tmp_path_factory):
    """A random checkpoint of one shape, the oracle's run over a prompt and 32 greedy tokens, and our model."""
    C, N, L, ranks = SHAPES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    checkpoint = save_checkpoint(random_blinkdl_rwkv7(C, N, L, ranks=ranks, seed=C), directory / "model.pth")
    output = convert_rwkv7_checkpoint(checkpoint, directory / "hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    prompt = torch.randint(1, 65530, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(C)).tolist()
    return Converted(checkpoint, output, model, prompt, run_reference(checkpoint, prompt, greedy_tokens=NEW_TOKENS))


def assert_states_match(cache, reference_state, tolerance=TOLERANCE):
    # The oracle's state per layer: [last ln1 output (C), WKV matrix (H, N, N) value-major, last ln2 output (C)];
    # our WKV state is key-major, its transpose.
    for i, layer in enumerate(cache.layers):
        assert relative_error(layer.conv_states[0][0, :, -1], reference_state[3 * i]) < tolerance
        assert relative_error(layer.recurrent_states[0][0].transpose(-1, -2), reference_state[3 * i + 1]) < tolerance
        assert relative_error(layer.conv_states[1][0, :, -1], reference_state[3 * i + 2]) < tolerance


@torch.no_grad()
def test_converted_folder_loads_with_auto_classes(converted):
    model, output = converted.model, converted.output
    assert isinstance(model, Rwkv7ForCausalLM) and model.dtype == torch.float32
    assert model.config.model_type == "visualrwkv_rwkv7" and model.config.architectures == ["Rwkv7ForCausalLM"]
    assert model.generation_config.eos_token_id == 261 and model.generation_config.pad_token_id == 0
    assert sorted(p.name for p in output.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "rwkv_vocab_v20230424.txt",
        "tokenizer.json", "tokenizer_config.json",
    ]
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("Assistant: Red\n\n").input_ids == [5585, 41693, 59, 20733, 261]


@torch.no_grad()
def test_prompt_logits_and_state_match_rwkv_package(converted):
    out = converted.model(torch.tensor([converted.prompt]), use_cache=True)
    assert relative_error(out.logits[0], converted.reference["logits"]) < TOLERANCE
    assert_states_match(out.cache, converted.reference["state"])


@torch.no_grad()
def test_greedy_generation_and_decode_state_match_rwkv_package(converted):
    # No stop token: the oracle loop does not stop either.
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    out = converted.model.generate(
        torch.tensor([converted.prompt]), generation_config=generation_config, return_dict_in_generate=True
    )
    assert out.sequences[0, len(converted.prompt) :].tolist() == converted.reference["greedy"].tolist()
    # generate's cache has seen every token but the last; the oracle's state has seen that one too
    converted.model(out.sequences[:, -1:], cache=out.cache)
    assert_states_match(out.cache, converted.reference["greedy_state"])


@torch.no_grad()
def test_bfloat16_conversion_is_close_to_the_rwkv_package(converted, tmp_path):
    output = convert_rwkv7_checkpoint(converted.checkpoint, tmp_path / "bf16", dtype="bfloat16", progress=False)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    assert model.dtype == torch.bfloat16
    out = model(torch.tensor([converted.prompt]), use_cache=True)
    assert out.cache.layers[0].recurrent_states[0].dtype == torch.float32
    reference = converted.reference["logits"]
    assert relative_error(out.logits[0], reference) < 5e-2
    # the top choice agrees wherever the oracle's is clear
    clear = reference.topk(2).values.diff(dim=-1).abs()[:, 0] > 0.02 * reference.abs().max()
    assert clear.sum() > PROMPT_LENGTH // 2
    assert torch.equal(out.logits[0][clear].argmax(-1), reference[clear].argmax(-1))


@torch.no_grad()
def test_the_exported_checkpoint_is_the_original(converted, tmp_path):
    exported = export_rwkv7_checkpoint(converted.output, tmp_path / "exported.pth")
    original, again = torch.load(converted.checkpoint, weights_only=True), torch.load(exported, weights_only=True)
    assert list(again) == list(original)  # BlinkDL's key order
    for key in original:
        assert torch.equal(again[key], original[key]), key
    with pytest.raises(FileExistsError, match="exists"):
        export_rwkv7_checkpoint(converted.output, exported)
    with pytest.raises(ValueError, match=r"must be a \.pth file"):
        export_rwkv7_checkpoint(converted.output, tmp_path / "exported.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported.pth"]


def test_parameter_table_matches_the_model():
    config, _ = convert_blinkdl_to_hf(tiny_checkpoint())
    with torch.device("meta"):
        model = Rwkv7ForCausalLM(config)
    assert {p.hf_key: p.hf_shape for p in rwkv7_parameters(config)} == {
        name: tuple(t.shape) for name, t in model.state_dict().items()
    }


@pytest.mark.parametrize("ranks", [(64, 64, 32, 128), (96, 96, 64, 256), (8, 6, 4, 10)])
def test_config_and_lora_ranks_are_read_from_shapes(ranks):
    config = rwkv7_config_from_state_dict(tiny_checkpoint(ranks=ranks, num_layers=2))
    assert (config.hidden_size, config.num_hidden_layers, config.head_size, config.vocab_size) == (32, 2, 8, 300)
    assert (config.decay_low_rank_dim, config.a_low_rank_dim, config.v_low_rank_dim, config.gate_low_rank_dim) == ranks
    assert config.intermediate_size == 128


def test_block_0_has_no_value_residual_and_a_one_block_model_converts():
    checkpoint = tiny_checkpoint(num_layers=1)
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(checkpoint)
    config, hf = convert_blinkdl_to_hf(checkpoint)
    assert config.num_hidden_layers == 1
    assert not {"model.blocks.0.attention.v0", "model.blocks.0.attention.v1", "model.blocks.0.attention.v2"} & set(hf)


def test_round_trip_blinkdl_to_hf_to_blinkdl_is_identity():
    checkpoint = tiny_checkpoint()
    config, hf = convert_blinkdl_to_hf(checkpoint)
    again = convert_hf_to_blinkdl(hf, config, prefix="rwkv.")
    assert list(again) == [f"rwkv.{k}" for k in checkpoint]
    for key, tensor in checkpoint.items():
        assert torch.equal(again[f"rwkv.{key}"], tensor)


def test_export_rejects_a_state_dict_of_another_model():
    config, hf = convert_blinkdl_to_hf(tiny_checkpoint())
    hf.pop("model.blocks.1.attention.v0")
    with pytest.raises(ValueError, match=r"missing tensors .*'model.blocks.1.attention.v0' \(32,\)"):
        convert_hf_to_blinkdl(hf, config)


@pytest.mark.parametrize(
    "requested, stored, expected",
    [("auto", torch.bfloat16, torch.bfloat16), ("auto", torch.float16, torch.float16),
     ("auto", torch.float32, torch.float32), ("float32", torch.bfloat16, torch.float32)],
)
def test_fp32_bf16_and_fp16_files_convert_keeping_their_precision(requested, stored, expected, tmp_path):
    checkpoint = {k: v.to(stored) for k, v in tiny_checkpoint().items()}
    output = convert_rwkv7_checkpoint(save_checkpoint(checkpoint, tmp_path / "m.pth"), tmp_path / "hf",
                                      dtype=requested, progress=False)
    weights = load_file(output / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {expected}
    assert torch.equal(weights["model.blocks.2.attention.w1"], checkpoint["blocks.2.att.w1"].to(expected))


def rwkv5_like():
    sd = {"emb.weight": torch.zeros(300, 32), "blocks.0.ln0.weight": torch.ones(32)}
    sd.update({f"blocks.0.att.time_mix_{s}": torch.zeros(1, 1, 32) for s in "kvrg"})
    sd.update({"blocks.0.att.time_decay": torch.zeros(4, 8), "blocks.0.att.time_faaaa": torch.zeros(4, 8)})
    return sd


def rwkv4_like():
    sd = {"emb.weight": torch.zeros(300, 32), "blocks.0.ln0.weight": torch.ones(32)}
    sd.update({f"blocks.0.att.time_mix_{s}": torch.zeros(1, 1, 32) for s in "kvr"})
    sd.update({"blocks.0.att.time_decay": torch.zeros(32), "blocks.0.att.time_first": torch.zeros(32)})
    return sd


def with_changes(remove=(), add=None, **overrides):
    checkpoint = tiny_checkpoint(**overrides)
    for key in remove:
        del checkpoint[key]
    checkpoint.update(add or {})
    return checkpoint


BAD_CHECKPOINTS = {
    "rwkv4": (rwkv4_like, r"not an RWKV-7 \(x070\) checkpoint.*RWKV-4 checkpoint"),
    "rwkv5": (rwkv5_like, r"not an RWKV-7 \(x070\) checkpoint.*RWKV-5 \(att.time_faaaa\) checkpoint"),
    "rwkv6": (tiny_rwkv6_checkpoint, r"not an RWKV-7 .*RWKV-6 \(x060\) checkpoint.*convert-rwkv6"),
    "visualrwkv": (
        lambda: {f"rwkv.{k}": v for k, v in tiny_checkpoint().items()}, r"not an RWKV-7 .*full VisualRWKV checkpoint"
    ),
    "rwkv-package-converted": (
        lambda: with_changes(add={"_strategy": "cpu fp32"}), r"not a plain state dict.*'_strategy'"
    ),
    "deep-embed-variant": (
        lambda: with_changes(add={f"blocks.{i}.ffn.s_emb.weight": torch.zeros(300, 32) for i in range(3)}),
        r"DeepEmbed variant .*'blocks.0.ffn.s_emb.weight', 'blocks.1.ffn.s_emb.weight'.*plain x070 block",
    ),
    "block-0-with-value-residual": (
        lambda: with_changes(add={"blocks.0.att.v0": torch.zeros(1, 1, 32), "blocks.0.att.v1": torch.zeros(32, 4)}),
        r"unexpected tensors, not part of such a model: 'blocks.0.att.v0', 'blocks.0.att.v1'",
    ),
    "missing-key": (
        lambda: with_changes(remove=["blocks.1.att.k_a", "ln_out.bias"]),
        r"missing tensors .*'blocks.1.att.k_a' \(1, 1, 32\), 'ln_out.bias' \(32,\)",
    ),
    "lora-rank-differs-in-a-block": (
        lambda: with_changes(add={"blocks.2.att.g1": torch.zeros(32, 12), "blocks.2.att.g2": torch.zeros(12, 32)}),
        r"gate=10.*inconsistent shapes: 'blocks.2.att.g1' is \(32, 12\), expected \(32, 10\)",
    ),
    "heads-do-not-tile-width": (
        lambda: with_changes(add={"blocks.0.att.r_k": torch.zeros(3, 8)}),
        r"'blocks.0.att.r_k' .* is \(3, 8\) = \(heads, head_size\), expected .* hidden_size 32",
    ),
    "integer-tensor": (
        lambda: with_changes(add={"head.weight": torch.zeros(300, 32, dtype=torch.int64)}),
        r"not floating point: 'head.weight' \(torch.int64\)",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_and_nothing_is_written(name, tmp_path):
    make, message = BAD_CHECKPOINTS[name]
    checkpoint = save_checkpoint(make(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        convert_rwkv7_checkpoint(checkpoint, tmp_path / "out" / "hf", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def test_pickled_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "hook": os.system}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_rwkv7_checkpoint(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_script_converts_end_to_end(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    result = run_cli("--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(model, Rwkv7ForCausalLM) and model.dtype == torch.float16 and model.config.num_hidden_layers == 3


def test_cli_script_reports_user_errors_without_traceback(tmp_path):
    bad = save_checkpoint(tiny_rwkv6_checkpoint(), tmp_path / "rwkv6.pth")
    result = run_cli("--checkpoint", str(bad), "--output", str(tmp_path / "hf"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "RWKV-6 (x060) checkpoint" in result.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", ["rwkv6", "rwkv7"])
def test_visualrwkv_convert_tells_the_families_apart_by_their_keys(family, tmp_path, capsys):
    make, expected = (tiny_rwkv6_checkpoint, Rwkv6ForCausalLM) if family == "rwkv6" else (tiny_checkpoint, Rwkv7ForCausalLM)
    checkpoint = save_checkpoint(make(), tmp_path / "model.pth")
    assert main(["convert", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")) is expected
    assert capsys.readouterr().out == f"Wrote {tmp_path / 'hf'}\n"


def test_visualrwkv_convert_refuses_vision_options_for_a_language_model(tmp_path, capsys):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    arguments = ["convert", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--scan-mode", "unidirectional",
                 "--grid-size", "2"]
    assert main(arguments) == 1
    assert capsys.readouterr().err == (
        f"error: {checkpoint} is a plain RWKV-7 language model, which has no vision part: leave out --scan-mode, "
        "--grid-size.\n"
    )
    assert not (tmp_path / "hf").exists()


def test_visualrwkv_convert_with_remote_code_maps_the_rwkv7_classes(tmp_path):
    import json

    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    output = tmp_path / "hf"
    assert main(["convert", "--checkpoint", str(checkpoint), "--output", str(output), "--no-progress",
                 "--remote-code"]) == 0
    assert json.loads((output / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_rwkv7.Rwkv7Config",
        "AutoModel": "modeling_rwkv7.Rwkv7Model",
        "AutoModelForCausalLM": "modeling_rwkv7.Rwkv7ForCausalLM",
    }
    assert {"configuration_rwkv7.py", "modeling_rwkv7.py", "wkv7.py", "ops.py"} <= {p.name for p in output.glob("*.py")}
