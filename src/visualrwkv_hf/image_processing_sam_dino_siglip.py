"""The image processor of the three-encoder backbone (VisualRWKV-HD, -UHD and -7).

The original prepares each encoder's tensor with torchvision on a PIL image: `Resize((448, 448), BICUBIC)` for DINOv2
and SigLIP, `Resize((1024, 1024), BICUBIC)` for SAM (squashed: aspect ratio not kept, no padding, no crop), then
`ToTensor` (pixels / 255) and each encoder's `Normalize`. torchvision resizes a PIL image with Pillow's own `resize`,
so the same Pillow call here gives the same pixels bit for bit. DINOv2 and SigLIP read the same resized image, so this
processor returns it once, in [0, 1] (`pixel_values`, 448 px), with SAM's (`high_res_pixel_values`, 1024 px); the
model applies each encoder's mean and std, as the original's `Normalize` does, in float32.

UHD (`tiles_per_side=2`) reads five views of each image: the whole image, then its quarters top-left, top-right,
bottom-left, bottom-right, each a crop of (width // 2, height // 2) pixels (an odd last row or column is dropped, as
the original's `split_image_into_tiles`), and each view is resized like a whole image.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .image_loading import load_rgb_image


class SamDinoSiglipImageProcessor(BaseImageProcessor):
    r"""
    Args:
        image_size: Side DINOv2 and SigLIP read (448 for the released towers).
        high_res_image_size: Side SAM reads (1024).
        tiles_per_side: 0 for the whole image only (HD, VisualRWKV-7); 2 adds the four quarter tiles (UHD).
    """

    model_input_names = ["pixel_values", "high_res_pixel_values"]

    def __init__(self, image_size: int = 448, high_res_image_size: int = 1024, tiles_per_side: int = 0, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("image_size", image_size), ("high_res_image_size", high_res_image_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive number of pixels, got {value!r}.")
        if tiles_per_side not in (0, 2):
            raise ValueError(f"`tiles_per_side` must be 0 (whole image) or 2 (UHD's 2 x 2 tiles), got {tiles_per_side!r}.")
        self.image_size = image_size
        self.high_res_image_size = high_res_image_size
        self.tiles_per_side = tiles_per_side

    def views(self, image: PIL.Image.Image) -> list[PIL.Image.Image]:
        """The whole image, then (with tiles) its tiles row by row."""
        if not self.tiles_per_side:
            return [image]
        width, height = image.size
        tile_width, tile_height = width // self.tiles_per_side, height // self.tiles_per_side
        if not tile_width or not tile_height:
            raise ValueError(
                f"An image of {width} x {height} pixels cannot be split into {self.tiles_per_side} x "
                f"{self.tiles_per_side} tiles: it needs at least {self.tiles_per_side} pixels a side."
            )
        return [image] + [
            image.crop((col * tile_width, row * tile_height, (col + 1) * tile_width, (row + 1) * tile_height))
            for row in range(self.tiles_per_side)
            for col in range(self.tiles_per_side)
        ]

    @staticmethod
    def _resized(image: PIL.Image.Image, size: int) -> np.ndarray:
        # torchvision's Resize on a PIL image is this Pillow call; ToTensor then divides by 255 in float32.
        pixels = np.asarray(image.resize((size, size), PIL.Image.BICUBIC), dtype=np.float32) / np.float32(255)
        return pixels.transpose(2, 0, 1)

    def preprocess(self, images, return_tensors=None, input_data_format=None, **kwargs) -> BatchFeature:
        """
        Args:
            images: An image or a list of images (PIL, numpy, torch, path, URL, bytes: see `load_rgb_image`). Any size:
                small images are enlarged, as the original's resize does.

        Returns:
            `pixel_values` (images, views, 3, image_size, image_size) and `high_res_pixel_values` (images, views, 3,
            high_res_image_size, high_res_image_size), pixels in [0, 1].
        """
        if kwargs:
            raise TypeError(f"SamDinoSiglipImageProcessor got unexpected options {sorted(kwargs)}.")
        image_list = images if isinstance(images, (list, tuple)) else [images]
        if not image_list:
            raise ValueError("`images` is empty: give at least one image.")
        low, high = [], []
        for image in image_list:
            views = self.views(load_rgb_image(image, input_data_format))
            low.append(np.stack([self._resized(view, self.image_size) for view in views]))
            high.append(np.stack([self._resized(view, self.high_res_image_size) for view in views]))
        data = {"pixel_values": np.stack(low), "high_res_pixel_values": np.stack(high)}
        if return_tensors == "pt":
            data = {name: torch.from_numpy(value) for name, value in data.items()}
            return BatchFeature(data)
        return BatchFeature(data, tensor_type=return_tensors)


__all__ = ["SamDinoSiglipImageProcessor"]
