"""The three-encoder vision backbone of VisualRWKV-HD, -UHD and VisualRWKV-7, built from transformers' own DINOv2 (with
registers), SigLIP and SAM vision models, so a converted folder needs nothing beyond transformers.

Each encoder normalises its input itself (DINOv2 and SigLIP read the same resized image with different mean/std); the
ViTs stop at their feature layer (the blocks after it never reach the output, so they are not run); SAM's neck map is
folded 2 x 2 into channels (`pixel_unshuffle`: channel c*4 + dy*2 + dx of cell (i, j) is pixel (2i+dy, 2j+dx) of
channel c, the original's "lossless downsampler"). With tiles (UHD) every view goes through all three encoders, and
each tile's map is average-pooled 2 x 2 and stitched with the others into one map.
"""

import torch
import torch.nn.functional as F
from transformers import Dinov2WithRegistersModel, SiglipVisionModel
from transformers.modeling_utils import PreTrainedModel
from transformers.models.sam.modeling_sam import SamVisionEncoder

from .configuration_sam_dino_siglip import SAM_FOLD, SamDinoSiglipVisionConfig


class SamDinoSiglipVisionModel(PreTrainedModel):
    """DINOv2 + SigLIP + SAM features, (images, rows * columns, `config.feature_size`)."""

    config: SamDinoSiglipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["Dinov2WithRegistersLayer", "SiglipEncoderLayer", "SamVisionLayer"]

    def __init__(self, config: SamDinoSiglipVisionConfig):
        super().__init__(config)
        self.dino = Dinov2WithRegistersModel(config.dino_config)
        self.siglip = SiglipVisionModel(config.siglip_config)
        self.sam = SamVisionEncoder(config.sam_config)
        self.post_init()

    def _normalize(self, pixels: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
        # In float32 as torchvision's Normalize on its ToTensor output, then the tower's dtype.
        mean = torch.tensor(getattr(self.config, f"{name}_image_mean"), device=pixels.device).view(3, 1, 1)
        std = torch.tensor(getattr(self.config, f"{name}_image_std"), device=pixels.device).view(3, 1, 1)
        return ((pixels.float() - mean) / std).to(dtype)

    def _dino_features(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.dino
        hidden = tower.embeddings(self._normalize(pixels, "dino", tower.dtype))
        for layer in tower.encoder.layer[: self._blocks_to_run("dino")]:
            hidden = layer(hidden, None)
        return hidden[:, 1 + self.config.dino_config.num_register_tokens :]

    def _siglip_features(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.siglip
        hidden = tower.embeddings(self._normalize(pixels, "siglip", tower.dtype))
        for layer in tower.encoder.layers[: self._blocks_to_run("siglip")]:
            hidden = layer(hidden, None)
        return hidden

    def _sam_features(self, pixels: torch.Tensor) -> torch.Tensor:
        # One view at a time: each global-attention block materialises a dense (views x heads, 4096, 4096) float32
        # relative-position bias, 0.8 GB per view, which for UHD's five views at once made the peak memory.
        necks = [self.sam(self._normalize(view, "sam", self.sam.dtype)).last_hidden_state for view in pixels.split(1)]
        neck = torch.cat(necks)  # (n, C, 2R, 2C)
        return F.pixel_unshuffle(neck, SAM_FOLD).flatten(2).transpose(1, 2)

    def _blocks_to_run(self, name: str) -> int:
        layers = getattr(self.config, f"{name}_config").num_hidden_layers
        return getattr(self.config, f"{name}_feature_layer") % layers + 1

    def forward(self, pixel_values: torch.Tensor, high_res_pixel_values: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pixel_values: (images, views, 3, S, S) pixels in [0, 1] at DINOv2/SigLIP's size (448); views =
                `config.num_views` (the whole image, then the tiles row by row). (images, 3, S, S) for one view.
            high_res_pixel_values: The same views at SAM's size (1024).

        Returns:
            (images, rows * columns, `config.feature_size`) features, cells row-major.
        """
        config = self.config
        low, high = pixel_values, high_res_pixel_values
        if low.dim() == 4 and high.dim() == 4:
            low, high = low[:, None], high[:, None]
        views = config.num_views
        for name, tensor, size in (
            ("pixel_values", low, config.image_size),
            ("high_res_pixel_values", high, config.high_res_image_size),
        ):
            if tensor.dim() != 5 or tuple(tensor.shape[1:]) != (views, 3, size, size):
                raise ValueError(
                    f"`{name}` must be (images, {views}, 3, {size}, {size})"
                    + (f" or (images, 3, {size}, {size})" if views == 1 else "")
                    + f" for this vision backbone ({views} view(s) per image), got {tuple(tensor.shape)}: use the "
                    "model's image processor."
                )
        if low.shape[0] != high.shape[0]:
            raise ValueError(
                f"`pixel_values` holds {low.shape[0]} images but `high_res_pixel_values` {high.shape[0]}: each image "
                "needs both."
            )
        images = low.shape[0]
        per_encoder = [
            self._dino_features(low.flatten(0, 1)),
            self._siglip_features(low.flatten(0, 1)),
            self._sam_features(high.flatten(0, 1)),
        ]
        per_encoder = [features.unflatten(0, (images, views)) for features in per_encoder]  # (images, views, T, D)
        whole = torch.cat([features[:, 0] for features in per_encoder], dim=-1)
        if not config.tiles_per_side:
            return whole
        return torch.cat([whole, *(self._stitch_tiles(features[:, 1:]) for features in per_encoder)], dim=-1)

    def _stitch_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """(images, t*t, rows*cols, D) tile features -> (images, rows*cols, D): each tile's map average-pooled t x t,
        the pooled maps placed as the tiles lie in the image."""
        per_side = self.config.tiles_per_side
        rows, cols = self.config.feature_grid
        images, _, _, channels = tiles.shape
        maps = tiles.transpose(2, 3).reshape(images * per_side**2, channels, rows, cols)
        pooled = F.avg_pool2d(maps, per_side)  # (images * t*t, D, rows/t, cols/t)
        pooled = pooled.view(images, per_side, per_side, channels, rows // per_side, cols // per_side)
        stitched = pooled.permute(0, 3, 1, 4, 2, 5).reshape(images, channels, rows, cols)
        return stitched.flatten(2).transpose(1, 2)


__all__ = ["SamDinoSiglipVisionModel"]
