"""Conversion of the vision side of VisualRWKV-HD (v0612), -UHD (v0613) and -7 (v0700) checkpoints: the original
three-encoder backbone's weights (`vit.`) mapped onto `SamDinoSiglipVisionModel`, and the projector (`proj.`).

The release is told from the tensors: `vit.dino_featurizer.*` marks the three-encoder backbone; the projector's names
give its kind (`projectors.detect_projector_type`) and its input width whether the image is read whole (DINOv2 +
SigLIP + SAM channels) or with UHD's tiles (twice that). HD and UHD store the same projector tensors: the MLP is read
gated for HD and with ReLU for UHD, as each release's code does (`--projector-type` overrides it). No file says which
towers' sizes it holds (attention heads do not show in shapes): the released towers are the default, and tests give
tiny ones as `{"dino": {...}, "siglip": {...}, "sam": {...}}` (transformers config keyword arguments).

The original builds DINOv2 and SigLIP with timm and SAM with Meta's `segment_anything` code; their tensors are renamed,
the fused timm `qkv` projections split into query, key and value, and DINOv2's position table (timm keeps no row for
the class token, `no_embed_class`) gets a zero class row, which adds nothing to the class token as in timm. The tables
are used as stored (already resampled to the 32 x 32 grid when the original built its models at 448 px). SigLIP's
attention-pooling head (`attn_pool.*`) is never used by VisualRWKV and is not kept; transformers' DINOv2 `mask_token`
(pre-training only) is zero.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from .checkpoint_io import check_finite
from .configuration_sam_dino_siglip import SamDinoSiglipVisionConfig
from .configuration_visualrwkv import VisualRWKVConfig
from .convert_rwkv6 import check_state_dict
from .modeling_visualrwkv import VisualRWKVForConditionalGeneration
from .projectors import ORIGINAL_KEYS, detect_projector_type

# Prefixes of the three encoders under the checkpoint's `vit.`.
DINO_PREFIX = "dino_featurizer."
SIGLIP_PREFIX = "siglip_featurizer."
SAM_PREFIX = "sam_featurizer."
ORIGINAL_PREFIXES = (DINO_PREFIX, SIGLIP_PREFIX, SAM_PREFIX)

# Tensors of the original that VisualRWKV never reads and the converted model does not hold.
DROPPED = re.compile(r"^siglip_featurizer\.attn_pool\.")

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Per-block names: timm's ViT (DINOv2 and SigLIP) -> transformers', without the fused qkv (split below).
_DINO_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.o_proj",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ls2.gamma": "layer_scale2.lambda1",
}
_SIGLIP_BLOCK = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_SAM_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "attn.rel_pos_h": "attn.rel_pos_h",
    "attn.rel_pos_w": "attn.rel_pos_w",
    "norm2": "layer_norm2",
    "mlp.lin1": "mlp.lin1",
    "mlp.lin2": "mlp.lin2",
}
_SAM_NECK = {"neck.0": "neck.conv1", "neck.1": "neck.layer_norm1", "neck.2": "neck.conv2", "neck.3": "neck.layer_norm2"}


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """`table` maps module paths; the parameter name (weight, bias, gamma...) after them is kept."""
    for original, ours in table.items():
        if name == original:
            return ours
        if name.startswith(original + "."):
            return ours + name[len(original) :]
    return None


def _convert_vit(
    tensors: Mapping[str, torch.Tensor],
    embeddings: Mapping[str, str],
    block_table: Mapping[str, str],
    block_prefix: str,
    qkv_names: tuple[str, str, str],
    final_norm: str,
    source: str,
) -> dict[str, torch.Tensor]:
    converted = {}
    for name, tensor in tensors.items():
        if name in embeddings:
            converted[embeddings[name]] = tensor
        elif name.startswith("norm."):
            converted[final_norm + name[len("norm") :]] = tensor
        elif match := _BLOCK.match(name):
            index, rest = match.groups()
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]  # weight or bias
                for part, qkv_name in zip(tensor.chunk(3, dim=0), qkv_names):
                    converted[f"{block_prefix}{index}.{qkv_name}.{kind}"] = part
            elif (ours := _rename(rest, block_table)) is not None:
                converted[f"{block_prefix}{index}.{ours}"] = tensor
            else:
                raise ValueError(f"Unexpected tensor {source}{name} in the original vision backbone.")
        else:
            raise ValueError(f"Unexpected tensor {source}{name} in the original vision backbone.")
    return converted


def convert_original_backbone(tensors: Mapping[str, torch.Tensor], source: str = "vit.") -> dict[str, torch.Tensor]:
    """`SamDinoSiglipVisionModel` state dict from the original backbone's tensors (keys relative to `vit.`).

    Shapes are not checked here (the caller compares the result with the model's); names that belong to none of the
    three encoders raise ValueError naming them.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in ORIGINAL_PREFIXES}
    for key, tensor in tensors.items():
        if DROPPED.match(key):
            continue
        prefix = next((p for p in ORIGINAL_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(
                f"Unexpected tensor {source}{key}: the original vision backbone holds only "
                f"{', '.join(source + p + '*' for p in ORIGINAL_PREFIXES)}."
            )
        groups[prefix][key.removeprefix(prefix)] = tensor

    dino = dict(groups[DINO_PREFIX])
    converted = {}
    if "pos_embed" in dino:
        table = dino.pop("pos_embed")  # (1, patches, D): timm's `no_embed_class`, no class row
        converted["dino.embeddings.position_embeddings"] = torch.cat([table.new_zeros(1, 1, table.shape[-1]), table], 1)
        converted["dino.embeddings.mask_token"] = table.new_zeros(1, table.shape[-1])
    converted.update(
        {
            "dino." + k: v
            for k, v in _convert_vit(
                dino,
                {
                    "cls_token": "embeddings.cls_token",
                    "reg_token": "embeddings.register_tokens",
                    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                },
                _DINO_BLOCK,
                "encoder.layer.",
                ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                "layernorm",
                source + DINO_PREFIX,
            ).items()
        }
    )

    siglip = dict(groups[SIGLIP_PREFIX])
    if "pos_embed" in siglip:
        converted["siglip.embeddings.position_embedding.weight"] = siglip.pop("pos_embed")[0]  # (patches, S)
    converted.update(
        {
            "siglip." + k: v
            for k, v in _convert_vit(
                siglip,
                {
                    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                },
                _SIGLIP_BLOCK,
                "encoder.layers.",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_layernorm",
                source + SIGLIP_PREFIX,
            ).items()
        }
    )

    for name, tensor in groups[SAM_PREFIX].items():
        if name in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
            ours = name.replace("patch_embed.proj", "patch_embed.projection")
        elif match := _BLOCK.match(name):
            index, rest = match.groups()
            renamed = _rename(rest, _SAM_BLOCK)
            ours = None if renamed is None else f"layers.{index}.{renamed}"
        else:
            ours = _rename(name, _SAM_NECK)
        if ours is None:
            raise ValueError(f"Unexpected tensor {source}{SAM_PREFIX}{name} in the original vision backbone.")
        converted["sam." + ours] = tensor
    return converted


# The JSON keys of `--vision-config` for this backbone, and the config argument each one fills.
TOWER_CONFIG_KEYS = {"dino": "dino_config", "siglip": "siglip_config", "sam": "sam_config"}

# The tensor that shows the projector's input width, per layout (under `proj.`).
_PROJECTOR_INPUT = {"linear": "weight", "gated_mlp": "proj.weight", "input_gated_mlp": "gate.weight"}


def is_three_encoder_checkpoint(visual: Mapping[str, torch.Tensor]) -> bool:
    """Whether an original checkpoint's `vit.*` tensors are the DINOv2 + SigLIP + SAM backbone."""
    return any(key.startswith("vit." + prefix) for key in visual for prefix in ORIGINAL_PREFIXES)


def read_tower_configs(path: str | os.PathLike) -> dict[str, dict] | None:
    """The tower sizes of a `--vision-config` JSON file if it is the three-encoder form (an object with keys among
    "dino", "siglip", "sam", each holding config keyword arguments), else None (a single encoder's config)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json" or not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read the vision config {path}: {error}") from error
    if not isinstance(content, dict) or not content.keys() & TOWER_CONFIG_KEYS.keys():
        return None
    unknown = sorted(content.keys() - TOWER_CONFIG_KEYS.keys())
    if unknown or not all(isinstance(value, dict) for value in content.values()):
        raise ValueError(
            f"The vision config {path} is read as the three-encoder form: a JSON object whose keys are among "
            f"{sorted(TOWER_CONFIG_KEYS)}, each an object of config keyword arguments"
            + (f"; unknown keys {unknown}." if unknown else "; some values are not objects.")
        )
    return content


def _tower_kwargs(vision_config: PreTrainedConfig | dict | None) -> dict[str, dict]:
    if vision_config is None:
        return {}
    if isinstance(vision_config, SamDinoSiglipVisionConfig):
        return {name: getattr(vision_config, field).to_dict() for name, field in TOWER_CONFIG_KEYS.items()}
    if isinstance(vision_config, dict) and vision_config.keys() <= TOWER_CONFIG_KEYS.keys():
        return vision_config
    raise ValueError(
        "This checkpoint holds the three-encoder backbone (DINOv2 + SigLIP + SAM, VisualRWKV-HD/UHD/7): its vision "
        'config is a JSON object {"dino": {...}, "siglip": {...}, "sam": {...}}, not a single encoder\'s config.'
    )


def convert_three_encoder_visual(
    visual: Mapping[str, torch.Tensor],
    text_config: PreTrainedConfig,
    dtype: torch.dtype,
    source: str,
    vision_config: PreTrainedConfig | dict | None = None,
    projector_type: str | None = None,
    settings: Mapping[str, object] | None = None,
    allow_nonfinite: bool = False,
    cast: bool = True,
) -> tuple[VisualRWKVConfig, dict[str, torch.Tensor]]:
    """The `VisualRWKVConfig` and the vision tower + projector part of the state dict of
    `VisualRWKVForConditionalGeneration` from a three-encoder checkpoint's `vit.*` and `proj.*` tensors.

    `vision_config`: tower sizes (dict of `TOWER_CONFIG_KEYS` or a `SamDinoSiglipVisionConfig`), the released towers
    by default; the tiles follow from the projector's input width. `projector_type` overrides the release's reading
    of an HD/UHD MLP ("gated_mlp" or "relu_mlp"). `settings`: other `VisualRWKVConfig` fields (scan mode, image
    position, grid size). With `cast=False` the tensors keep the file's dtype (views where the mapping allows, for a
    writer that casts as it writes). Raises ValueError naming every problem.
    """
    stray = [key for key in visual if not key.startswith(("vit.", "proj."))]
    if stray:
        raise ValueError(f"Unexpected tensors in {source}: {stray[:5]}; expected only vit.* and proj.*.")
    projector = {k.removeprefix("proj."): v for k, v in visual.items() if k.startswith("proj.")}
    layout = detect_projector_type(set(projector))
    input_width = projector[_PROJECTOR_INPUT[layout]].shape[-1]
    towers = {TOWER_CONFIG_KEYS[name]: kwargs for name, kwargs in _tower_kwargs(vision_config).items()}
    per_view = SamDinoSiglipVisionConfig(**towers).feature_size
    tiles = {per_view: 0, 2 * per_view: 2}.get(input_width)
    if tiles is None:
        raise ValueError(
            f"The projector in {source} reads {input_width} channels, but these towers give {per_view} per view "
            f"(DINOv2 + SigLIP + 4 x SAM neck channels; {2 * per_view} with UHD's tiles). Give the towers' sizes with "
            '--vision-config JSON ({"dino": {...}, "siglip": {...}, "sam": {...}}).'
        )
    if layout == "gated_mlp":
        projector_type = projector_type or ("relu_mlp" if tiles else "gated_mlp")
        allowed = ("gated_mlp", "relu_mlp")
    else:
        projector_type = projector_type or layout
        allowed = (layout,)
    if projector_type not in allowed:
        raise ValueError(
            f"The projector tensors in {source} are the {layout} layout, which reads as {' or '.join(allowed)}, not "
            f"{projector_type!r}."
        )
    backbone = SamDinoSiglipVisionConfig(**towers, tiles_per_side=tiles)
    config = VisualRWKVConfig(
        vision_config=backbone,
        text_config=text_config,
        projector_type=projector_type,
        **{name: value for name, value in (settings or {}).items() if value is not None},
    )
    with torch.device("meta"):  # shapes only
        expected = {k: tuple(v.shape) for k, v in VisualRWKVForConditionalGeneration(config).state_dict().items()}

    vision_prefix, projector_prefix = "model.vision_tower.", "model.multi_modal_projector."
    tower = convert_original_backbone({k.removeprefix("vit."): v for k, v in visual.items() if k.startswith("vit.")})
    sizes = ", ".join(
        f"{name} {getattr(backbone, field).hidden_size} wide x {getattr(backbone, field).num_hidden_layers} layers"
        for name, field in TOWER_CONFIG_KEYS.items()
    )
    check_state_dict(
        tower,
        {k.removeprefix(vision_prefix): v for k, v in expected.items() if k.startswith(vision_prefix)},
        f"The vision backbone in {source} does not match the towers ({sizes}); give the matching sizes with "
        '--vision-config JSON ({"dino": {...}, "siglip": {...}, "sam": {...}}). The differences, in the converted '
        "model's names",
        prefix=vision_prefix,
    )
    ours = {projector_prefix + ORIGINAL_KEYS[projector_type][k]: v for k, v in projector.items()}
    check_state_dict(
        {k.removeprefix(projector_prefix): v for k, v in ours.items()},
        {k.removeprefix(projector_prefix): v for k, v in expected.items() if k.startswith(projector_prefix)},
        f"The {projector_type} projector in {source} does not match (text hidden_size {text_config.hidden_size}, "
        f"vision features {backbone.feature_size})",
        prefix=projector_prefix,
    )
    state_dict = {vision_prefix + k: v for k, v in tower.items()} | ours
    if not allow_nonfinite:
        check_finite(state_dict, source, dtype)
    return config, {k: v.to(dtype if cast else v.dtype).contiguous() for k, v in state_dict.items()}


__all__ = [
    "ORIGINAL_PREFIXES",
    "TOWER_CONFIG_KEYS",
    "convert_original_backbone",
    "convert_three_encoder_visual",
    "is_three_encoder_checkpoint",
    "read_tower_configs",
]
