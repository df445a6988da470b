"""Configuration of the three-encoder vision backbone of VisualRWKV-HD, -UHD and VisualRWKV-7 (DINOv2 + SigLIP + SAM).

The original (`SamDinoSigLIPViTBackbone`) runs DINOv2 ViT-L/14 with 4 registers and SigLIP so400m/14 at 448 px and
SAM's ViT-B image encoder at 1024 px, takes each ViT's second-to-last block output (no final norm, no prefix tokens)
and SAM's neck output folded 2x2 into channels, and concatenates the three 32 x 32 maps along channels. The defaults
here are the released towers; tests shrink widths and depths (not the image sizes: SAM's 2x2 fold must land on the
ViTs' 32 x 32 grid).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Dinov2WithRegistersConfig, SamVisionConfig, SiglipVisionConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

# timm's `vit_large_patch14_reg4_dinov2` built at img_size=448, as the original creates it.
DINOV2_L14_REG4_448 = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "image_size": 448,
    "patch_size": 14,
    "num_register_tokens": 4,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
}

# timm's `vit_so400m_patch14_siglip_384` built at img_size=448. timm runs it with exact (erf) GELU, not the tanh
# approximation transformers' SigLIP configs default to; its attention-pooling head is never used (dropped).
SIGLIP_SO400M_14_448 = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 448,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "vision_use_head": False,
}

# Meta's SAM ViT-B image encoder (`build_sam_vit_b`) with its neck.
SAM_VIT_B_1024 = {
    "hidden_size": 768,
    "output_channels": 256,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 1024,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "window_size": 14,
    "global_attn_indexes": [2, 5, 8, 11],
}

# The original's per-encoder normalisation (timm's configs for DINOv2 and SigLIP; SAM reuses DINOv2's).
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIGLIP_MEAN, SIGLIP_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]

# SAM's neck map is folded 2 x 2 into channels (the original's "lossless downsampler").
SAM_FOLD = 2


@strict
class SamDinoSiglipVisionConfig(PreTrainedConfig):
    r"""
    The three-encoder vision backbone: DINOv2 with registers and SigLIP on the same 448 px image, SAM's image encoder on
    the 1024 px one, features concatenated along channels [DINOv2 | SigLIP | SAM] per cell of a common grid (32 x 32
    for the released towers: 1024 tokens of 1024 + 1152 + 4 x 256 = 3200 channels).

    Args:
        dino_config: `Dinov2WithRegistersConfig` (DINOv2 ViT-L/14, 4 registers, 448 px by default). A dict changes
            only the values it names, the others are the released tower's; the same for the other two.
        siglip_config: `SiglipVisionConfig` (SigLIP so400m/14 at 448 px, exact GELU, no pooling head by default).
        sam_config: `SamVisionConfig` (SAM ViT-B at 1024 px with its 256-channel neck by default).
        dino_feature_layer: Which DINOv2 block output to use, counted as Python indexes the blocks: -2 is the
            second-to-last (block 22 of 24), as the original. No final norm; the class and register tokens dropped.
        siglip_feature_layer: The same for SigLIP (-2: block 25 of 27).
        tiles_per_side: 0 reads the whole image only (VisualRWKV-HD, VisualRWKV-7). 2 is VisualRWKV-UHD: the whole
            image plus its 2 x 2 tiles; each tile's feature map is average-pooled 2 x 2, the pooled tiles are stitched
            back into one map, and its channels follow the whole image's (twice the channels).
        dino_image_mean, dino_image_std, siglip_image_mean, siglip_image_std, sam_image_mean, sam_image_std: Each
            encoder's normalisation, applied inside the model to pixels in [0, 1] (the processor only resizes and
            rescales, since DINOv2 and SigLIP read the same resized image).
    """

    model_type = "visualrwkv_sam_dino_siglip"
    sub_configs_defaults = {
        "dino_config": SubConfigSpec(config_class=Dinov2WithRegistersConfig, init_kwargs=DINOV2_L14_REG4_448),
        "siglip_config": SubConfigSpec(config_class=SiglipVisionConfig, init_kwargs=SIGLIP_SO400M_14_448),
        "sam_config": SubConfigSpec(config_class=SamVisionConfig, init_kwargs=SAM_VIT_B_1024),
    }

    dino_config: dict | PreTrainedConfig | None = None
    siglip_config: dict | PreTrainedConfig | None = None
    sam_config: dict | PreTrainedConfig | None = None
    dino_feature_layer: int = -2
    siglip_feature_layer: int = -2
    tiles_per_side: int = 0
    dino_image_mean: list[float] | None = None
    dino_image_std: list[float] | None = None
    siglip_image_mean: list[float] | None = None
    siglip_image_std: list[float] | None = None
    sam_image_mean: list[float] | None = None
    sam_image_std: list[float] | None = None

    def __post_init__(self, **kwargs):
        # A partial dict (as `--vision-config` gives for tiny towers) changes only what it names of the released tower.
        for name, spec in self.sub_configs_defaults.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, {**spec.init_kwargs, **getattr(self, name)})
        super().__post_init__(**kwargs)  # builds the sub-configs
        defaults = {
            "dino": (IMAGENET_MEAN, IMAGENET_STD),
            "siglip": (SIGLIP_MEAN, SIGLIP_STD),
            "sam": (IMAGENET_MEAN, IMAGENET_STD),
        }
        for name, (mean, std) in defaults.items():
            for suffix, default in (("mean", mean), ("std", std)):
                field = f"{name}_image_{suffix}"
                if getattr(self, field) is None:
                    setattr(self, field, list(default))
                value = getattr(self, field)
                if len(value) != 3 or (suffix == "std" and min(value) <= 0):
                    raise ValueError(f"`{field}` must be 3 numbers (RGB){' above 0' if suffix == 'std' else ''}, "
                                     f"got {value}.")
        for name in ("dino", "siglip"):
            layers = getattr(self, f"{name}_config").num_hidden_layers
            layer = getattr(self, f"{name}_feature_layer")
            if not -layers <= layer < layers:
                raise ValueError(f"`{name}_feature_layer` ({layer}) must index one of the {layers} {name} blocks.")
        if self.tiles_per_side not in (0, 2):
            raise ValueError(
                f"`tiles_per_side` must be 0 (whole image, VisualRWKV-HD / -7) or 2 (whole image + 2 x 2 tiles, "
                f"VisualRWKV-UHD), got {self.tiles_per_side}."
            )
        grids = {
            "dino": self._vit_grid(self.dino_config),
            "siglip": self._vit_grid(self.siglip_config),
            "sam": tuple(side // SAM_FOLD for side in self._vit_grid(self.sam_config)),
        }
        if len(set(grids.values())) != 1:
            raise ValueError(
                "The three encoders must give the same feature grid to be concatenated per cell, got "
                + ", ".join(f"{name} {rows} x {cols}" for name, (rows, cols) in grids.items())
                + f" (SAM's after its {SAM_FOLD} x {SAM_FOLD} fold). Change the image or patch sizes together."
            )
        if self.tiles_per_side and any(side % self.tiles_per_side for side in grids["dino"]):
            raise ValueError(f"The {grids['dino']} grid cannot be pooled by {self.tiles_per_side} per tile.")

    @staticmethod
    def _vit_grid(config: PreTrainedConfig) -> tuple[int, int]:
        size, patch = config.image_size, config.patch_size
        height, width = (size, size) if isinstance(size, int) else size
        patch_height, patch_width = (patch, patch) if isinstance(patch, int) else patch
        return height // patch_height, width // patch_width

    @property
    def image_size(self) -> int:
        """Side of the (square) image DINOv2 and SigLIP read."""
        return self.dino_config.image_size

    @property
    def high_res_image_size(self) -> int:
        """Side of the (square) image SAM reads."""
        return self.sam_config.image_size

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(rows, columns) of the output tokens."""
        return self._vit_grid(self.dino_config)

    @property
    def num_views(self) -> int:
        """Images each encoder reads per input image: the whole image, then its tiles row by row."""
        return 1 + self.tiles_per_side**2

    @property
    def feature_size(self) -> int:
        """Channels per output token: DINOv2 + SigLIP + SAM's folded neck, twice with tiles."""
        per_view = (
            self.dino_config.hidden_size
            + self.siglip_config.hidden_size
            + self.sam_config.output_channels * SAM_FOLD**2
        )
        return per_view * (2 if self.tiles_per_side else 1)


__all__ = ["SamDinoSiglipVisionConfig"]
