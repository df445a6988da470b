import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

try:
    import resource
except ImportError:  # Windows
    resource = None
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from visualrwkv_hf import Rwkv6ForCausalLM
from visualrwkv_hf.cli import main
from visualrwkv_hf.convert_rwkv6 import (
    convert_blinkdl_to_hf,
    convert_hf_to_blinkdl,
    convert_rwkv6_checkpoint,
    rwkv6_config_from_state_dict,
    rwkv6_parameters,
)

from rwkv6_reference import random_blinkdl_rwkv6, reference_rwkv, save_checkpoint, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "conversion" / "convert_rwkv6_to_hf.py"
PROMPT_LENGTH = 120
NEW_TOKENS = 32
# fp32 against the oracle: max |difference| / max |reference|.
TOLERANCE = 1e-4

# (hidden_size, head_size, layers, mix LoRA rank, decay LoRA rank): 4 heads of 16, and 2 heads of 64.
SHAPES = {"C64-4heads": (64, 16, 2, 32, 64), "C128-2heads": (128, 64, 3, 16, 32)}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


class Converted(NamedTuple):
    output: Path
    model: Rwkv6ForCausalLM
    prompt: list[int]
    reference: object  # rwkv.model.RWKV
    reference_logits: torch.Tensor  # (prompt length, vocab)
    reference_state: list[torch.Tensor]  # after the prompt


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
@torch.no_grad()
def converted(request, tmp_path_factory):
    """A random checkpoint of one shape, the oracle's run over a prompt, and our model from the converted folder."""
    C, N, L, R, D = SHAPES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    checkpoint = save_checkpoint(
        random_blinkdl_rwkv6(C, N, L, mix_rank=R, decay_rank=D, seed=C), directory / "model.pth"
    )
    output = convert_rwkv6_checkpoint(checkpoint, directory / "hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    prompt = torch.randint(1, 65530, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(C)).tolist()
    reference = reference_rwkv(checkpoint)
    return Converted(output, model, prompt, reference, *reference.forward(prompt, None, full_output=True))


@torch.no_grad()
def test_converted_folder_loads_with_auto_classes(converted):
    model, output = converted.model, converted.output
    assert isinstance(model, Rwkv6ForCausalLM)
    assert model.dtype == torch.float32
    assert model.generation_config.eos_token_id == 261 and model.generation_config.pad_token_id == 0
    assert sorted(p.name for p in output.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "rwkv_vocab_v20230424.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("Assistant: Red\n\n").input_ids == [5585, 41693, 59, 20733, 261]


@torch.no_grad()
def test_prompt_logits_and_state_match_rwkv_package(converted):
    out = converted.model(torch.tensor([converted.prompt]), use_cache=True)
    assert relative_error(out.logits[0], converted.reference_logits) < TOLERANCE
    ref_state = converted.reference_state
    # The oracle's state per layer: [last ln1 output (C), WKV matrix (H, N, N) with rows = key, last ln2 output (C)],
    # the same key-major layout as our cache, so no transposition.
    for i, layer in enumerate(out.cache.layers):
        assert relative_error(layer.conv_states[0][0, :, -1], ref_state[3 * i]) < TOLERANCE
        assert relative_error(layer.recurrent_states[0][0], ref_state[3 * i + 1]) < TOLERANCE
        assert relative_error(layer.conv_states[1][0, :, -1], ref_state[3 * i + 2]) < TOLERANCE


@torch.no_grad()
def test_greedy_generation_matches_rwkv_package(converted):
    logits, state = converted.reference_logits[-1], list(converted.reference_state)  # the oracle replaces entries
    expected = []
    for _ in range(NEW_TOKENS):
        expected.append(int(logits.argmax()))
        logits, state = converted.reference.forward([expected[-1]], state)
    # No stop token: the oracle loop does not stop either.
    generation_config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    generated = converted.model.generate(torch.tensor([converted.prompt]), generation_config=generation_config)
    assert generated[0, len(converted.prompt) :].tolist() == expected


def test_parameter_table_matches_the_model():
    config = rwkv6_config_from_state_dict(tiny_checkpoint())
    with torch.device("meta"):
        hf_shapes = {k: tuple(v.shape) for k, v in Rwkv6ForCausalLM(config).state_dict().items()}
    assert hf_shapes == {p.hf_key: p.hf_shape for p in rwkv6_parameters(config)}


def test_config_is_derived_from_shapes():
    C, N, L, R, D = SHAPES["C128-2heads"]
    config = rwkv6_config_from_state_dict(
        random_blinkdl_rwkv6(C, N, L, vocab_size=500, mix_rank=R, decay_rank=D)
    )
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_size) == (500, C, L, N)
    assert (config.num_heads, config.intermediate_size) == (2, 448)
    assert (config.time_mix_extra_dim, config.time_decay_extra_dim) == (R, D)


def test_round_trip_hf_to_blinkdl_to_hf_is_identity():
    blinkdl = tiny_checkpoint()
    config, hf = convert_blinkdl_to_hf(blinkdl)
    exported = convert_hf_to_blinkdl(hf, config)
    assert exported.keys() == blinkdl.keys()
    assert all(torch.equal(exported[k], blinkdl[k]) and exported[k].shape == blinkdl[k].shape for k in blinkdl)
    config_again, hf_again = convert_blinkdl_to_hf(exported)
    assert config_again.to_dict() == config.to_dict()
    assert hf_again.keys() == hf.keys() and all(torch.equal(hf_again[k], hf[k]) for k in hf)


def test_round_trip_from_a_model_state_dict():
    config, _ = convert_blinkdl_to_hf(tiny_checkpoint())
    model = Rwkv6ForCausalLM(config)
    hf = model.state_dict()
    _, hf_again = convert_blinkdl_to_hf(convert_hf_to_blinkdl(hf, config))
    assert hf_again.keys() == hf.keys() and all(torch.equal(hf_again[k], hf[k]) for k in hf)


def test_prefixed_keys_of_a_full_visualrwkv_checkpoint():
    blinkdl = tiny_checkpoint()
    full = {f"rwkv.{k}": v for k, v in blinkdl.items()}
    full["proj.weight"] = torch.zeros(32, 1024)
    full["vit.vision_model.post_layernorm.weight"] = torch.ones(1024)
    config, hf = convert_blinkdl_to_hf(full, prefix="rwkv.")
    assert convert_hf_to_blinkdl(hf, config, prefix="rwkv.").keys() == {k for k in full if k.startswith("rwkv.")}
    with pytest.raises(ValueError, match="full VisualRWKV checkpoint"):
        convert_blinkdl_to_hf(full)
    del full["rwkv.blocks.1.att.gate.weight"]
    with pytest.raises(ValueError, match=r"'rwkv\.blocks\.1\.att\.gate\.weight' \(32, 32\)"):
        convert_blinkdl_to_hf(full, prefix="rwkv.")


def test_export_rejects_a_state_dict_of_another_model():
    config, hf = convert_blinkdl_to_hf(tiny_checkpoint())
    del hf["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing tensors .*'lm_head.weight' \(300, 32\)"):
        convert_hf_to_blinkdl(hf, config)


@pytest.mark.parametrize(
    ("requested", "stored", "expected"),
    [
        (None, {}, torch.bfloat16),
        ("auto", {"blocks.0.att.time_decay": torch.float32}, torch.float32),
        (None, {"head.weight": torch.float16}, torch.float32),
        ("float16", {}, torch.float16),
        ("float32", {}, torch.float32),
    ],
)
def test_dtype_default_keeps_the_checkpoints_precision(requested, stored, expected):
    checkpoint = {k: v.to(stored.get(k, torch.bfloat16)) for k, v in tiny_checkpoint().items()}
    config, hf = convert_blinkdl_to_hf(checkpoint, dtype=requested)
    assert config.dtype == expected and {t.dtype for t in hf.values()} == {expected}


def test_bfloat16_output_loads_in_bfloat16(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    output = convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", dtype="bfloat16", progress=False)
    assert {t.dtype for t in load_file(output / "model.safetensors").values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(output).dtype == torch.bfloat16


def rwkv5_like():
    sd = {"emb.weight": torch.zeros(300, 32), "blocks.0.ln0.weight": torch.ones(32)}
    sd.update({f"blocks.0.att.time_mix_{s}": torch.zeros(1, 1, 32) for s in "kvrg"})
    sd.update({"blocks.0.att.time_decay": torch.zeros(4, 8), "blocks.0.att.time_faaaa": torch.zeros(4, 8)})
    sd.update({"blocks.0.att.ln_x.weight": torch.ones(32), "blocks.0.att.key.weight": torch.zeros(32, 32)})
    return sd


def with_layer_of_another_width():
    checkpoint = tiny_checkpoint()
    wider = tiny_checkpoint(hidden_size=48, seed=1)
    checkpoint.update({k: v for k, v in wider.items() if k.startswith("blocks.1.")})
    return checkpoint


def with_layer_renumbered():
    """Layers 0 and 3: the block indices say four layers, so layers 1 and 2 are missing."""
    return {k.replace("blocks.1.", "blocks.3."): v for k, v in tiny_checkpoint().items()}


def with_changes(remove=(), add=None):
    checkpoint = tiny_checkpoint()
    for key in remove:
        del checkpoint[key]
    checkpoint.update(add or {})
    return checkpoint


BAD_CHECKPOINTS = {
    "rwkv5": (rwkv5_like, r"not an RWKV-6 \(x060\) checkpoint.*RWKV-4 or RWKV-5"),
    "random-dict": (lambda: {"weight": torch.zeros(3), "bias": torch.zeros(3)}, r"not an RWKV-6 \(x060\) checkpoint"),
    "list": (lambda: [torch.zeros(3)], r"is not a state dict: expected a dict .* got list"),
    "tensor": (lambda: torch.zeros(3), r"is not a state dict: .* got Tensor"),
    "non-tensor-values": (lambda: {"emb.weight": 3, "step": "x"}, r"not a plain state dict.*'emb.weight', 'step'"),
    "non-string-keys": (lambda: {0: torch.zeros(3)}, r"not a state dict: .* got dict with keys that are not strings"),
    "absurd-block-index": (
        lambda: with_changes(add={"blocks.1000000.ln1.weight": torch.ones(32)}),
        r"block indices up to 1000000 but only \d+ tensors",
    ),
    "missing-key": (
        lambda: with_changes(remove=["blocks.1.att.gate.weight", "ln_out.bias"]),
        r"missing tensors .*'blocks.1.att.gate.weight' \(32, 32\), 'ln_out.bias' \(32,\)",
    ),
    "gap-in-layers": (
        with_layer_renumbered,
        r"num_hidden_layers=4.*missing tensors .*'blocks.1.ln1.weight'.*and \d+ more",
    ),
    "extra-key": (
        lambda: with_changes(add={"blocks.0.att.time_state": torch.zeros(4, 8, 8)}),
        r"unexpected tensors, not part of such a model: 'blocks.0.att.time_state'",
    ),
    "layer-of-another-width": (
        with_layer_of_another_width,
        r"hidden_size=32.*inconsistent shapes: 'blocks.1.ln1.weight' is \(48,\), expected \(32,\)",
    ),
    "heads-do-not-tile-width": (
        lambda: with_changes(add={"blocks.0.att.time_faaaa": torch.zeros(3, 8)}),
        r"'blocks.0.att.time_faaaa' .* is \(3, 8\) = \(heads, head_size\), expected .* hidden_size 32",
    ),
    "integer-tensor": (
        lambda: with_changes(add={"head.weight": torch.zeros(300, 32, dtype=torch.int64)}),
        r"not floating point: 'head.weight' \(torch.int64\)",
    ),
    "rwkv-package-converted": (
        lambda: with_changes(add={"_strategy": "cpu fp32", "_version": "0.7"}),
        r"not a plain state dict.*'_strategy'.*already converted by the `rwkv` package",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_and_nothing_is_written(name, tmp_path):
    make, message = BAD_CHECKPOINTS[name]
    checkpoint = save_checkpoint(make(), tmp_path / "bad.pth")
    output = tmp_path / "out" / "hf"
    with pytest.raises(ValueError, match=message):
        convert_rwkv6_checkpoint(checkpoint, output, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          **kwargs)


def test_cli_converts_end_to_end(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    output = tmp_path / "hf"
    result = run_cli("--checkpoint", str(checkpoint), "--output", str(output), "--dtype", "float16")
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.dtype == torch.float16 and model.config.num_hidden_layers == 2


def test_cli_reports_user_errors_without_traceback(tmp_path):
    bad = save_checkpoint(rwkv5_like(), tmp_path / "rwkv5.pth")
    result = run_cli("--checkpoint", str(bad), "--output", str(tmp_path / "hf"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "not an RWKV-6 (x060) checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hf").exists()


def test_cli_refuses_output_dot_run_from_the_checkpoints_folder(tmp_path, monkeypatch, capsys):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    content = checkpoint.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["convert-rwkv6", "--checkpoint", "model.pth", "--output", ".", "--overwrite", "--no-progress"]) == 1
    assert capsys.readouterr().err == (
        f"error: The input model.pth lies inside the output {tmp_path}: writing there would delete it. Choose an "
        f"output folder that does not hold the input, for example {tmp_path / 'model-hf'}.\n"
    )
    assert os.listdir(tmp_path) == ["model.pth"] and checkpoint.read_bytes() == content


# ------------------------------------------------------------------------------------------------ non-finite weights


def test_nan_and_inf_weights_are_named_and_refused_unless_allowed(tmp_path):
    state_dict = tiny_checkpoint()
    state_dict["blocks.1.att.key.weight"][0, :3] = float("nan")
    state_dict["blocks.1.att.key.weight"][1, 0] = float("-inf")
    state_dict["head.weight"][5, 5] = float("inf")
    checkpoint = save_checkpoint(state_dict, tmp_path / "model.pth")
    with pytest.raises(ValueError, match=re.escape(
        f"{checkpoint} holds NaN or infinite weights in 2 tensors: 'blocks.1.att.key.weight' (3 NaN, 1 inf of 1024 "
        "values), 'head.weight' (0 NaN, 1 inf of 9600 values); a model with them computes NaN (is the file damaged, "
        "or from a diverged training run?). Pass allow_nonfinite=True (--allow-nonfinite on the command line) to "
        "convert it anyway."
    )):
        convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", progress=False)
    assert os.listdir(tmp_path) == ["model.pth"]
    output = convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", progress=False, allow_nonfinite=True)
    written = load_file(output / "model.safetensors")
    assert torch.equal(written["model.blocks.1.attention.att_key.weight"].isnan(),
                       state_dict["blocks.1.att.key.weight"].isnan())
    assert written["lm_head.weight"][5, 5] == float("inf")


def test_overflow_in_the_cast_is_refused_unless_allowed(tmp_path):
    checkpoint = save_checkpoint(with_changes(add={"ln_out.weight": torch.full((32,), 1e5)}), tmp_path / "model.pth")
    with pytest.raises(ValueError, match=re.escape(
        f"converting {checkpoint} to float16 overflows (beyond +-65504) in 1 tensor: 'ln_out.weight' (32 of 32 "
        "values); keep the checkpoint's dtype (dtype 'auto') or use a wider one."
    )):
        convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", dtype="float16", progress=False)
    assert os.listdir(tmp_path) == ["model.pth"]
    convert_rwkv6_checkpoint(checkpoint, tmp_path / "hf", dtype="bfloat16", progress=False)  # bf16 holds 1e5
    convert_rwkv6_checkpoint(checkpoint, tmp_path / "f16", dtype="float16", progress=False, allow_nonfinite=True)


def test_cli_allow_nonfinite(tmp_path, capsys):
    checkpoint = save_checkpoint(with_changes(add={"emb.weight": torch.full((300, 32), float("nan"))}),
                                 tmp_path / "model.pth")
    arguments = ["convert-rwkv6", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--no-progress"]
    assert main(arguments) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {checkpoint} holds NaN or infinite weights in 1 tensor: 'emb.weight' (9600 "
                            "NaN, 0 inf of 9600 values)")
    assert main([*arguments, "--allow-nonfinite"]) == 0
    assert load_file(tmp_path / "hf" / "model.safetensors")["model.embeddings.weight"].isnan().all()


# ---------------------------------------------------------------------------------------------------- out of space


def limited_file_size(limit: int):
    """For a subprocess: files may not grow beyond `limit` bytes, and writing past it fails with EFBIG (SIGXFSZ,
    which would kill the process, is ignored), as on a drive whose file-size limit is reached."""

    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@pytest.mark.skipif(resource is None, reason="needs POSIX resource limits")
def test_cli_out_of_space_gives_one_line_and_leaves_nothing(tmp_path):
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    # config.json fits, model.safetensors (about 190 KiB) does not.
    result = run_cli("--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf"), "--no-progress",
                     preexec_fn=limited_file_size(16 * 1024))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(
        rf"error: Could not write {re.escape(str(tmp_path / 'hf'))}: File too large \(about \d+\.\d KiB are "
        rf"needed, [\d.]+ \w+ free in {re.escape(str(tmp_path))}\)\. Nothing was written; free some space or choose "
        r"another output folder\.\n",
        result.stderr,
    ), result.stderr
    assert os.listdir(tmp_path) == ["model.pth"]


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare --mount` and tmpfs (root in a namespace)")
def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path):
    """A real ENOSPC: a 64 KiB tmpfs, mounted in a private mount namespace (seen by this command only)."""
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    disk = tmp_path / "disk"
    disk.mkdir()
    mountpoint = shlex.quote(str(disk))
    convert = shlex.join([sys.executable, str(CLI), "--checkpoint", str(checkpoint), "--output", str(disk / "hf"),
                          "--no-progress"])
    script = f"mount -t tmpfs -o size=64k tmpfs {mountpoint} && {convert}; echo rc=$?; ls -A {mountpoint}"
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout == "rc=1\n", result.stdout  # nothing left on the full disk
    assert re.fullmatch(
        rf"error: Could not write {re.escape(str(disk / 'hf'))}: No space left on device \(about \d+\.\d KiB are "
        rf"needed, [\d.]+ KiB free in {re.escape(str(disk))}\)\. Nothing was written; free some space or choose "
        r"another output folder\.\n",
        result.stderr,
    ), result.stderr


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs `unshare --mount` and tmpfs (root in a namespace)")
def test_a_read_only_output_names_the_folder_asked_for(tmp_path):
    """A real EROFS: a read-only tmpfs in a private mount namespace. The message names the output, not the hidden
    staging folder the converter tried to create."""
    checkpoint = save_checkpoint(tiny_checkpoint(), tmp_path / "model.pth")
    disk = tmp_path / "disk"
    disk.mkdir()
    convert = shlex.join([sys.executable, str(CLI), "--checkpoint", str(checkpoint), "--output", str(disk / "hf"),
                          "--no-progress"])
    script = f"mount -t tmpfs -o ro tmpfs {shlex.quote(str(disk))} && {convert}"
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == f"error: Cannot create the output folder {disk / 'hf'}: Read-only file system in {disk}.\n"
