"""The original three-encoder backbone's weights (`vit.` of VisualRWKV-HD, -UHD and -7 checkpoints) mapped onto
`SamDinoSiglipVisionModel`.

The original builds DINOv2 and SigLIP with timm and SAM with Meta's `segment_anything` code; their tensors are renamed,
the fused timm `qkv` projections split into query, key and value, and DINOv2's position table (timm keeps no row for
the class token, `no_embed_class`) gets a zero class row, which adds nothing to the class token as in timm. The tables
are used as stored (already resampled to the 32 x 32 grid when the original built its models at 448 px). SigLIP's
attention-pooling head (`attn_pool.*`) is never used by VisualRWKV and is not kept; transformers' DINOv2 `mask_token`
(pre-training only) is zero.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

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


__all__ = ["ORIGINAL_PREFIXES", "convert_original_backbone"]
