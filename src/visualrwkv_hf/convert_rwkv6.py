"""Conversion between BlinkDL's RWKV-6 ("Finch", x060) `.pth` layout and this package's Hugging Face layout.

One table, `rwkv6_parameters(config)`, lists every parameter with its name and shape on both sides; key mapping,
validation and both conversion directions are read off it, so they cannot drift apart. BlinkDL checkpoints ship no
config: `rwkv6_config_from_state_dict` derives every size from tensor shapes and checks the whole file against it.

State-dict functions take a `prefix` so a full VisualRWKV checkpoint can reuse them for its `rwkv.` keys: only keys
starting with the prefix are read (others are the caller's business) and error messages name keys as in the file.

`convert_rwkv6_checkpoint` writes a complete folder (config, safetensors weights, generation config, tokenizer)
that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load after `import visualrwkv_hf`.
It streams (see `checkpoint_io`): the tensors stay views of the memory-mapped file until each shard is cast and written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedConfig

from .checkpoint_io import (
    MAX_SHARD_SIZE,
    atomic_output_dir,
    check_finite,
    check_output_dir,
    load_checkpoint,
    output_size,
    resolve_dtype,
    save_safetensors_shards,
    short_list,
)
from .configuration_rwkv6 import Rwkv6Config
from .modeling_rwkv6 import TIME_MIX_SLOTS
from .tokenization_rwkv_world import PAD_TOKEN_ID, TURN_END_TOKEN_ID, RwkvWorldTokenizer

# Keys whose presence identifies an RWKV-6 file (time_maa_w1 is the x060 data-dependent token shift).
RWKV6_MARKER_KEYS = ("emb.weight", "blocks.0.att.time_maa_w1")

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class Rwkv6Parameter:
    """One parameter: its BlinkDL key and shape, and its key and shape in `Rwkv6ForCausalLM`."""

    blinkdl_key: str
    hf_key: str
    blinkdl_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


def rwkv6_parameters(config: Rwkv6Config) -> list[Rwkv6Parameter]:
    """Every parameter of an RWKV-6 model of this config, in BlinkDL file order."""
    V, C, F = config.vocab_size, config.hidden_size, config.intermediate_size
    R, D, H, N = config.time_mix_extra_dim, config.time_decay_extra_dim, config.num_heads, config.head_size

    def same(blinkdl_key, hf_key, shape):
        return Rwkv6Parameter(blinkdl_key, hf_key, shape, shape)

    def channel_vector(blinkdl_key, hf_key):
        # BlinkDL keeps per-channel mixing and decay vectors broadcast-ready as (1, 1, C).
        return Rwkv6Parameter(blinkdl_key, hf_key, (1, 1, C), (C,))

    def layer_norm(blinkdl_name, hf_name):
        return [same(f"{blinkdl_name}.{p}", f"{hf_name}.{p}", (C,)) for p in ("weight", "bias")]

    params = [same("emb.weight", "model.embeddings.weight", (V, C))]
    for i in range(config.num_hidden_layers):
        b, h = f"blocks.{i}.", f"model.blocks.{i}."
        att, tm, ffn, cm = f"{b}att.", f"{h}attention.", f"{b}ffn.", f"{h}feed_forward."
        if i == 0:
            params += layer_norm(f"{b}ln0", f"{h}pre_norm")
        params += layer_norm(f"{b}ln1", f"{h}attn_norm")
        params += layer_norm(f"{b}ln2", f"{h}ffn_norm")
        for slot in ("x", *TIME_MIX_SLOTS):
            params.append(channel_vector(f"{att}time_maa_{slot}", f"{tm}time_maa_{slot}"))
        params += [
            same(f"{att}time_maa_w1", f"{tm}time_maa_w1", (C, len(TIME_MIX_SLOTS) * R)),
            same(f"{att}time_maa_w2", f"{tm}time_maa_w2", (len(TIME_MIX_SLOTS), R, C)),
            channel_vector(f"{att}time_decay", f"{tm}time_decay"),
            same(f"{att}time_decay_w1", f"{tm}time_decay_w1", (C, D)),
            same(f"{att}time_decay_w2", f"{tm}time_decay_w2", (D, C)),
            same(f"{att}time_faaaa", f"{tm}time_faaaa", (H, N)),
        ]
        for name in ("receptance", "key", "value", "gate", "output"):
            params.append(same(f"{att}{name}.weight", f"{tm}att_{name}.weight", (C, C)))
        params += layer_norm(f"{att}ln_x", f"{tm}ln_x")
        params += [
            channel_vector(f"{ffn}time_maa_k", f"{cm}time_maa_k"),
            channel_vector(f"{ffn}time_maa_r", f"{cm}time_maa_r"),
            same(f"{ffn}key.weight", f"{cm}ffn_key.weight", (F, C)),
            same(f"{ffn}receptance.weight", f"{cm}ffn_receptance.weight", (C, C)),
            same(f"{ffn}value.weight", f"{cm}ffn_value.weight", (C, F)),
        ]
    params += layer_norm("ln_out", "model.norm_out")
    params.append(same("head.weight", "lm_head.weight", (V, C)))
    return params


def _sizes(config: Rwkv6Config) -> str:
    return (
        f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
        f"num_hidden_layers={config.num_hidden_layers}, head_size={config.head_size}, "
        f"intermediate_size={config.intermediate_size}, time_mix_extra_dim={config.time_mix_extra_dim}, "
        f"time_decay_extra_dim={config.time_decay_extra_dim}"
    )


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected_shapes: Mapping[str, tuple[int, ...]],
    what: str,
    prefix: str = "",
) -> None:
    """Raises one ValueError listing every missing, unexpected, mis-shaped or non-float tensor.

    `state_dict` and `expected_shapes` use keys without `prefix`; messages name them with it, as in the file.
    """
    problems = []
    missing = [f"'{prefix}{k}' {expected_shapes[k]}" for k in expected_shapes if k not in state_dict]
    if missing:
        problems.append(f"missing tensors (name and expected shape): {short_list(missing)}")
    unexpected = [f"'{prefix}{k}'" for k in state_dict if k not in expected_shapes]
    if unexpected:
        problems.append(f"unexpected tensors, not part of such a model: {short_list(unexpected)}")
    mis_shaped = [
        f"'{prefix}{k}' is {tuple(state_dict[k].shape)}, expected {expected_shapes[k]}"
        for k in expected_shapes
        if k in state_dict and tuple(state_dict[k].shape) != expected_shapes[k]
    ]
    if mis_shaped:
        problems.append(f"tensors with inconsistent shapes: {short_list(mis_shaped)}")
    not_float = [f"'{prefix}{k}' ({t.dtype})" for k, t in state_dict.items() if not t.is_floating_point()]
    if not_float:
        problems.append(f"tensors that are not floating point: {short_list(not_float)}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems) + ".")


def select_prefix(state_dict: object, prefix: str, source: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed, after checking that they are named tensors."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(k, str) for k in state_dict):
        raise ValueError(
            f"{source} is not a state dict: expected a dict of tensor names to tensors, got {type(state_dict).__name__}"
            + ("" if not isinstance(state_dict, Mapping) else " with keys that are not strings")
            + "."
        )
    selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    not_tensors = [f"'{prefix}{k}'" for k, v in selected.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{source} is not a plain state dict: expected only tensors, but these entries are not: "
            f"{short_list(not_tensors)}." + _not_rwkv6_hint(set(selected))
        )
    return selected


def _not_rwkv6_hint(keys: set[str]) -> str:
    """What a state dict without the x060 markers looks like instead, to make the error actionable."""
    if "_strategy" in keys:
        return " It was already converted by the `rwkv` package for one inference strategy; convert the original .pth."
    if any(k.startswith("rwkv.") for k in keys):
        return (
            " It looks like a full VisualRWKV checkpoint (keys start with 'rwkv.'); convert it with "
            "`visualrwkv convert --checkpoint`."
        )
    if "blocks.0.att.time_mix_k" in keys:
        return " It looks like an RWKV-4 or RWKV-5 checkpoint (att.time_mix_* instead of att.time_maa_*)."
    if "blocks.0.att.x_r" in keys or "blocks.0.att.w0" in keys:
        return " It looks like an RWKV-7 (x070) checkpoint."
    return ""


def rwkv6_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "", source: str = "the checkpoint"
) -> Rwkv6Config:
    """Derives the config of a BlinkDL RWKV-6 state dict from its shapes, and checks every tensor against it.

    Sizes come from: vocab and width from `emb.weight` (V, C); layers from the block indices; heads from
    `time_faaaa` (H, N); `intermediate_size` from `ffn.key.weight`; LoRA ranks from `time_maa_w2` (5, R, C) and
    `time_decay_w1` (C, D). Raises ValueError saying what is wrong and what was expected.
    """
    tensors = select_prefix(state_dict, prefix, source)
    if not all(k in tensors for k in RWKV6_MARKER_KEYS):
        markers = ", ".join(f"'{prefix}{k}'" for k in RWKV6_MARKER_KEYS)
        raise ValueError(
            f"{source} is not an RWKV-6 (x060) checkpoint in BlinkDL's layout: expected keys such as {markers}."
            + _not_rwkv6_hint(set(tensors))
        )
    num_layers = 1 + max(int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k)))
    if num_layers > len(tensors):  # every block has dozens of tensors: this file cannot be complete
        raise ValueError(
            f"{source} has block indices up to {num_layers - 1} but only {len(tensors)} tensors: blocks are missing."
        )

    def anchor(key: str, dims: int) -> tuple[int, ...]:
        if key not in tensors:
            raise ValueError(f"{source} lacks '{prefix}{key}', which RWKV-6 needs (and which gives the model's sizes).")
        shape = tuple(tensors[key].shape)
        if len(shape) != dims:
            raise ValueError(f"'{prefix}{key}' in {source} has shape {shape}; RWKV-6 has {dims} dims there.")
        return shape

    vocab_size, hidden_size = anchor("emb.weight", 2)
    num_heads, head_size = anchor("blocks.0.att.time_faaaa", 2)
    if num_heads * head_size != hidden_size:
        raise ValueError(
            f"'{prefix}blocks.0.att.time_faaaa' in {source} is ({num_heads}, {head_size}) = (heads, head_size), "
            f"expected heads x head_size = hidden_size {hidden_size} (from '{prefix}emb.weight')."
        )
    config = Rwkv6Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        head_size=head_size,
        intermediate_size=anchor("blocks.0.ffn.key.weight", 2)[0],
        time_mix_extra_dim=anchor("blocks.0.att.time_maa_w2", 3)[1],
        time_decay_extra_dim=anchor("blocks.0.att.time_decay_w1", 2)[1],
    )
    expected = {p.blinkdl_key: p.blinkdl_shape for p in rwkv6_parameters(config)}
    check_state_dict(tensors, expected, f"{source} does not match an RWKV-6 model of {_sizes(config)}", prefix)
    return config


def convert_blinkdl_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype | None = None,
    prefix: str = "",
    source: str = "the checkpoint",
    progress: bool = False,
    allow_nonfinite: bool = False,
    cast: bool = True,
) -> tuple[Rwkv6Config, dict[str, torch.Tensor]]:
    """Validates a BlinkDL RWKV-6 state dict and returns its config (with `dtype` set) and the HF state dict.

    NaN or infinite weights (in the file, or from overflow in the cast to `dtype`) are refused unless
    `allow_nonfinite`. With `cast=False` the tensors keep the file's dtype (views of `state_dict`'s, nothing copied),
    for a writer that casts them to `config.dtype` as it writes (`save_safetensors_shards`).
    """
    config = rwkv6_config_from_state_dict(state_dict, prefix, source)
    return config, map_blinkdl_to_hf(
        state_dict, config, rwkv6_parameters, dtype, prefix, source, progress, allow_nonfinite, cast
    )


def map_blinkdl_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    config: PreTrainedConfig,
    parameters: Callable[[PreTrainedConfig], list[Rwkv6Parameter]],
    dtype: str | torch.dtype | None,
    prefix: str,
    source: str,
    progress: bool,
    allow_nonfinite: bool,
    cast: bool = True,
) -> dict[str, torch.Tensor]:
    """The HF state dict of an already validated BlinkDL state dict, through the family's parameter table
    (`parameters(config)`); sets `config.dtype`. With `cast=False` the tensors keep the file's dtype (reshaped views,
    nothing copied). Shared by the RWKV-6 and RWKV-7 converters."""
    tensors = select_prefix(state_dict, prefix, source)
    config.dtype = resolve_dtype(dtype, tensors)
    params = parameters(config)
    if not allow_nonfinite:
        check_finite({prefix + p.blinkdl_key: tensors[p.blinkdl_key] for p in params}, source, config.dtype)
    return {
        p.hf_key: (tensors[p.blinkdl_key].to(config.dtype) if cast else tensors[p.blinkdl_key])
        .reshape(p.hf_shape)
        .contiguous()
        for p in tqdm(params, desc="Converting tensors", unit="tensor", disable=not progress)
    }


def convert_hf_to_blinkdl(
    hf_state_dict: Mapping[str, torch.Tensor], config: Rwkv6Config, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Exports a `Rwkv6ForCausalLM` state dict back to BlinkDL's layout (keys prefixed with `prefix`)."""
    return map_hf_to_blinkdl(hf_state_dict, rwkv6_parameters(config), _sizes(config), prefix)


def map_hf_to_blinkdl(
    hf_state_dict: Mapping[str, torch.Tensor], params: list[Rwkv6Parameter], sizes: str, prefix: str
) -> dict[str, torch.Tensor]:
    """BlinkDL's layout of an HF state dict through a parameter table, after checking every key and shape against it
    (`sizes` describes the model in the error). Shared by the RWKV-6 and RWKV-7 converters."""
    check_state_dict(hf_state_dict, {p.hf_key: p.hf_shape for p in params}, f"The state dict does not match {sizes}")
    return {prefix + p.blinkdl_key: hf_state_dict[p.hf_key].reshape(p.blinkdl_shape).contiguous() for p in params}


def save_hf_text_model(
    directory: Path, config: PreTrainedConfig, hf_state_dict: Mapping[str, torch.Tensor],
    architecture: str = "Rwkv6ForCausalLM", max_shard_size: int | str = MAX_SHARD_SIZE, progress: bool = False,
) -> None:
    """Writes config, weights (cast to `config.dtype` shard by shard), generation config and tokenizer of a
    World-tokenizer language model (RWKV-6, or RWKV-7 with `architecture="Rwkv7ForCausalLM"`): a folder the Auto
    classes load."""
    config.architectures = [architecture]
    config.save_pretrained(directory)
    save_safetensors_shards(directory, hf_state_dict, config.dtype, max_shard_size, progress)
    GenerationConfig(eos_token_id=TURN_END_TOKEN_ID, pad_token_id=PAD_TOKEN_ID).save_pretrained(directory)
    RwkvWorldTokenizer().save_pretrained(directory)


def convert_rwkv6_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Converts a BlinkDL RWKV-6 `.pth` into a Hugging Face folder; returns the folder.

    Everything is validated before anything is written, and the folder appears complete or not at all; an output
    folder holding the checkpoint is refused, even with `overwrite`. NaN or infinite weights are refused unless
    `allow_nonfinite`. The file is streamed: memory holds at most one weight shard (`max_shard_size`) of cast
    tensors, none when the dtype is kept. Raises ValueError (not an RWKV-6 checkpoint, an inconsistent one, non-finite
    weights, an output that would delete the input), FileNotFoundError, FileExistsError or OSError (unreadable, out of
    space).
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir.absolute(), overwrite, [checkpoint])  # fail before reading a multi-GB file
    config, hf_state_dict = convert_blinkdl_to_hf(
        load_checkpoint(checkpoint), dtype, source=str(checkpoint), progress=progress, allow_nonfinite=allow_nonfinite,
        cast=False,
    )
    with atomic_output_dir(output_dir, overwrite, [checkpoint], output_size(hf_state_dict, config.dtype)) as staging:
        save_hf_text_model(staging, config, hf_state_dict, max_shard_size=max_shard_size, progress=progress)
    return output_dir


__all__ = [
    "Rwkv6Parameter",
    "check_state_dict",
    "convert_blinkdl_to_hf",
    "convert_hf_to_blinkdl",
    "convert_rwkv6_checkpoint",
    "rwkv6_config_from_state_dict",
    "rwkv6_parameters",
    "save_hf_text_model",
    "select_prefix",
]
