"""Conversion of the original VisualRWKV checkpoints into a Hugging Face folder.

VisualRWKV-6.0 (CLIP) comes in two layouts:

* the full checkpoint (`VisualRWKV-v060-{1B6,3B,7B}-v1.0-20240612.pth`): `rwkv.` + BlinkDL's RWKV-6 keys, `vit.` + the
  keys of transformers' `CLIPVisionModel` (saved with transformers 4, hence `vit.vision_model.*`; a stray
  `...position_ids` buffer is dropped), and `proj.weight` (text width, vision width);
* the pair written by the original's export script: `<name>_rwkv.pth` (the RWKV-6 keys, unprefixed) and
  `<name>_visual.pth` (`vit.*` and `proj.weight`).

The RWKV-6 part is validated and mapped by `convert_rwkv6`, the one key table both converters share. No file ships a
vision config: the vision tower is checked against the one given (CLIP ViT-L/14-336, the released models', by
default), tensor by tensor, and a mismatch names the sizes the weights imply. The output folder holds the model
(config, safetensors, generation config), the processor (image processor at the vision encoder's resolution, World
tokenizer with `"<image>"`, chat template, image position) and a model card; it appears complete or not at all.

VisualRWKV-HD (v0612) and -UHD (v0613) are full checkpoints with the DINOv2 + SigLIP + SAM backbone under `vit.` and an
MLP projector: told apart from v6.0 by their keys, their vision side is converted by `convert_sam_dino_siglip`.

VisualRWKV-7 (v0700) checkpoints hold an RWKV-7 ("x070") language model under `rwkv.` (told apart by its blocks'
keys, validated and mapped by `convert_rwkv7`, LoRA ranks read from the shapes), the same three-encoder backbone and
the input-gated MLP projector (`proj.gate`, `proj.o_proj`, `proj.ln_v`). Their converted config follows the original
v7 code: no image scanning, images first in the prompt (several allowed), the placeholder id 65535 (the original's,
so prompt ids are identical), and `tokens_per_image` (the original's `num_token_per_image`, 1024 in the release
scripts and not stored in the file) average-pooling the 32 x 32 feature map to a square grid.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path
from string import Template

import torch
from huggingface_hub import HfApi, ModelCardData
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, PreTrainedConfig
from transformers.core_model_loading import revert_weight_conversion
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from . import convert_rwkv6, convert_rwkv7
from .checkpoint_io import (
    MAX_SHARD_SIZE,
    atomic_output_dir,
    check_finite,
    check_output_dir,
    load_checkpoint,
    output_size,
    resolve_dtype,
    save_safetensors_shards,
)
from .configuration_sam_dino_siglip import SamDinoSiglipVisionConfig
from .configuration_visualrwkv import VisualRWKVConfig
from .convert_rwkv6 import check_state_dict, select_prefix
from .convert_sam_dino_siglip import (
    ORIGINAL_PREFIXES,
    convert_three_encoder_visual,
    is_three_encoder_checkpoint,
    read_tower_configs,
)
from .image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor
from .modeling_visualrwkv import VisualRWKVForConditionalGeneration
from .processing_visualrwkv import VisualRWKVProcessor, default_image_processor
from .projectors import detect_projector_type
from .remote_code import add_remote_code
from .tokenization_rwkv_world import PAD_TOKEN_ID, TURN_END_TOKEN_ID, RwkvWorldTokenizer

# Key prefixes of the original layout.
RWKV_PREFIX = "rwkv."
VISION_PREFIX = "vit."
# transformers 4 saved CLIPVisionModel weights under `vision_model.`; its 5.x models no longer have that level.
LEGACY_VISION_PREFIX = "vit.vision_model."
PROJECTOR_KEY = "proj.weight"

# Where each part lives in `VisualRWKVForConditionalGeneration`. `convert_rwkv6` maps onto `Rwkv6ForCausalLM`,
# whose backbone `model.` is our `model.language_model.`; the head `lm_head` is the same.
HF_VISION_PREFIX = "model.vision_tower."
HF_PROJECTOR_KEY = "model.multi_modal_projector.linear.weight"
CAUSAL_LM_BACKBONE_PREFIX = "model."
HF_TEXT_BACKBONE_PREFIX = "model.language_model."

# The converted folder's README.md, with ${metadata}, ${title} and ${settings_table} filled by `model_card`.
MODEL_CARD_TEMPLATE = Template((files(__package__) / "model_card_template.md").read_text(encoding="utf-8"))

# Released sizes, to name the model in its card: (layers, width) -> size.
RELEASED_SIZES = {(24, 2048): "1.6B", (32, 2560): "3B", (32, 4096): "7B"}

# The card's description and reported results, per family.
V6_DESCRIPTION = """\
VisualRWKV ("VisualRWKV: Exploring Recurrent Neural Networks for Visual Language Models", Hou, Zeng, Ma, Yu;
arXiv 2406.13362, COLING 2025) is a vision-language model on the RWKV-6 linear RNN: CLIP image features, projected,
are read by RWKV-6 blocks that scan the image patches in alternating directions. This folder is the original
checkpoint converted to a native transformers model by `visualrwkv convert` (package `visualrwkv_hf`)."""
V6_RESULTS = """\
## Results reported in the paper

| Model | VQAv2 | GQA | SQA-IMG | TextVQA | POPE | MME | MMBench | MMBench-CN |
|---|---|---|---|---|---|---|---|---|
| VisualRWKV-6 1.6B | 69.4 | 55.2 | 59.1 | 43.6 | 83.2 | 1204.9 | 55.8 | 53.2 |
| VisualRWKV-6 3B | 71.5 | 59.6 | 65.3 | 48.7 | 83.1 | 1369.2 | 59.5 | 56.3 |
| VisualRWKV-6 7B | 75.8 | 64.3 | 68.2 | 51.0 | 84.7 | 1387.8 | 65.8 | 63.7 |
| LLaVA-1.5-7B | 78.5 | 62.0 | 66.8 | 58.2 | 85.9 | 1510.7 | 64.3 | 30.5 |"""
HD_DESCRIPTION = """\
VisualRWKV-HD and VisualRWKV-UHD ("VisualRWKV-HD and UHD: Advancing High-Resolution Processing for Visual Language
Models", Hou et al., arXiv 2410.11665) read the image with three frozen encoders, DINOv2 ViT-L/14 with registers and
SigLIP so400m/14 at 448 px and SAM ViT-B at 1024 px, whose features (1024 tokens) an MLP projects into an RWKV-6
language model that scans them in alternating directions; UHD adds the image's four quarter tiles. This folder is the
original checkpoint converted to a native transformers model by `visualrwkv convert` (package `visualrwkv_hf`).

Two choices are not recorded by the release and are options here: the prompt's image position (the sandwich,
`image_position="middle"`, as the released 1.6B training script passes; "first" and "last" are available per call),
and for UHD how its MLP is read (ReLU, as its code at release time; converting with `--projector-type gated_mlp`
reads it gated instead)."""
HD_RESULTS = """\
## Results reported by the authors (official README of VisualRWKV-HD/UHD)

| Model | SQA | TextVQA | GQA | VizWiz | MME (perception / cognition) | POPE | MMBench | MMBench-CN |
|---|---|---|---|---|---|---|---|---|
| VisualRWKV-HD 1.6B (v0612) | 54.39 | 54.71 | 60.84 | 54.97 | 1378.62 / 266.07 | 86.0 | 60.31 | 55.41 |
| VisualRWKV-UHD 1.6B (v0613) | 56.97 | 56.31 | 59.52 | 49.88 | 1321.33 / 232.14 | 85.3 | 58.42 | 52.84 |"""

V7_DESCRIPTION = """\
VisualRWKV-7 (v0700, the VisualRWKV-v7/v7.00 code of howard-hou/VisualRWKV) reads each image with three frozen
encoders, DINOv2 ViT-L/14 with registers and SigLIP so400m/14 at 448 px and SAM ViT-B at 1024 px, whose 1024 x 3200
features an input-gated MLP with LayerNorm projects into an RWKV-7 ("Goose", x070) language model; the image tokens are
read in one direction like text (no scanning), and a prompt may hold several images, each on its own line before the
question. This folder is the original checkpoint converted to a native transformers model by `visualrwkv convert`
(package `visualrwkv_hf`).

Two settings are not stored in the release file and are options here: the tokens per image (1024, the release
scripts' `num_token_per_image`; `visualrwkv convert --tokens-per-image N` pools to fewer), and the original's
inference-time left padding (it prepends "\\n\\n" tokens, id 261, until the prompt length is a multiple of 16): off by
default, since training never saw it; the processor's `prompt_pad_multiple=16` reproduces the original's first
generated token exactly (later tokens use our cache, where the original re-pads its whole sequence at every step)."""
V7_RESULTS_HEADER = """\
## Results reported by the authors (official README of VisualRWKV)

| Model | VQAv2 (test-dev) | SQA-IMG | TextVQA | GQA |
|---|---|---|---|---|"""
# (layers, width) of the released VisualRWKV-7 language models -> (size, file tag, VQAv2 / SQA-IMG / TextVQA / GQA).
V7_RELEASES = {
    (12, 768): ("0.1B", "0B1", "75.22 | 50.62 | 37.90 | 59.92"),
    (24, 1024): ("0.4B", "0B4", "77.85 | 54.98 | 41.05 | 62.30"),
    (24, 2048): ("1.5B", "1B5", "79.84 | 59.74 | 49.49 | 63.20"),
}

# An RWKV-7 ("x070") block's tensor, which x060 blocks do not have: a VisualRWKV-7 (v0700) checkpoint.
RWKV7_MARKER = "blocks.0.att.x_r"
# VisualRWKV-7's image placeholder (the original's IMAGE_TOKEN_INDEX, the vocabulary's last row, overwritten by the
# image features), and its tokens per image in the release scripts (the 32 x 32 feature map unpooled).
V7_IMAGE_TOKEN_ID = 65535
V7_TOKENS_PER_IMAGE = 1024

_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class OriginalCheckpoint:
    """The tensors of an original VisualRWKV checkpoint, read from one full file or from the exported pair.

    `rwkv` holds BlinkDL RWKV-6 keys under `rwkv_prefix`; `visual` holds `vit.*` and `proj.weight`. The sources name
    the files in error messages.
    """

    rwkv: dict[str, torch.Tensor]
    rwkv_prefix: str
    rwkv_source: str
    visual: dict[str, torch.Tensor]
    visual_source: str

    @classmethod
    def from_full(cls, state_dict: object, source: str = "the checkpoint") -> OriginalCheckpoint:
        tensors = select_prefix(state_dict, "", source)
        if not any(k.startswith(RWKV_PREFIX) for k in tensors):
            hint = ""
            if "emb.weight" in tensors:
                hint = (
                    " It looks like an RWKV-6 language model alone (such as the `_rwkv.pth` half of an exported "
                    "pair): give it with its visual file (--rwkv A_rwkv.pth --visual A_visual.pth), or convert it "
                    "as a language model with `visualrwkv convert-rwkv6`."
                )
            elif any(k.startswith(VISION_PREFIX) for k in tensors):
                hint = (
                    " It looks like the `_visual.pth` half of an exported pair: give it with its RWKV-6 file "
                    "(--rwkv A_rwkv.pth --visual A_visual.pth)."
                )
            raise ValueError(
                f"{source} is not a full VisualRWKV checkpoint: expected 'rwkv.*' (the RWKV-6 language model), "
                f"'vit.*' (the vision tower) and 'proj.weight' (the projector).{hint}"
            )
        visual = {k: v for k, v in tensors.items() if not k.startswith(RWKV_PREFIX)}
        _check_has_vision_tower(visual, source, rwkv7=RWKV_PREFIX + RWKV7_MARKER in tensors)
        return cls(tensors, RWKV_PREFIX, source, visual, source)

    @classmethod
    def from_pair(
        cls,
        rwkv_state_dict: object,
        visual_state_dict: object,
        rwkv_source: str = "the RWKV-6 weights",
        visual_source: str = "the visual weights",
    ) -> OriginalCheckpoint:
        rwkv = select_prefix(rwkv_state_dict, "", rwkv_source)
        if any(k.startswith(RWKV_PREFIX) for k in rwkv):
            raise ValueError(
                f"{rwkv_source} has 'rwkv.*' keys: it is a full VisualRWKV checkpoint, not the `_rwkv.pth` half of "
                "an exported pair. Give it alone (--checkpoint)."
            )
        visual = select_prefix(visual_state_dict, "", visual_source)
        swapped = "emb.weight" in visual and any(k.startswith(VISION_PREFIX) for k in rwkv)
        _check_has_vision_tower(
            visual, visual_source, " Are the RWKV-6 and visual files swapped?" if swapped else "",
            rwkv7=RWKV7_MARKER in rwkv,
        )
        return cls(rwkv, "", rwkv_source, visual, visual_source)

    @property
    def is_visualrwkv7(self) -> bool:
        """Whether the language model is RWKV-7 (x070): a VisualRWKV-7 (v0700) checkpoint."""
        return self.rwkv_prefix + RWKV7_MARKER in self.rwkv


def _check_has_vision_tower(
    visual: Mapping[str, torch.Tensor], source: str, hint: str = "", rwkv7: bool = False
) -> None:
    if rwkv7 and not is_three_encoder_checkpoint(visual):
        towers = ", ".join(f"'{VISION_PREFIX}{prefix}*'" for prefix in ORIGINAL_PREFIXES)
        raise ValueError(
            f"{source} has an RWKV-7 (x070) language model but not VisualRWKV-7's vision tower: a VisualRWKV-7 "
            f"(v0700) checkpoint holds the three encoders {towers} and the projector 'proj.*' next to 'rwkv.*'. A "
            "BlinkDL RWKV-7 language model alone (no 'rwkv.' prefix) converts with `visualrwkv convert-rwkv7`."
        )
    if not any(k.startswith(VISION_PREFIX) for k in visual):
        raise ValueError(
            f"{source} holds no vision tower: expected 'vit.*' tensors (a CLIP vision model) and 'proj.weight' next "
            f"to the RWKV-6 weights.{hint}"
        )


def load_vision_config(path: str | os.PathLike) -> PreTrainedConfig:
    """A vision encoder config from a JSON file or a folder holding `config.json`.

    A full CLIP or SigLIP config (text and vision) gives its vision part.
    """
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(
            f"Vision config {path} not found: give a JSON file or a folder holding config.json "
            "(for example a CLIPVisionConfig saved with save_pretrained)."
        )
    try:
        config = AutoConfig.from_pretrained(config_file, local_files_only=True)
    except (ValueError, KeyError, OSError, StrictDataclassError) as error:  # StrictDataclassError: invalid values
        raise ValueError(f"Cannot read the vision config {config_file}: {error}") from error
    return getattr(config, "vision_config", None) or config


def vision_sizes(config: PreTrainedConfig) -> dict[str, object]:
    """The sizes of a vision encoder config that its weights' shapes reveal."""
    names = ("hidden_size", "num_hidden_layers", "patch_size", "image_size", "intermediate_size")
    return {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}


def vision_sizes_from_weights(tensors: Mapping[str, torch.Tensor], has_cls_token: bool) -> dict[str, object]:
    """The sizes a ViT's weights imply (CLIP and SigLIP parameter names; keys relative to the vision model).

    The image size assumes a square grid; sizes whose tensors are absent or odd are left out.
    """
    sizes = {}
    patch_embedding = tensors.get("embeddings.patch_embedding.weight")  # (hidden, channels, patch, patch)
    position_embedding = tensors.get("embeddings.position_embedding.weight")  # (patches [+ cls], hidden)
    fc1 = tensors.get("encoder.layers.0.mlp.fc1.weight")  # (intermediate, hidden)
    layers = [int(m.group(1)) for k in tensors if (m := _LAYER_KEY.match(k))]
    if patch_embedding is not None and patch_embedding.dim() == 4:
        sizes["hidden_size"] = patch_embedding.shape[0]
    if layers:
        sizes["num_hidden_layers"] = 1 + max(layers)
    if patch_embedding is not None and patch_embedding.dim() == 4:
        sizes["patch_size"] = patch_size = patch_embedding.shape[-1]
        if position_embedding is not None and position_embedding.dim() == 2:
            num_patches = position_embedding.shape[0] - int(has_cls_token)
            side = math.isqrt(max(num_patches, 0))
            if side * side == num_patches:
                sizes["image_size"] = side * patch_size
    if fc1 is not None and fc1.dim() == 2:
        sizes["intermediate_size"] = fc1.shape[0]
    return sizes


def _format_sizes(sizes: Mapping[str, object]) -> str:
    return ", ".join(f"{name}={value}" for name, value in sizes.items())


def _vision_state_dict(
    visual: Mapping[str, torch.Tensor], config: VisualRWKVConfig, source: str
) -> tuple[dict[str, torch.Tensor], str]:
    """The vision tower's tensors (keys relative to it), checked against `config.vision_config`, and the prefix
    they have in the file."""
    with torch.device("meta"):  # shapes only: builds no weights, even for a ViT-L
        vision_tower = AutoModel.from_config(config.vision_config)
    expected = {k: tuple(v.shape) for k, v in vision_tower.state_dict().items()}
    non_persistent_buffers = {name for name, _ in vision_tower.named_buffers()} - expected.keys()
    vision = {k: v for k, v in visual.items() if k.startswith(VISION_PREFIX)}
    prefix = LEGACY_VISION_PREFIX if any(k.startswith(LEGACY_VISION_PREFIX) for k in vision) else VISION_PREFIX
    # Buffers the model recomputes (CLIP's position_ids), which older transformers saved.
    vision = {k: v for k, v in vision.items() if k.removeprefix(prefix) not in non_persistent_buffers}
    file_sizes = vision_sizes_from_weights(
        {k.removeprefix(prefix): v for k, v in vision.items()}, config.vision_has_cls_token
    )
    check_state_dict(
        vision,
        {prefix + k: shape for k, shape in expected.items()},
        f"The vision tower in {source} does not match the vision config ({config.vision_config.model_type}: "
        f"{_format_sizes(vision_sizes(config.vision_config))}); its weights imply {_format_sizes(file_sizes)}. Give "
        "the matching config with --vision-config JSON_OR_DIR (vision_config=...). The differences",
    )
    return {k.removeprefix(prefix): v for k, v in vision.items()}, prefix


def visualrwkv7_grid_size(tokens_per_image: int | None) -> int:
    """`VisualRWKVConfig.grid_size` for VisualRWKV-7's tokens per image (the original's `num_token_per_image`): -1
    for None or 1024 (the released models: the 32 x 32 feature map unpooled), else the side g of the g x g grid the
    original's `nn.AdaptiveAvgPool2d` pools the map to (the model pools this backbone adaptively too). ValueError
    unless the count is g * g with 1 <= g <= 32."""
    if tokens_per_image is None:
        return -1
    rows, _ = SamDinoSiglipVisionConfig().feature_grid
    side = math.isqrt(tokens_per_image) if isinstance(tokens_per_image, int) and tokens_per_image > 0 else 0
    if not 1 <= side <= rows or side * side != tokens_per_image:
        raise ValueError(
            f"tokens_per_image {tokens_per_image!r} (--tokens-per-image) is not a grid VisualRWKV-7 can pool its "
            f"{rows} x {rows} feature map to: the original average-pools it to g x g tokens, so the count must be "
            f"g * g with 1 <= g <= {rows} (1, 4, 9, ..., {rows * rows}; the released models: {V7_TOKENS_PER_IMAGE})."
        )
    return -1 if side == rows else side


def _visualrwkv7_settings(
    checkpoint: OriginalCheckpoint,
    scan_mode: str | None,
    image_position: str | None,
    grid_size: int | None,
    tokens_per_image: int | None,
) -> dict[str, object]:
    """The `VisualRWKVConfig` settings of a VisualRWKV-7 conversion: the original v7 code's, which has no scanning,
    puts images first and marks them with id 65535."""
    if scan_mode not in (None, "unidirectional"):
        raise ValueError(
            f"{checkpoint.rwkv_source} is a VisualRWKV-7 (v0700) checkpoint, which reads the image tokens in one "
            f"direction like text (the original has no scanning): scan_mode {scan_mode!r} does not apply; leave "
            "--scan-mode out."
        )
    if grid_size is not None:
        raise ValueError(
            f"{checkpoint.rwkv_source} is a VisualRWKV-7 (v0700) checkpoint: give its tokens per image as "
            "tokens_per_image (--tokens-per-image N, the original's num_token_per_image), not grid_size."
        )
    names = {key.removeprefix("proj.") for key in checkpoint.visual if key.startswith("proj.")}
    layout = detect_projector_type(names)
    if layout not in ("input_gated_mlp", "linear"):
        raise ValueError(
            f"{checkpoint.visual_source} has an RWKV-7 (x070) language model with the {layout} projector tensors "
            f"{sorted('proj.' + name for name in names)} of VisualRWKV-HD/UHD: VisualRWKV-7's projector is "
            "proj.gate.weight, proj.o_proj.weight and proj.ln_v.{weight,bias} (or proj.weight if trained linear)."
        )
    return {
        "scan_mode": "unidirectional",
        "image_position": image_position or "first",
        "grid_size": visualrwkv7_grid_size(tokens_per_image),
        "image_token_id": V7_IMAGE_TOKEN_ID,
    }


def convert_original_to_hf(
    checkpoint: OriginalCheckpoint,
    vision_config: PreTrainedConfig | dict | None = None,
    dtype: str | torch.dtype | None = None,
    scan_mode: str | None = None,
    image_position: str | None = None,
    grid_size: int | None = None,
    progress: bool = False,
    allow_nonfinite: bool = False,
    projector_type: str | None = None,
    tokens_per_image: int | None = None,
    cast: bool = True,
) -> tuple[VisualRWKVConfig, dict[str, torch.Tensor]]:
    """Validates an original checkpoint and returns the `VisualRWKVConfig` and the state dict of
    `VisualRWKVForConditionalGeneration`.

    `vision_config` defaults to CLIP ViT-L/14-336; `scan_mode`, `image_position` and `grid_size` left as None take
    `VisualRWKVConfig`'s defaults, the released models' settings. `dtype` "auto"/None keeps the checkpoint's own.
    Raises ValueError naming every problem (missing, unexpected or mis-shaped tensors, a mismatched vision config,
    NaN or infinite weights unless `allow_nonfinite`).

    A VisualRWKV-HD/UHD checkpoint (DINOv2 + SigLIP + SAM under `vit.`) takes `vision_config` as its towers' sizes
    (`convert_sam_dino_siglip`; the released towers by default) and `projector_type` to override how its MLP is
    read; a v6.0 one refuses `projector_type` other than "linear". A VisualRWKV-7 one (RWKV-7 blocks under `rwkv.`)
    takes the same tower sizes and `tokens_per_image` (1024, the released models', by default) instead of
    `grid_size`; its scan mode is "unidirectional" and its image position "first" unless given.
    With `cast=False` the tensors keep the file's dtype (views of the checkpoint's, nothing copied), for
    `save_visualrwkv_folder` to cast as it writes.
    """
    if checkpoint.is_visualrwkv7:
        settings = _visualrwkv7_settings(checkpoint, scan_mode, image_position, grid_size, tokens_per_image)
    elif tokens_per_image is not None:
        raise ValueError(
            f"tokens_per_image (--tokens-per-image) applies to VisualRWKV-7 (v0700) checkpoints, and "
            f"{checkpoint.rwkv_source} holds an RWKV-6 language model: use grid_size (--grid-size) to pool its "
            "image tokens."
        )
    else:
        settings = {"scan_mode": scan_mode, "image_position": image_position, "grid_size": grid_size}
    dtype = resolve_dtype(dtype, {**checkpoint.rwkv, **checkpoint.visual})
    language_model = convert_rwkv7 if checkpoint.is_visualrwkv7 else convert_rwkv6
    text_config, text_state_dict = language_model.convert_blinkdl_to_hf(
        checkpoint.rwkv, dtype, checkpoint.rwkv_prefix, checkpoint.rwkv_source, progress, allow_nonfinite, cast
    )
    text_state_dict = {
        HF_TEXT_BACKBONE_PREFIX + k.removeprefix(CAUSAL_LM_BACKBONE_PREFIX) if k.startswith(CAUSAL_LM_BACKBONE_PREFIX)
        else k: v
        for k, v in text_state_dict.items()
    }
    if is_three_encoder_checkpoint(checkpoint.visual):
        config, visual_state_dict = convert_three_encoder_visual(
            checkpoint.visual, text_config, dtype, checkpoint.visual_source, vision_config, projector_type, settings,
            allow_nonfinite, cast,
        )
        if checkpoint.is_visualrwkv7 and config.vision_config.tiles_per_side:
            raise ValueError(
                f"The projector in {checkpoint.visual_source} reads {config.vision_config.feature_size} "
                "channels, VisualRWKV-UHD's whole image + tiles; VisualRWKV-7 reads whole images "
                f"({config.vision_config.feature_size // 2} channels with these towers)."
            )
        config.dtype = dtype
        return config, text_state_dict | visual_state_dict
    if projector_type not in (None, "linear"):
        raise ValueError(
            f"{checkpoint.visual_source} is a VisualRWKV-6.0 checkpoint, whose projector is linear (proj.weight); "
            f"`projector_type` {projector_type!r} does not apply."
        )
    config = VisualRWKVConfig(
        vision_config=vision_config,
        text_config=text_config,
        **{name: value for name, value in settings.items() if value is not None},
    )
    config.dtype = dtype
    vision_state_dict, vision_prefix = _vision_state_dict(checkpoint.visual, config, checkpoint.visual_source)
    projector_shape = (text_config.hidden_size, config.vision_config.hidden_size)
    check_state_dict(
        {k: v for k, v in checkpoint.visual.items() if not k.startswith(VISION_PREFIX)},
        {PROJECTOR_KEY: projector_shape},
        f"The projector in {checkpoint.visual_source} does not match (text hidden_size "
        f"{text_config.hidden_size}, vision hidden_size {config.vision_config.hidden_size})",
    )

    state_dict = dict(text_state_dict)
    state_dict.update(
        {HF_VISION_PREFIX + k: v.to(dtype if cast else v.dtype).contiguous() for k, v in vision_state_dict.items()}
    )
    projector = checkpoint.visual[PROJECTOR_KEY]
    state_dict[HF_PROJECTOR_KEY] = projector.to(dtype if cast else projector.dtype).contiguous()
    if not allow_nonfinite:
        file_keys = [vision_prefix + k for k in vision_state_dict] + [PROJECTOR_KEY]
        check_finite({key: checkpoint.visual[key] for key in file_keys}, checkpoint.visual_source, dtype)
    return config, state_dict


def image_processor_for(config: VisualRWKVConfig):
    """The image processor matching the vision encoder: SigLIP's own (plain resize, mean/std 0.5) for SigLIP towers,
    the three-encoder backbone's (`SamDinoSiglipImageProcessor`) for VisualRWKV-HD/UHD, otherwise
    `default_image_processor()` (CLIP's resize, crop and normalisation) at the encoder's resolution."""
    if config.multi_encoder_vision:
        vision = config.vision_config
        return SamDinoSiglipImageProcessor(vision.image_size, vision.high_res_image_size, vision.tiles_per_side)
    rows, cols = config.patch_grid
    height, width = rows * config.vision_config.patch_size, cols * config.vision_config.patch_size
    if config.vision_config.model_type.startswith("siglip"):
        return SiglipImageProcessorPil(size={"height": height, "width": width})
    base = default_image_processor()
    return type(base).from_dict(
        base.to_dict(), size={"shortest_edge": min(height, width)}, crop_size={"height": height, "width": width}
    )


def model_card(config: VisualRWKVConfig, sources: list[str]) -> str:
    """README.md for a converted folder (`model_card_template.md`): what it is, how it was converted, how to use it,
    the paper's results."""
    text = config.text_config
    rwkv7 = config.rwkv7_text
    size = RELEASED_SIZES.get((text.num_hidden_layers, text.hidden_size))
    vision = config.vision_config
    if rwkv7:
        release = V7_RELEASES.get((text.num_hidden_layers, text.hidden_size))
        title = f"VisualRWKV-7 {release[0]} (v0700-{release[1]})" if release else "VisualRWKV-7 (v0700)"
        rows = [
            f"| VisualRWKV-7 {name} (v0700-{tag}){' (this model)' if (name, tag, numbers) == release else ''} | "
            f"{numbers} |"
            for name, tag, numbers in V7_RELEASES.values()
        ]
        description, results = V7_DESCRIPTION, "\n".join([V7_RESULTS_HEADER, *rows])
    elif config.multi_encoder_vision:
        family = "VisualRWKV-UHD" if vision.tiles_per_side else "VisualRWKV-HD"
        release = "v0613" if vision.tiles_per_side else "v0612"
        title = f"{family} {size} ({release})" if size else family
        description, results = HD_DESCRIPTION, HD_RESULTS
    else:
        title = f"VisualRWKV-6 {size}" if size else "VisualRWKV-6"
        description, results = V6_DESCRIPTION, V6_RESULTS
    if config.multi_encoder_vision:
        encoder = (
            f"DINOv2 with registers ({_format_sizes(vision_sizes(vision.dino_config))}, block "
            f"{vision.dino_feature_layer}) + SigLIP ({_format_sizes(vision_sizes(vision.siglip_config))}, block "
            f"{vision.siglip_feature_layer}) + SAM ({_format_sizes(vision_sizes(vision.sam_config))}), "
            + ("whole image and 2 x 2 tiles" if vision.tiles_per_side else "whole image")
        )
    else:
        encoder = f"`{vision.model_type}`: {_format_sizes(vision_sizes(vision))}"
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["visualrwkv", "rwkv", "rwkv7" if rwkv7 else "rwkv6", "vision-language", "linear-rnn"],
    ).to_yaml()
    language_model = f"{text.num_hidden_layers} layers x {text.hidden_size}, vocab {text.vocab_size}"
    if rwkv7:
        language_model = (
            f"RWKV-7 (x070), {language_model}, LoRA ranks decay {text.decay_low_rank_dim} / a {text.a_low_rank_dim} "
            f"/ v {text.v_low_rank_dim} / gate {text.gate_low_rank_dim}"
        )
    else:
        language_model = f"RWKV-6 (x060), {language_model}"
    image_position = config.image_position + (" (the sandwich prompt)" if config.image_position == "middle" else "")
    if rwkv7 and config.image_position == "first":
        image_position += ' (several images: one "<image>" line each, then the text)'
    settings = [
        ("Converted from", ", ".join(f"`{source}`" for source in sources)),
        ("Weights dtype", str(config.dtype).removeprefix("torch.")),
        ("Language model", language_model),
        ("Vision encoder", encoder),
        ("Projector (`projector_type`)", config.projector_type),
        ("Image tokens", f"{config.num_image_tokens}{' per image' if rwkv7 else ''} (grid_size {config.grid_size}, "
                         f"{'cls token last' if config.vision_has_cls_token else 'no cls token'}), placeholder id "
                         f"{config.image_token_id}"),
        ("Image scanning (`scan_mode`)", config.scan_mode),
        ("Image position in the prompt (`image_position`)", image_position),
        ("Generation", f'greedy, stops at "\\n\\n" (eos {TURN_END_TOKEN_ID}), pad {PAD_TOKEN_ID}'),
        ("Converter", f"visualrwkv-hf {version('visualrwkv-hf')}"),
    ]
    settings_table = "\n".join(f"| {name} | {value} |" for name, value in settings)
    return MODEL_CARD_TEMPLATE.substitute(
        metadata=metadata, title=title, description=description, settings_table=settings_table, results=results
    )


def save_visualrwkv_folder(
    directory: Path,
    config: VisualRWKVConfig,
    state_dict: Mapping[str, torch.Tensor],
    sources: list[str],
    max_shard_size: int | str = MAX_SHARD_SIZE,
    progress: bool = False,
) -> None:
    """Writes model (weights cast to `config.dtype` shard by shard), generation config, processor and model card: a
    folder the Auto classes load."""
    with torch.device("meta"):  # shapes only: the model checks the names and shapes, the weights are written below
        model = VisualRWKVForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # Keeps what the model's default generation config holds (the image placeholder is never generated).
    model.generation_config.eos_token_id = TURN_END_TOKEN_ID
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.do_sample = False  # the original generates greedily only
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    # The names save_pretrained writes: transformers' towers keep their original checkpoints' names on disk (DINOv2's
    # attention.attention.query, ...). Renaming passes the tensors through, still uncast.
    weights = revert_weight_conversion(model, dict(state_dict))
    save_safetensors_shards(directory, weights, config.dtype, max_shard_size, progress)
    VisualRWKVProcessor(
        image_processor=image_processor_for(config),
        tokenizer=RwkvWorldTokenizer(),
        image_position=config.image_position,
        num_image_tokens=config.num_image_tokens,
        image_token_id=config.image_token_id,
    ).save_pretrained(directory)
    (directory / "README.md").write_text(model_card(config, sources), encoding="utf-8")


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str) -> str:
    """Uploads a converted folder to a Hub model repository (created if needed); returns the repository's URL.

    Uses the token of `hf auth login` or `HF_TOKEN`.
    """
    api = HfApi()
    repo = api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
        repo_id=repo.repo_id,
        repo_type="model",
        folder_path=folder,
        commit_message="Upload VisualRWKV converted with visualrwkv-hf",
    )
    return repo.url


def convert_visualrwkv_checkpoint(
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    rwkv: str | os.PathLike | None = None,
    visual: str | os.PathLike | None = None,
    vision_config: str | os.PathLike | None = None,
    scan_mode: str | None = None,
    image_position: str | None = None,
    grid_size: int | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    progress: bool = True,
    remote_code: bool = False,
    allow_nonfinite: bool = False,
    projector_type: str | None = None,
    tokens_per_image: int | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> Path:
    """Converts an original VisualRWKV checkpoint into a Hugging Face folder; returns the folder.

    Give either `checkpoint` (the full `.pth`) or `rwkv` and `visual` (the exported pair). `vision_config` is a JSON
    file or a folder holding config.json (default: CLIP ViT-L/14-336), or for VisualRWKV-HD/UHD a JSON object
    `{"dino": {...}, "siglip": {...}, "sam": {...}}` of tower config arguments (default: the released towers);
    `projector_type` overrides how an HD/UHD MLP projector is read ("gated_mlp" or "relu_mlp"); `tokens_per_image`
    pools a VisualRWKV-7 model's image tokens (g * g with g <= 32; 1024 by default). Settings left as None
    take the released models' (VisualRWKV-6/HD/UHD: bidirectional scan, sandwich prompt, all patches; VisualRWKV-7:
    no scan, images first, 1024 tokens per image). With `push_to_hub`, the finished folder is uploaded to that
    Hub repository. With `remote_code`, the folder also carries this package's code (`auto_map`), so it loads with
    `trust_remote_code=True` where the package is not installed.

    Everything is validated before anything is written, and the folder appears complete or not at all; an output
    folder holding one of the input files (or the vision config) is refused, even with `overwrite`. NaN or infinite
    weights are refused unless `allow_nonfinite`. The files are streamed: memory holds at most one weight shard
    (`max_shard_size`) of cast tensors, none when the dtype is kept. Raises ValueError (not a VisualRWKV checkpoint,
    inconsistent tensors, a vision config that does not fit, non-finite weights, an output that would delete an input),
    FileNotFoundError, FileExistsError or OSError (unreadable, out of space).
    """
    if (checkpoint is None) == (rwkv is None and visual is None) or (checkpoint is None and None in (rwkv, visual)):
        raise ValueError(
            "Give either a full VisualRWKV checkpoint (--checkpoint X.pth) or both files of an exported pair "
            "(--rwkv A_rwkv.pth --visual A_visual.pth)."
        )
    output_dir = Path(output_dir)
    inputs = [path for path in (checkpoint, rwkv, visual, vision_config) if path is not None]
    check_output_dir(output_dir.absolute(), overwrite, inputs)  # fail before reading a multi-GB file
    visualrwkv7_grid_size(tokens_per_image)  # likewise
    loaded_vision_config = None
    if vision_config is not None:
        loaded_vision_config = read_tower_configs(vision_config) or load_vision_config(vision_config)
    if checkpoint is not None:
        sources = [Path(checkpoint).name]
        original = OriginalCheckpoint.from_full(load_checkpoint(checkpoint), str(checkpoint))
    else:
        sources = [Path(rwkv).name, Path(visual).name]
        original = OriginalCheckpoint.from_pair(load_checkpoint(rwkv), load_checkpoint(visual), str(rwkv), str(visual))
    config, state_dict = convert_original_to_hf(
        original, loaded_vision_config, dtype, scan_mode, image_position, grid_size, progress, allow_nonfinite,
        projector_type, tokens_per_image, cast=False,
    )
    size = output_size(state_dict, config.dtype)
    with atomic_output_dir(output_dir, overwrite, inputs, size) as staging:
        save_visualrwkv_folder(staging, config, state_dict, sources, max_shard_size, progress)
        if remote_code:
            add_remote_code(staging)
    if push_to_hub:
        push_folder_to_hub(output_dir, push_to_hub)
    return output_dir


__all__ = [
    "OriginalCheckpoint",
    "convert_original_to_hf",
    "convert_visualrwkv_checkpoint",
    "image_processor_for",
    "model_card",
    "push_folder_to_hub",
    "visualrwkv7_grid_size",
]
