"""The three-encoder backbone's image processor against the original's preprocessing: torchvision's Resize(BICUBIC) on a
PIL image is Pillow's `resize`, then ToTensor (/ 255); UHD's tiles are the original's `split_image_into_tiles(image, 2)`
written out (quarters TL TR BL BR of (W // 2, H // 2), odd last row/column dropped)."""

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

import visualrwkv_hf  # noqa: F401  (registers the image processor)
from visualrwkv_hf.image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def to_tensor(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """torchvision's `ToTensor()(Resize((size, size), BICUBIC)(image))`."""
    resized = image.resize((size, size), PIL.Image.BICUBIC)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous().float().div(255)


def test_whole_image_is_squashed_to_448_and_1024_exactly():
    image = random_image(93, 61)
    out = SamDinoSiglipImageProcessor()(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 1, 3, 448, 448) and out["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(out["pixel_values"][0, 0], to_tensor(image, 448), rtol=0, atol=0)
    torch.testing.assert_close(out["high_res_pixel_values"][0, 0], to_tensor(image, 1024), rtol=0, atol=0)


def test_uhd_views_are_the_whole_image_then_the_quarters_row_by_row():
    image = random_image(93, 61, seed=1)  # odd sides: the last column and row are dropped from the tiles
    out = SamDinoSiglipImageProcessor(tiles_per_side=2)([image, random_image(20, 30)], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 5, 3, 448, 448)
    quarters = [(0, 0, 46, 30), (46, 0, 92, 30), (0, 30, 46, 60), (46, 30, 92, 60)]
    views = [image] + [image.crop(box) for box in quarters]
    for index, view in enumerate(views):
        torch.testing.assert_close(out["pixel_values"][0, index], to_tensor(view, 448), rtol=0, atol=0)
        torch.testing.assert_close(out["high_res_pixel_values"][0, index], to_tensor(view, 1024), rtol=0, atol=0)


def test_saved_processor_loads_with_auto_image_processor(tmp_path):
    SamDinoSiglipImageProcessor(tiles_per_side=2).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, SamDinoSiglipImageProcessor)
    assert (loaded.image_size, loaded.high_res_image_size, loaded.tiles_per_side) == (448, 1024, 2)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(ValueError, match="`tiles_per_side` must be 0 .* or 2"):
        SamDinoSiglipImageProcessor(tiles_per_side=3)
    with pytest.raises(ValueError, match="`image_size` must be a positive number of pixels"):
        SamDinoSiglipImageProcessor(image_size=0)
    with pytest.raises(ValueError, match="`images` is empty"):
        SamDinoSiglipImageProcessor()([])
    with pytest.raises(TypeError, match=r"unexpected options \['do_resize'\]"):
        SamDinoSiglipImageProcessor()(random_image(4, 4), do_resize=False)
