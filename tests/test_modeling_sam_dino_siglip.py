"""The three-encoder backbone on transformers' DINOv2 / SigLIP / SAM against the original built with timm and Meta's
segment_anything (random weights, tiny widths and depths, the real 448 / 1024 px inputs)."""

import pytest
import torch

from visualrwkv_hf.configuration_sam_dino_siglip import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    SamDinoSiglipVisionConfig,
)
from visualrwkv_hf.convert_sam_dino_siglip import convert_original_backbone
from visualrwkv_hf.modeling_sam_dino_siglip import SamDinoSiglipVisionModel

from sam_dino_siglip_reference import OriginalBackbone, import_original_libraries

pytestmark = pytest.mark.skipif(
    import_original_libraries() is None, reason="timm and segment-anything (the `test` extra) are not installed"
)

# Tiny towers of the released architectures: timm / ImageEncoderViT keyword arguments, and the same sizes as
# `--vision-config` JSON (transformers' config keyword arguments).
TINY_ORIGINAL = {
    "dino": {"embed_dim": 32, "depth": 3, "num_heads": 2},
    "siglip": {"embed_dim": 48, "depth": 3, "num_heads": 2, "mlp_ratio": 2.5},
    "sam": {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "out_chans": 8},
}
TINY_VISION_CONFIG = {
    "dino": {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2},
    "siglip": {"hidden_size": 48, "intermediate_size": 120, "num_hidden_layers": 3, "num_attention_heads": 2},
    "sam": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
            "output_channels": 8},
}
TOLERANCE = 1e-5  # fp32: max |difference| / max |reference|


def tiny_config(**kwargs) -> SamDinoSiglipVisionConfig:
    return SamDinoSiglipVisionConfig(
        dino_config=TINY_VISION_CONFIG["dino"],
        siglip_config=TINY_VISION_CONFIG["siglip"],
        sam_config=TINY_VISION_CONFIG["sam"],
        **kwargs,
    )


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every tensor random (position tables, register tokens, layer scales, relative positions included: some start
    at zero or one); norm weights around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            is_norm = "norm" in name or "neck.1" in name or "neck.3" in name
            parameter.copy_(1 + noise if is_norm and name.endswith("weight") else noise)


def original_backbone(uhd: bool = False, seed: int = 0) -> OriginalBackbone:
    backbone = OriginalBackbone(**TINY_ORIGINAL, uhd=uhd).eval()
    randomize(backbone, seed)
    return backbone


def converted(original: OriginalBackbone, **config_kwargs) -> SamDinoSiglipVisionModel:
    model = SamDinoSiglipVisionModel(tiny_config(**config_kwargs)).eval()
    model.load_state_dict(convert_original_backbone(original.state_dict()), strict=True)
    return model


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def random_pixels(*leading: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*leading, 3, 448, 448, generator=generator), torch.rand(*leading, 3, 1024, 1024, generator=generator)


def original_features(original: OriginalBackbone, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return original(
            normalize(low, IMAGENET_MEAN, IMAGENET_STD), normalize(low, SIGLIP_MEAN, SIGLIP_STD),
            normalize(high, IMAGENET_MEAN, IMAGENET_STD),
        )


def test_hd_backbone_matches_timm_and_segment_anything():
    original = original_backbone()
    model = converted(original)
    low, high = random_pixels(2)
    expected = original_features(original, low, high)
    with torch.no_grad():
        actual = model(low, high)
    assert actual.shape == expected.shape == (2, 1024, 32 + 48 + 4 * 8)
    assert rel_err(actual, expected) < TOLERANCE
    # each encoder's channels on their own: an error in one cannot hide behind the others' magnitude
    for start, stop in ((0, 32), (32, 80), (80, 112)):
        assert rel_err(actual[..., start:stop], expected[..., start:stop]) < TOLERANCE


def test_uhd_backbone_matches_the_original_tile_fusion():
    original = original_backbone(uhd=True, seed=3)
    model = converted(original, tiles_per_side=2)
    low, high = random_pixels(1, 5, seed=4)
    expected = original_features(original, low, high)
    with torch.no_grad():
        actual = model(low, high)
    assert actual.shape == expected.shape == (1, 1024, 2 * 112)
    assert rel_err(actual, expected) < TOLERANCE
    assert rel_err(actual[..., 112:], expected[..., 112:]) < TOLERANCE  # the stitched tiles alone


def test_siglip_needs_exact_gelu_and_the_second_to_last_block():
    """The two settings a port gets wrong silently: transformers' SigLIP default activation (tanh GELU) and the
    tapped block. Each moves the output beyond the tolerance the parity tests hold."""
    original = original_backbone(seed=5)
    low, high = random_pixels(1, seed=6)
    expected = original_features(original, low, high)
    siglip = slice(32, 80)
    wrong_activation = SamDinoSiglipVisionModel(
        SamDinoSiglipVisionConfig(
            dino_config=TINY_VISION_CONFIG["dino"],
            siglip_config={**TINY_VISION_CONFIG["siglip"], "hidden_act": "gelu_pytorch_tanh"},
            sam_config=TINY_VISION_CONFIG["sam"],
        )
    ).eval()
    wrong_activation.load_state_dict(convert_original_backbone(original.state_dict()))
    wrong_layer = converted(original, siglip_feature_layer=-1)
    with torch.no_grad():
        assert rel_err(wrong_activation(low, high)[..., siglip], expected[..., siglip]) > TOLERANCE
        assert rel_err(wrong_layer(low, high)[..., siglip], expected[..., siglip]) > TOLERANCE


def test_pixel_shapes_are_checked():
    model = SamDinoSiglipVisionModel(tiny_config()).eval()
    low, high = random_pixels(1)
    with pytest.raises(ValueError, match=r"`high_res_pixel_values` must be \(images, 1, 3, 1024, 1024\)"):
        model(low, low)
    with pytest.raises(ValueError, match="holds 1 images but `high_res_pixel_values` 2"):
        model(low, torch.cat([high, high]))
    uhd = SamDinoSiglipVisionModel(tiny_config(tiles_per_side=2)).eval()
    with pytest.raises(ValueError, match=r"\(images, 5, 3, 448, 448\) for this vision backbone \(5 view"):
        uhd(low, high)


def test_config_refuses_towers_that_do_not_share_a_grid():
    with pytest.raises(ValueError, match="same feature grid"):
        SamDinoSiglipVisionConfig(dino_config={**TINY_VISION_CONFIG["dino"], "image_size": 224})
    with pytest.raises(ValueError, match="`tiles_per_side` must be 0"):
        tiny_config(tiles_per_side=3)
    with pytest.raises(ValueError, match="`dino_feature_layer` \\(3\\) must index one of the 3 dino blocks"):
        tiny_config(dino_feature_layer=3)


def test_released_sizes_by_default():
    config = SamDinoSiglipVisionConfig()
    assert config.feature_size == 3200 and config.feature_grid == (32, 32)
    assert SamDinoSiglipVisionConfig(tiles_per_side=2).feature_size == 6400
    assert config.siglip_config.hidden_act == "gelu" and not config.siglip_config.vision_use_head
    with torch.device("meta"):
        model = SamDinoSiglipVisionModel(config)
    # the original's parameter count (section 5 of the spec: 822,253,760) less SigLIP's unused attention-pooling
    # head, plus transformers' DINOv2 mask token and class position row (zeros)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == 304_017_408 + 2 * 1024 + 89_670_912 + 428_565_440 - SIGLIP_HEAD_PARAMETERS


# SigLIP so400m's MAP head: latent (1152), q and proj (1152^2 + 1152 each), kv (2 x 1152^2 + 2 x 1152), norm (2 x 1152),
# mlp (4304 x 1152 + 4304 + 1152 x 4304 + 1152).
SIGLIP_HEAD_PARAMETERS = 1152 + 2 * (1152**2 + 1152) + 2 * 1152**2 + 2 * 1152 + 2 * 1152 + 2 * 4304 * 1152 + 4304 + 1152
