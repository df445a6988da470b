"""Conversion between BlinkDL's RWKV-7 ("Goose", x070) `.pth` layout and this package's Hugging Face layout.

As for RWKV-6, one table, `rwkv7_parameters(config)`, lists every parameter with its name and shape on both sides;
validation and both directions are read off it. BlinkDL checkpoints ship no config: `rwkv7_config_from_state_dict`
derives every size from tensor shapes, the four LoRA ranks included (fixed 64 / 64 / 32 / 128 in files trained before
2025-02, a formula of the width in later ones: never assume either), and checks the whole file against it. Block 0
has no value-residual LoRA (v0, v1, v2): its value is the one the other blocks mix towards.

`convert_rwkv7_checkpoint` writes a complete folder (config, safetensors weights, generation config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load after `import visualrwkv_hf`;
`convert_hf_to_blinkdl` exports back to BlinkDL's layout (the `rwkv` package and BlinkDL's scripts read it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint_io import (
    MAX_SHARD_SIZE,
    atomic_output_dir,
    check_output_dir,
    load_checkpoint,
    output_size,
    resolve_dtype,
)
from .configuration_rwkv7 import Rwkv7Config
from .convert_rwkv6 import Rwkv6Parameter as Parameter
from .convert_rwkv6 import (
    check_state_dict,
    map_blinkdl_to_hf,
    map_hf_to_blinkdl,
    save_hf_text_model,
    select_prefix,
)
from .modeling_rwkv7 import TIME_MIX_SLOTS

# Keys whose presence identifies an RWKV-7 file (r_k is x070's per-head bonus, x_r its static token-shift mix).
RWKV7_MARKER_KEYS = ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.x_r")

# x070 variants this model does not implement, by a key that marks them.
UNSUPPORTED_VARIANTS = {
    "ffn.s_emb.weight": "the DeepEmbed variant (per-token channel-mix embeddings ffn.s_emb / s0 / s1 / s2)",
    "ffn.s_emb_x.weight": "the DeepEmbed variant (per-token channel-mix embeddings ffn.s_emb_x)",
    "att.x_x": "a variant with a data-dependent token shift (att.x_x)",
}

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def rwkv7_parameters(config: Rwkv7Config) -> list[Parameter]:
    """Every parameter of an RWKV-7 model of this config, in BlinkDL file order."""
    V, C, F = config.vocab_size, config.hidden_size, config.intermediate_size
    H, N = config.num_heads, config.head_size

    def same(blinkdl_key, hf_key, shape):
        return Parameter(blinkdl_key, hf_key, shape, shape)

    def channel_vector(blinkdl_key, hf_key):
        # BlinkDL keeps per-channel vectors broadcast-ready as (1, 1, C).
        return Parameter(blinkdl_key, hf_key, (1, 1, C), (C,))

    def layer_norm(blinkdl_name, hf_name):
        return [same(f"{blinkdl_name}.{p}", f"{hf_name}.{p}", (C,)) for p in ("weight", "bias")]

    def lora(att, tm, name, rank, bias=True):
        # x{name} = {name}0 + (x @ {name}1) @ {name}2 (the gate has no bias)
        return ([channel_vector(f"{att}{name}0", f"{tm}{name}0")] if bias else []) + [
            same(f"{att}{name}1", f"{tm}{name}1", (C, rank)),
            same(f"{att}{name}2", f"{tm}{name}2", (rank, C)),
        ]

    params = [same("emb.weight", "model.embeddings.weight", (V, C))]
    for i in range(config.num_hidden_layers):
        b, h = f"blocks.{i}.", f"model.blocks.{i}."
        att, tm, ffn, cm = f"{b}att.", f"{h}attention.", f"{b}ffn.", f"{h}feed_forward."
        if i == 0:
            params += layer_norm(f"{b}ln0", f"{h}pre_norm")
        params += layer_norm(f"{b}ln1", f"{h}attn_norm")
        params += layer_norm(f"{b}ln2", f"{h}ffn_norm")
        params += [channel_vector(f"{att}x_{slot}", f"{tm}x_{slot}") for slot in TIME_MIX_SLOTS]
        params += lora(att, tm, "w", config.decay_low_rank_dim)
        params += lora(att, tm, "a", config.a_low_rank_dim)
        if i > 0:
            params += lora(att, tm, "v", config.v_low_rank_dim)
        params += lora(att, tm, "g", config.gate_low_rank_dim, bias=False)
        params += [
            channel_vector(f"{att}k_k", f"{tm}k_k"),
            channel_vector(f"{att}k_a", f"{tm}k_a"),
            same(f"{att}r_k", f"{tm}r_k", (H, N)),
        ]
        for name in ("receptance", "key", "value", "output"):
            params.append(same(f"{att}{name}.weight", f"{tm}att_{name}.weight", (C, C)))
        params += layer_norm(f"{att}ln_x", f"{tm}ln_x")
        params += [
            channel_vector(f"{ffn}x_k", f"{cm}x_k"),
            same(f"{ffn}key.weight", f"{cm}ffn_key.weight", (F, C)),
            same(f"{ffn}value.weight", f"{cm}ffn_value.weight", (C, F)),
        ]
    params += layer_norm("ln_out", "model.norm_out")
    params.append(same("head.weight", "lm_head.weight", (V, C)))
    return params


def _sizes(config: Rwkv7Config) -> str:
    return (
        f"vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
        f"num_hidden_layers={config.num_hidden_layers}, head_size={config.head_size}, "
        f"intermediate_size={config.intermediate_size}, LoRA ranks decay={config.decay_low_rank_dim} "
        f"a={config.a_low_rank_dim} v={config.v_low_rank_dim} gate={config.gate_low_rank_dim}"
    )


def _not_rwkv7_hint(keys: set[str]) -> str:
    """What a state dict without the x070 markers looks like instead, to make the error actionable."""
    if "_strategy" in keys:
        return " It was already converted by the `rwkv` package for one inference strategy; convert the original .pth."
    if any(k.startswith("rwkv.") for k in keys):
        return (
            " It looks like a full VisualRWKV checkpoint (keys start with 'rwkv.'), which `visualrwkv convert "
            "--checkpoint` converts (VisualRWKV-6, -HD, -UHD and -7)."
        )
    if "blocks.0.att.time_maa_w1" in keys:
        return (
            " It looks like an RWKV-6 (x060) checkpoint (att.time_maa_w1); convert it with `visualrwkv convert "
            "--checkpoint` or `visualrwkv convert-rwkv6`."
        )
    if "blocks.0.att.time_mix_k" in keys:
        version = "RWKV-5 (att.time_faaaa)" if "blocks.0.att.time_faaaa" in keys else "RWKV-4"
        return f" It looks like an {version} checkpoint (att.time_mix_*), which this package does not support."
    return ""


def _unsupported_variant(keys: set[str], prefix: str) -> str | None:
    """A description of the x070 variant these keys belong to, naming its keys, if it is one we do not implement."""
    for marker, variant in UNSUPPORTED_VARIANTS.items():
        found = sorted(k for k in keys if _BLOCK_KEY.match(k) and k.split(".", 2)[2] == marker)
        if found:
            names = ", ".join(f"'{prefix}{k}'" for k in found[:3]) + (" ..." if len(found) > 3 else "")
            return f"{variant}: {names}"
    return None


def rwkv7_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "", source: str = "the checkpoint"
) -> Rwkv7Config:
    """Derives the config of a BlinkDL RWKV-7 state dict from its shapes, and checks every tensor against it.

    Sizes come from: vocab and width from `emb.weight` (V, C); layers from the block indices; heads from `r_k`
    (H, N); `intermediate_size` from `ffn.key.weight`; the LoRA ranks from `w1`, `a1`, `v1` (block 1) and `g1`.
    Raises ValueError saying what is wrong and what was expected.
    """
    tensors = select_prefix(state_dict, prefix, source)
    if not all(k in tensors for k in RWKV7_MARKER_KEYS):
        markers = ", ".join(f"'{prefix}{k}'" for k in RWKV7_MARKER_KEYS)
        raise ValueError(
            f"{source} is not an RWKV-7 (x070) checkpoint in BlinkDL's layout: expected keys such as {markers}."
            + _not_rwkv7_hint(set(tensors))
        )
    variant = _unsupported_variant(set(tensors), prefix)
    if variant is not None:
        raise ValueError(
            f"{source} is an RWKV-7 checkpoint of {variant}. This package implements the plain x070 block "
            "(RWKV-7 World / G1, VisualRWKV-7) only."
        )
    num_layers = 1 + max(int(m.group(1)) for k in tensors if (m := _BLOCK_KEY.match(k)))
    if num_layers > len(tensors):  # every block has dozens of tensors: this file cannot be complete
        raise ValueError(
            f"{source} has block indices up to {num_layers - 1} but only {len(tensors)} tensors: blocks are missing."
        )

    def anchor(key: str, dims: int) -> tuple[int, ...]:
        if key not in tensors:
            raise ValueError(f"{source} lacks '{prefix}{key}', which RWKV-7 needs (and which gives the model's sizes).")
        shape = tuple(tensors[key].shape)
        if len(shape) != dims:
            raise ValueError(f"'{prefix}{key}' in {source} has shape {shape}; RWKV-7 has {dims} dims there.")
        return shape

    vocab_size, hidden_size = anchor("emb.weight", 2)
    num_heads, head_size = anchor("blocks.0.att.r_k", 2)
    if num_heads * head_size != hidden_size:
        raise ValueError(
            f"'{prefix}blocks.0.att.r_k' in {source} is ({num_heads}, {head_size}) = (heads, head_size), "
            f"expected heads x head_size = hidden_size {hidden_size} (from '{prefix}emb.weight')."
        )
    config = Rwkv7Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        head_size=head_size,
        intermediate_size=anchor("blocks.0.ffn.key.weight", 2)[0],
        decay_low_rank_dim=anchor("blocks.0.att.w1", 2)[1],
        a_low_rank_dim=anchor("blocks.0.att.a1", 2)[1],
        # block 0 has no value residual; a one-block model has none at all (any rank describes it)
        v_low_rank_dim=anchor("blocks.1.att.v1", 2)[1] if num_layers > 1 else None,
        gate_low_rank_dim=anchor("blocks.0.att.g1", 2)[1],
    )
    expected = {p.blinkdl_key: p.blinkdl_shape for p in rwkv7_parameters(config)}
    check_state_dict(tensors, expected, f"{source} does not match an RWKV-7 model of {_sizes(config)}", prefix)
    return config


def convert_blinkdl_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    dtype: str | torch.dtype | None = None,
    prefix: str = "",
    source: str = "the checkpoint",
    progress: bool = False,
    allow_nonfinite: bool = False,
    cast: bool = True,
) -> tuple[Rwkv7Config, dict[str, torch.Tensor]]:
    """Validates a BlinkDL RWKV-7 state dict and returns its config (with `dtype` set) and the HF state dict.

    NaN or infinite weights (in the file, or from overflow in the cast to `dtype`) are refused unless
    `allow_nonfinite`. With `cast=False` the tensors keep the file's dtype (views, nothing copied) for a writer that
    casts them to `config.dtype` as it writes.
    """
    config = rwkv7_config_from_state_dict(state_dict, prefix, source)
    return config, map_blinkdl_to_hf(
        state_dict, config, rwkv7_parameters, dtype, prefix, source, progress, allow_nonfinite, cast
    )


def convert_hf_to_blinkdl(
    hf_state_dict: Mapping[str, torch.Tensor], config: Rwkv7Config, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Exports an `Rwkv7ForCausalLM` state dict back to BlinkDL's layout (keys prefixed with `prefix`)."""
    return map_hf_to_blinkdl(hf_state_dict, rwkv7_parameters(config), _sizes(config), prefix)


def convert_rwkv7_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    allow_nonfinite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Converts a BlinkDL RWKV-7 `.pth` into a Hugging Face folder; returns the folder.

    Everything is validated before anything is written, and the folder appears complete or not at all; an output
    folder holding the checkpoint is refused, even with `overwrite`. NaN or infinite weights are refused unless
    `allow_nonfinite`. The file is streamed: memory holds at most one weight shard (`max_shard_size`) of cast
    tensors, none when the dtype is kept. Raises ValueError (not an RWKV-7 checkpoint, an unsupported variant, an
    inconsistent one, non-finite weights, an output that would delete the input), FileNotFoundError, FileExistsError
    or OSError.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir.absolute(), overwrite, [checkpoint])  # fail before reading a multi-GB file
    config, hf_state_dict = convert_blinkdl_to_hf(
        load_checkpoint(checkpoint), dtype, source=str(checkpoint), progress=progress, allow_nonfinite=allow_nonfinite,
        cast=False,
    )
    with atomic_output_dir(output_dir, overwrite, [checkpoint], output_size(hf_state_dict, config.dtype)) as staging:
        save_hf_text_model(staging, config, hf_state_dict, "Rwkv7ForCausalLM", max_shard_size, progress)
    return output_dir


def export_rwkv7_checkpoint(
    model_dir: str | os.PathLike, output: str | os.PathLike, dtype: str | torch.dtype | None = None
) -> Path:
    """Writes a converted (or fine-tuned) RWKV-7 folder back as one BlinkDL `.pth` (`torch.save` of the state dict),
    which the `rwkv` package and BlinkDL's scripts load; `dtype` None keeps the folder's. Refuses to overwrite a file.
    """
    from .modeling_rwkv7 import Rwkv7ForCausalLM

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose a new file name for the exported checkpoint.")
    if output.suffix != ".pth":
        raise ValueError(f"The exported checkpoint must be a .pth file (the `rwkv` package reads NAME.pth), got {output}.")
    model = Rwkv7ForCausalLM.from_pretrained(model_dir)
    state_dict = model.state_dict()
    out_dtype = resolve_dtype(dtype, state_dict)
    blinkdl = convert_hf_to_blinkdl({k: v.to(out_dtype) for k, v in state_dict.items()}, model.config)
    partial = output.with_name(f".{output.name}.partial")  # the file appears complete or not at all
    try:
        torch.save(blinkdl, partial)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output


__all__ = [
    "convert_blinkdl_to_hf",
    "convert_hf_to_blinkdl",
    "convert_rwkv7_checkpoint",
    "export_rwkv7_checkpoint",
    "rwkv7_config_from_state_dict",
    "rwkv7_parameters",
]
