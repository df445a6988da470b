"""VisualRWKV-HD (v0612) and -UHD (v0613) checkpoints: detection, conversion, and the converted model against an
independent reconstruction of the original forward (original key names, timm / segment_anything towers, the
projector's math written from the original, the bidirectional scan over all 1024 image tokens)."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor

from visualrwkv_hf import cli
from visualrwkv_hf.configuration_sam_dino_siglip import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from visualrwkv_hf.convert_visualrwkv import OriginalCheckpoint, convert_original_to_hf, convert_visualrwkv_checkpoint

from rwkv6_reference import random_blinkdl_rwkv6
from sam_dino_siglip_reference import OriginalBackbone, import_original_libraries
from test_modeling_sam_dino_siglip import TINY_ORIGINAL, TINY_VISION_CONFIG, randomize

pytestmark = pytest.mark.skipif(
    import_original_libraries() is None, reason="timm and segment-anything (the `test` extra) are not installed"
)

TEXT_WIDTH = 64
TINY_RWKV = dict(hidden_size=TEXT_WIDTH, head_size=16, num_layers=4, mix_rank=8, decay_rank=16)
FEATURES = 32 + 48 + 4 * 8  # the tiny towers' DINOv2 + SigLIP + folded SAM channels per view
IMAGE_TOKEN_ID = 65530
NUM_IMAGE_TOKENS = 1024
QUESTION = "What color is the bus?\nAnswer the question using a single word or phrase."
TOLERANCE = 1e-4  # fp32: max |difference| / max |reference|


def original_state_dict(uhd: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random HD (or UHD) checkpoint in the original layout: rwkv.*, vit.{dino,siglip,sam}_featurizer.* (SigLIP's
    unused attention-pooling head included, as the released files hold it) and the MLP's proj.{proj,gate,o_proj}."""
    backbone = OriginalBackbone(**TINY_ORIGINAL, uhd=uhd)
    randomize(backbone, seed)
    generator = torch.Generator().manual_seed(seed)
    width = FEATURES * (2 if uhd else 1)
    state_dict = {f"rwkv.{k}": v for k, v in random_blinkdl_rwkv6(**TINY_RWKV, seed=seed).items()}
    state_dict |= {f"vit.{k}": v.clone() for k, v in backbone.state_dict().items()}
    for name, fan_in in (("proj.proj.weight", width), ("proj.gate.weight", TEXT_WIDTH), ("proj.o_proj.weight", TEXT_WIDTH)):
        rows = TEXT_WIDTH
        state_dict[name] = torch.randn(rows, fan_in, generator=generator) * fan_in**-0.5
    return state_dict


def test_image(width: int = 90, height: int = 70, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


test_image.__test__ = False  # a helper, not a test


@dataclass(frozen=True)
class Release:
    uhd: bool
    state_dict: dict[str, torch.Tensor]
    checkpoint: Path
    towers: Path
    folder: Path


def convert_release(directory: Path, uhd: bool) -> Release:
    state_dict = original_state_dict(uhd, seed=int(uhd))
    checkpoint = directory / ("VisualRWKV-v0613-tiny.pth" if uhd else "VisualRWKV-v0612-tiny.pth")
    torch.save(state_dict, checkpoint)
    towers = directory / "towers.json"
    towers.write_text(json.dumps(TINY_VISION_CONFIG))
    folder = convert_visualrwkv_checkpoint(
        directory / "converted", checkpoint=checkpoint, vision_config=towers, progress=False
    )
    return Release(uhd, state_dict, checkpoint, towers, folder)


@pytest.fixture(scope="module", params=[False, True], ids=["hd", "uhd"])
def release(request, tmp_path_factory) -> Release:
    return convert_release(tmp_path_factory.mktemp("uhd" if request.param else "hd"), request.param)


# ------------------------------------------------------------------ the original forward, written from its code


def original_pixels(image: PIL.Image.Image, uhd: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original preprocessing: views (whole, then quarters TL TR BL BR for UHD), torchvision's
    Resize(BICUBIC) on PIL (Pillow's resize), ToTensor, each encoder's Normalize."""
    views = [image]
    if uhd:
        w, h = image.size[0] // 2, image.size[1] // 2
        views += [image.crop((j * w, i * h, (j + 1) * w, (i + 1) * h)) for i in range(2) for j in range(2)]

    def tensor(view, size, mean, std):
        pixels = torch.from_numpy(np.array(view.resize((size, size), PIL.Image.BICUBIC))).permute(2, 0, 1)
        pixels = pixels.float().div(255)
        return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    dino = torch.stack([tensor(v, 448, IMAGENET_MEAN, IMAGENET_STD) for v in views])
    siglip = torch.stack([tensor(v, 448, SIGLIP_MEAN, SIGLIP_STD) for v in views])
    sam = torch.stack([tensor(v, 1024, IMAGENET_MEAN, IMAGENET_STD) for v in views])
    if not uhd:
        return dino, siglip, sam
    return dino[None], siglip[None], sam[None]


@torch.no_grad()
def original_image_features(release: Release, image: PIL.Image.Image) -> torch.Tensor:
    backbone = OriginalBackbone(**TINY_ORIGINAL, uhd=release.uhd).eval()
    backbone.load_state_dict({k[4:]: v for k, v in release.state_dict.items() if k.startswith("vit.")})
    features = backbone(*original_pixels(image, release.uhd))[0]
    sd = release.state_dict
    hidden = features @ sd["proj.proj.weight"].T
    if release.uhd:  # UHD's MLPWithContextGating after 2024-09-14: ReLU, the gate unused
        hidden = F.relu(hidden)
    else:
        hidden = hidden * torch.sigmoid(hidden @ sd["proj.gate.weight"].T)
    return hidden @ sd["proj.o_proj.weight"].T


@torch.no_grad()
def original_logits(release: Release, image_features: torch.Tensor, ids: torch.Tensor, model) -> torch.Tensor:
    """The original's RWKV forward on one sample: embeddings with the image spliced in at its placeholder, blocks with
    odd index reading the whole 1024-token image span reversed (`bidirectional_forward`), ln_out, head."""
    sd = release.state_dict
    hidden = sd["rwkv.emb.weight"][ids].clone()
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    hidden[start : start + NUM_IMAGE_TOKENS] = image_features
    span = torch.arange(start, start + NUM_IMAGE_TOKENS)
    language_model = model.model.language_model
    for block_idx, block in enumerate(language_model.blocks):
        order = torch.arange(len(ids))
        if block_idx % 2 == 1:
            order[span] = span.flip(0)
        output = block(hidden[order][None])[0]
        hidden = torch.empty_like(output)
        hidden[order] = output
    return language_model.norm_out(hidden) @ sd["rwkv.head.weight"].T


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# -------------------------------------------------------------------------------------------------------- tests


def test_release_is_detected_from_the_keys(release):
    config = AutoModelForImageTextToText.from_pretrained(release.folder).config
    vision = config.vision_config
    assert vision.model_type == "visualrwkv_sam_dino_siglip"
    assert vision.tiles_per_side == (2 if release.uhd else 0)
    assert config.projector_type == ("relu_mlp" if release.uhd else "gated_mlp")
    assert (config.num_image_tokens, config.image_grid, config.scan_mode) == (1024, (32, 32), "bidirectional")
    assert config.image_position == "middle"
    assert vision.siglip_config.hidden_act == "gelu" and vision.dino_feature_layer == -2
    card = (release.folder / "README.md").read_text()
    assert ("VisualRWKV-UHD" if release.uhd else "VisualRWKV-HD") in card
    assert "| VisualRWKV-HD 1.6B (v0612) | 54.39 | 54.71 | 60.84 |" in card
    assert f"| Projector (`projector_type`) | {config.projector_type} |" in card


def test_prompt_ids_are_the_originals_sandwich_with_1024_image_tokens(release):
    processor = AutoProcessor.from_pretrained(release.folder)
    ids = processor(images=test_image(), text=QUESTION)["input_ids"][0]
    start = ids.index(IMAGE_TOKEN_ID)
    # "User: What color is the bus?\n", the image, "\nWhat color ... phrase.\n\n", "Assistant:" (the v6.0 pieces)
    assert ids[:start] == [24281, 59, 30031, 38083, 4600, 22590, 21399, 64, 11]
    assert ids[start : start + NUM_IMAGE_TOKENS] == [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS
    rest = ids[start + NUM_IMAGE_TOKENS :]
    assert rest[:2] == [11, 24326] and rest[-5:] == [47, 261, 5585, 41693, 59]
    assert IMAGE_TOKEN_ID not in rest


def test_processor_gives_the_original_preprocessing_exactly(release):
    processor = AutoProcessor.from_pretrained(release.folder)
    inputs = processor(images=test_image(), text=QUESTION, return_tensors="pt")
    dino, siglip, sam = original_pixels(test_image(), release.uhd)
    views = 5 if release.uhd else 1
    assert inputs["pixel_values"].shape == (1, views, 3, 448, 448)
    assert inputs["high_res_pixel_values"].shape == (1, views, 3, 1024, 1024)
    # the model's per-encoder normalisation of the processor's [0, 1] pixels = the original's tensors
    def normalized(pixels, mean, std):
        return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    for ours, theirs, mean, std in (
        (inputs["pixel_values"], dino, IMAGENET_MEAN, IMAGENET_STD),
        (inputs["pixel_values"], siglip, SIGLIP_MEAN, SIGLIP_STD),
        (inputs["high_res_pixel_values"], sam, IMAGENET_MEAN, IMAGENET_STD),
    ):
        torch.testing.assert_close(normalized(ours, mean, std).reshape(theirs.shape), theirs, rtol=0, atol=0)


@torch.no_grad()
def test_logits_and_greedy_answer_equal_the_original_forward(release):
    model = AutoModelForImageTextToText.from_pretrained(release.folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(release.folder)
    image = test_image()
    inputs = processor(images=image, text=QUESTION, return_tensors="pt")
    image_features = original_image_features(release, image)
    ids = inputs["input_ids"][0]
    expected = original_logits(release, image_features, ids, model)
    logits = model(**inputs).logits[0]
    assert relative_error(logits, expected) < TOLERANCE
    # the original's generate: the whole sequence again for every new token, greedy
    answer = []
    for _ in range(4):
        sequence = torch.cat([ids, torch.tensor(answer, dtype=torch.long)])
        answer.append(int(original_logits(release, image_features, sequence, model)[-1].argmax()))
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, suppress_tokens=None)
    assert generated[0, len(ids) :].tolist() == answer


def test_uhd_read_gated_on_request(tmp_path, release):
    if not release.uhd:
        pytest.skip("UHD only")
    folder = tmp_path / "gated"
    assert cli.main(["convert", "--checkpoint", str(release.checkpoint), "--vision-config", str(release.towers),
                     "--projector-type", "gated_mlp", "--output", str(folder), "--no-progress"]) == 0
    assert AutoModelForImageTextToText.from_pretrained(folder).config.projector_type == "gated_mlp"


def test_bfloat16_stays_bfloat16_and_siglip_head_is_dropped(release):
    half = {k: v.bfloat16() for k, v in release.state_dict.items()}
    config, state_dict = convert_original_to_hf(
        OriginalCheckpoint.from_full(half), vision_config=TINY_VISION_CONFIG
    )
    assert config.dtype == torch.bfloat16 and {t.dtype for t in state_dict.values()} == {torch.bfloat16}
    assert not any("attn_pool" in key or ".head." in key for key in state_dict)
    qkv = half["vit.dino_featurizer.blocks.1.attn.qkv.weight"]
    assert torch.equal(state_dict["model.vision_tower.dino.encoder.layer.1.attention.k_proj.weight"], qkv[32:64])
    table = state_dict["model.vision_tower.dino.embeddings.position_embeddings"]
    assert table.shape == (1, 1025, 32) and not table[0, 0].any()  # no class row in timm: a zero one
    assert torch.equal(table[0, 1:], half["vit.dino_featurizer.pos_embed"][0])


def test_wrong_towers_and_wrong_projector_choices_are_refused(release, tmp_path):
    checkpoint = OriginalCheckpoint.from_full(release.state_dict)
    with pytest.raises(ValueError, match=r"reads \d+ channels, but these towers give 3200 per view"):
        convert_original_to_hf(checkpoint)  # the released towers' default
    wider = {**TINY_VISION_CONFIG, "sam": {**TINY_VISION_CONFIG["sam"], "hidden_size": 64}}
    with pytest.raises(ValueError, match="does not match the towers .*sam 64 wide"):
        convert_original_to_hf(checkpoint, vision_config=wider)
    with pytest.raises(ValueError, match="reads as gated_mlp or relu_mlp, not 'input_gated_mlp'"):
        convert_original_to_hf(checkpoint, vision_config=TINY_VISION_CONFIG, projector_type="input_gated_mlp")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dino": {}, "clip": {}}))
    with pytest.raises(ValueError, match=r"unknown keys \['clip'\]"):
        convert_visualrwkv_checkpoint(tmp_path / "out", checkpoint=release.checkpoint, vision_config=bad)
    assert not (tmp_path / "out").exists()


def test_visualrwkv7_projector_layout_converts_with_the_three_encoder_tower(release):
    """v0700's vision side (same towers, input-gated MLP + LayerNorm under proj.gate/o_proj/ln_v) is read from the
    keys whatever the language model: here next to an RWKV-6 one (VisualRWKV-7 itself: test_convert_visualrwkv7)."""
    if release.uhd:
        pytest.skip("VisualRWKV-7 reads whole images")
    generator = torch.Generator().manual_seed(7)
    state_dict = {k: v for k, v in release.state_dict.items() if not k.startswith("proj.")}
    state_dict |= {
        "proj.gate.weight": torch.randn(FEATURES, FEATURES, generator=generator) * FEATURES**-0.5,
        "proj.o_proj.weight": torch.randn(TEXT_WIDTH, FEATURES, generator=generator) * FEATURES**-0.5,
        "proj.ln_v.weight": 1 + 0.1 * torch.randn(TEXT_WIDTH, generator=generator),
        "proj.ln_v.bias": 0.1 * torch.randn(TEXT_WIDTH, generator=generator),
    }
    config, converted = convert_original_to_hf(OriginalCheckpoint.from_full(state_dict), vision_config=TINY_VISION_CONFIG)
    assert config.projector_type == "input_gated_mlp" and config.vision_config.tiles_per_side == 0
    prefix = "model.multi_modal_projector."
    assert torch.equal(converted[prefix + "gate.weight"], state_dict["proj.gate.weight"])
    assert torch.equal(converted[prefix + "out_proj.weight"], state_dict["proj.o_proj.weight"])
    assert torch.equal(converted[prefix + "norm.bias"], state_dict["proj.ln_v.bias"])


def test_towers_given_as_a_config_object_convert_as_the_json_form(release):
    from visualrwkv_hf.configuration_sam_dino_siglip import SamDinoSiglipVisionConfig

    towers = SamDinoSiglipVisionConfig(**{f"{name}_config": kwargs for name, kwargs in TINY_VISION_CONFIG.items()})
    checkpoint = OriginalCheckpoint.from_full(release.state_dict)
    from_object, state_dict = convert_original_to_hf(checkpoint, vision_config=towers)
    from_json, expected = convert_original_to_hf(checkpoint, vision_config=TINY_VISION_CONFIG)
    assert from_object.vision_config.to_dict() == from_json.vision_config.to_dict()
    assert state_dict.keys() == expected.keys()
