"""Configuration of VisualRWKV: a vision encoder, a projector and an RWKV language model (`Rwkv6Config` for
VisualRWKV-6 / HD / UHD, `Rwkv7Config` for VisualRWKV-7)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .configuration_rwkv6 import Rwkv6Config
from .configuration_rwkv7 import Rwkv7Config
from .configuration_rwkv_common import ModelTypeCheckMixin, accepted_model_types
from .configuration_sam_dino_siglip import SamDinoSiglipVisionConfig
from .projectors import check_projector_type
from .scanning import SCAN_MODES


# Where the processor puts the image in the prompt (the paper's and the original code's names); "middle" is the
# sandwich prompt.
IMAGE_POSITIONS = ("first", "middle", "last")

# The released models' vision tower: CLIP ViT-L/14 at 336 px (24 x 24 patches), the last layer without
# post_layernorm.
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# Vision model types whose encoder output starts with a class token; used when `vision_has_cls_token` is not set.
CLS_TOKEN_BY_VISION_MODEL_TYPE = {
    "clip_vision_model": True,
    "siglip_vision_model": False,
    SamDinoSiglipVisionConfig.model_type: False,
}

# The three-encoder backbone of VisualRWKV-HD/UHD/7 is a vision config like any other for `vision_config`.
AutoConfig.register(SamDinoSiglipVisionConfig.model_type, SamDinoSiglipVisionConfig, exist_ok=True)

# The language models `text_config` may hold, by the model types a dict (or a saved folder) names them with; a dict
# without a model type is an RWKV-6 one, as every folder saved before VisualRWKV-7.
TEXT_CONFIG_CLASSES = {
    **dict.fromkeys(accepted_model_types(Rwkv6Config), Rwkv6Config),
    **dict.fromkeys(accepted_model_types(Rwkv7Config), Rwkv7Config),
}


@strict
class VisualRWKVConfig(ModelTypeCheckMixin, PreTrainedConfig):
    r"""
    Configuration of VisualRWKV: a vision encoder, a projector and an RWKV language model. The defaults reproduce
    the released VisualRWKV-6 1.6B model (CLIP ViT-L/14-336, all 576 patches with the cls token last, linear
    projector, bidirectional scan, sandwich prompt, RWKV-6 text 24 x 2048). VisualRWKV-HD and -UHD use the
    three-encoder backbone (`SamDinoSiglipVisionConfig`: 1024 tokens, no cls token) and an MLP projector.
    VisualRWKV-7 uses that backbone, the "input_gated_mlp" projector and an RWKV-7 language model (`Rwkv7Config`),
    reads the image tokens in order (`scan_mode="unidirectional"`, which also allows several images per prompt) and
    puts the images first (`image_position="first"`, placeholder id 65535 as the original's).

    Args:
        vision_config: Any vision encoder config (`AutoConfig` model types, e.g. `clip_vision_model` or
            `siglip_vision_model`, or `visualrwkv_sam_dino_siglip` for the DINOv2 + SigLIP + SAM backbone, whose
            output is the feature map itself: `vision_feature_layer` does not apply to it); CLIP ViT-L/14-336 by
            default.
        text_config: The language model: an `Rwkv6Config` (the default; a dict without `model_type` is one) or an
            `Rwkv7Config` (a dict with `model_type="visualrwkv_rwkv7"`).
        image_token_id: Id of the image placeholder token; the processor repeats it `num_image_tokens` times per
            image and the model replaces those positions with the image features. 65530 is the first unused id of the
            World vocabulary; VisualRWKV-7 used 65535.
        vision_feature_layer: Which vision encoder hidden state to use; -1 is the last layer (before any
            post-layernorm).
        vision_has_cls_token: Whether the vision encoder output starts with a class token (moved after the patches).
            `None` infers it from the vision model type (CLIP: yes, SigLIP: no).
        grid_size: Patch tokens kept per image: -1 all patches; 0 none (cls only); g >= 1 average-pools the patch grid
            with kernel = stride = rows // g (g = 1: the mean patch). The three-encoder backbone's 32 x 32 map is
            pooled adaptively to g x g (any g up to 32), as VisualRWKV-7's `num_token_per_image` = g * g.
        scan_mode: The order in which blocks read the image patches: "unidirectional" (row-major everywhere),
            "bidirectional" (odd blocks reversed) or "multidirectional" (row-major, reversed, column-major, reversed,
            by block index mod 4; needs a square grid). See `scanning.py`. Only "unidirectional" allows several
            images per prompt (scanning reorders one image span per row), and an RWKV-7 language model takes only
            it (VisualRWKV-7 does not scan).
        image_position: Where the processor puts the image in the prompt: "first", "middle" (the sandwich prompt)
            or "last".
        projector_bias: Whether the linear vision-to-text projection has a bias (the released models: no).
        projector_type: "linear" (VisualRWKV-6.0), "gated_mlp" (HD), "relu_mlp" (UHD) or "input_gated_mlp"
            (VisualRWKV-7); see `projectors.py`.
    """

    model_type = "visualrwkv"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L_14_336
        ),
        # A dict naming RWKV-7 becomes an `Rwkv7Config` in `__post_init__`, before this default would read it.
        "text_config": SubConfigSpec(config_class=Rwkv6Config),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 65530
    vision_feature_layer: int = -1
    vision_has_cls_token: bool | None = None
    grid_size: int = -1
    scan_mode: str = "bidirectional"
    image_position: str = "middle"
    projector_bias: bool = False
    projector_type: str = "linear"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.pop_model_type(kwargs)
        self.text_config = text_config_of(self.text_config)
        super().__post_init__(**kwargs)  # builds the other sub-configs
        vision, text = self.vision_config, self.text_config
        if self.scan_mode not in SCAN_MODES:
            raise ValueError(f"Unknown `scan_mode` {self.scan_mode!r}; expected one of {SCAN_MODES}.")
        if self.image_position not in IMAGE_POSITIONS:
            raise ValueError(f"Unknown `image_position` {self.image_position!r}; expected one of {IMAGE_POSITIONS}.")
        check_projector_type(self.projector_type)
        if self.rwkv7_text and self.scan_mode != "unidirectional":
            raise ValueError(
                f"An RWKV-7 language model reads the image tokens in order (VisualRWKV-7 does not scan): `scan_mode` "
                f"must be 'unidirectional', got {self.scan_mode!r}."
            )
        if self.vision_has_cls_token is None:
            if vision.model_type not in CLS_TOKEN_BY_VISION_MODEL_TYPE:
                raise ValueError(
                    f"Cannot tell whether a `{vision.model_type}` vision encoder outputs a class token: set "
                    "`vision_has_cls_token` explicitly."
                )
            self.vision_has_cls_token = CLS_TOKEN_BY_VISION_MODEL_TYPE[vision.model_type]
        if not 0 <= self.image_token_id < text.vocab_size:
            raise ValueError(
                f"`image_token_id` ({self.image_token_id}) must be a row of the text embedding (vocab_size "
                f"{text.vocab_size})."
            )
        num_hidden_states = getattr(vision, "num_hidden_layers", 0) + 1  # the embeddings, then every encoder layer
        if not self.multi_encoder_vision and not -num_hidden_states <= self.vision_feature_layer < num_hidden_states:
            raise ValueError(
                f"`vision_feature_layer` ({self.vision_feature_layer}) must index one of the vision encoder's "
                f"{num_hidden_states} hidden states."
            )
        if self.tie_word_embeddings:
            raise ValueError("VisualRWKV's head is not tied to its embedding: `tie_word_embeddings` must be False.")

        rows, cols = self.patch_grid
        if self.grid_size < -1:
            raise ValueError(f"`grid_size` must be -1 (all patches), 0 (cls only) or positive, got {self.grid_size}.")
        if self.grid_size == 0 and not self.vision_has_cls_token:
            raise ValueError("`grid_size=0` keeps only the cls token, but this vision encoder has none.")
        if self.grid_size > 0 and self.multi_encoder_vision:
            if self.grid_size > min(rows, cols):
                raise ValueError(
                    f"`grid_size` {self.grid_size} is larger than the vision backbone's {rows} x {cols} feature map: "
                    "pooling can only shrink it."
                )
        elif self.grid_size > 0:
            kernel = rows // self.grid_size
            if kernel == 0 or rows % self.grid_size or cols % kernel:
                raise ValueError(
                    f"`grid_size` {self.grid_size} does not divide the {rows} x {cols} patch grid: pooling uses "
                    f"kernel = stride = rows // grid_size, which must tile the grid exactly."
                )
        if self.scan_mode == "multidirectional":
            scan_rows, scan_cols = self.image_grid
            if scan_rows != scan_cols:
                raise ValueError(
                    f"`scan_mode='multidirectional'` reads the patches column by column too, which needs a square "
                    f"grid; this configuration gives a {scan_rows} x {scan_cols} grid."
                )

    @property
    def multi_encoder_vision(self) -> bool:
        """Whether the vision tower is the DINOv2 + SigLIP + SAM backbone (its output is the feature map itself)."""
        # by model type: with remote code, several copies of the config class may be loaded
        return getattr(self.vision_config, "model_type", None) == SamDinoSiglipVisionConfig.model_type

    @property
    def rwkv7_text(self) -> bool:
        """Whether the language model is RWKV-7 (VisualRWKV-7) rather than RWKV-6."""
        # by model type, as `multi_encoder_vision`
        return getattr(self.text_config, "model_type", None) == Rwkv7Config.model_type

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of patches the vision encoder produces."""
        if self.multi_encoder_vision:
            return self.vision_config.feature_grid
        image_size, patch_size = self.vision_config.image_size, self.vision_config.patch_size
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"Vision image size {image_size} is not a multiple of the patch size {patch_size}.")
        return height // patch_size, width // patch_size

    @property
    def image_grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch tokens the language model sees, after grid pooling ((0, 0) for cls only)."""
        rows, cols = self.patch_grid
        if self.grid_size == -1:
            return rows, cols
        if self.grid_size == 0:
            return 0, 0
        if self.multi_encoder_vision:
            return self.grid_size, self.grid_size
        kernel = rows // self.grid_size
        return rows // kernel, cols // kernel

    @property
    def num_image_tokens(self) -> int:
        """Feature vectors per image: the (pooled) patches, then the cls token when the encoder has one."""
        rows, cols = self.image_grid
        return rows * cols + int(self.vision_has_cls_token)


def text_config_of(text_config):
    """`text_config` as given, or a dict naming RWKV-7 built into an `Rwkv7Config` (any other dict is left for the
    RWKV-6 default); refuses a config or model type of any other language model."""
    if isinstance(text_config, dict):
        model_type = text_config.get("model_type", Rwkv6Config.model_type)
        if model_type not in TEXT_CONFIG_CLASSES:
            raise ValueError(
                f"`text_config` is a {model_type!r} configuration; VisualRWKV's language model is RWKV-6 "
                f"({Rwkv6Config.model_type!r}) or RWKV-7 ({Rwkv7Config.model_type!r})."
            )
        return Rwkv7Config(**text_config) if TEXT_CONFIG_CLASSES[model_type] is Rwkv7Config else text_config
    if text_config is not None and getattr(text_config, "model_type", None) not in TEXT_CONFIG_CLASSES:
        raise ValueError(
            f"`text_config` is a {type(text_config).__name__}; VisualRWKV's language model is an `Rwkv6Config` or an "
            "`Rwkv7Config`."
        )
    return text_config


__all__ = ["IMAGE_POSITIONS", "VisualRWKVConfig"]
