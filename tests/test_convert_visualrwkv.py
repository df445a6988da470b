import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import RepoUrl
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPVisionConfig, CLIPVisionModel

import visualrwkv_hf
from visualrwkv_hf import VisualRWKVConfig, VisualRWKVForConditionalGeneration, VisualRWKVProcessor
from visualrwkv_hf.configuration_visualrwkv import CLIP_VIT_L_14_336
from visualrwkv_hf.convert_visualrwkv import (
    OriginalCheckpoint,
    convert_original_to_hf,
    convert_visualrwkv_checkpoint,
    image_processor_for,
)

from rwkv6_reference import random_blinkdl_rwkv6, reference_rwkv

# A tiny CLIP: 4 x 4 patches of 14 px, so 16 patches + cls = 17 image tokens.
TINY_CLIP = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56
)
NUM_IMAGE_TOKENS = 17
# A tiny RWKV-6 with the World vocabulary (the image placeholder 65530 must be a row): width 64, 4 heads of 16,
# 4 layers (blocks 1 and 3 read the patches reversed under the bidirectional scan).
TEXT_WIDTH = 64
TINY_RWKV = dict(hidden_size=TEXT_WIDTH, head_size=16, num_layers=4, mix_rank=8, decay_rank=16)
IMAGE_TOKEN_ID = 65530
QUESTION = "What is in the picture?\nAnswer the question using a single word or phrase."
TOLERANCE = 1e-4  # fp32 against BlinkDL's rwkv package: max |difference| / max |reference|


def fp16_exact(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 values that fp16 holds exactly, so the fp32 full file and the fp16 exported pair carry the same numbers."""
    return tensor.half().float() if tensor.is_floating_point() else tensor


def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random full checkpoint in the original layout: rwkv.*, vit.vision_model.* (transformers 4's CLIPVisionModel
    keys, position_ids buffer included, as the released files have them) and proj.weight."""
    torch.manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP))
    state_dict = {f"rwkv.{k}": v for k, v in random_blinkdl_rwkv6(**TINY_RWKV, seed=seed).items()}
    state_dict.update({f"vit.vision_model.{k}": v for k, v in clip.state_dict().items()})
    state_dict["vit.vision_model.embeddings.position_ids"] = torch.arange(NUM_IMAGE_TOKENS)[None]
    state_dict["proj.weight"] = torch.randn(TEXT_WIDTH, TINY_CLIP["hidden_size"]) * TINY_CLIP["hidden_size"] ** -0.5
    return {k: fp16_exact(v) for k, v in state_dict.items()}


def export_pair(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """What the original's export script writes: the RWKV-6 keys unprefixed, and vit.* + proj.weight, both fp16."""
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    rwkv = {k.removeprefix("rwkv."): v for k, v in half.items() if k.startswith("rwkv.")}
    visual = {k: v for k, v in half.items() if not k.startswith("rwkv.")}
    return rwkv, visual


@dataclass(frozen=True)
class OriginalFiles:
    state_dict: dict[str, torch.Tensor]
    full: Path
    rwkv: Path
    visual: Path
    vision_config: Path  # a folder holding config.json


def write_original_files(directory: Path, seed: int = 0) -> OriginalFiles:
    """The full checkpoint (fp32), the exported pair (fp16) and the tiny CLIP's config, written to `directory`."""
    state_dict = original_state_dict(seed)
    rwkv, visual = export_pair(state_dict)
    files = OriginalFiles(
        state_dict, directory / "full.pth", directory / "A_rwkv.pth", directory / "A_visual.pth", directory / "clip"
    )
    torch.save(state_dict, files.full)
    torch.save(rwkv, files.rwkv)
    torch.save(visual, files.visual)
    CLIPVisionConfig(**TINY_CLIP).save_pretrained(files.vision_config)
    return files


def test_image(width: int = 90, height: int = 70, seed: int = 0) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


test_image.__test__ = False  # a helper, not a test


@dataclass(frozen=True)
class Converted:
    files: OriginalFiles
    full: Path  # converted from the full checkpoint, no flags but the vision config
    pair: Path  # converted from the exported pair, in float32
    model: VisualRWKVForConditionalGeneration
    processor: VisualRWKVProcessor


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Converted:
    directory = tmp_path_factory.mktemp("visualrwkv")
    files = write_original_files(directory)
    full = convert_visualrwkv_checkpoint(
        directory / "from-full", checkpoint=files.full, vision_config=files.vision_config, progress=False
    )
    pair = convert_visualrwkv_checkpoint(
        directory / "from-pair", rwkv=files.rwkv, visual=files.visual, dtype="float32", progress=False,
        vision_config=files.vision_config / "config.json",  # a JSON file works as well as its folder
    )
    model = AutoModelForImageTextToText.from_pretrained(full).eval()
    return Converted(files, full, pair, model, AutoProcessor.from_pretrained(full))


def reference_clip(files: OriginalFiles, directory: Path) -> CLIPVisionModel:
    """transformers' own CLIPVisionModel loading the vit.* weights (its legacy `vision_model.` renaming included)."""
    vision = {k.removeprefix("vit."): v for k, v in files.state_dict.items() if k.startswith("vit.")}
    CLIPVisionConfig(**TINY_CLIP).save_pretrained(directory)
    save_file(vision, directory / "model.safetensors", metadata={"format": "pt"})
    model, info = CLIPVisionModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return model.eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


# -------------------------------------------------------------------------------------------- the converted folder


def test_folder_holds_model_processor_generation_config_and_card(converted):
    assert sorted(p.name for p in converted.full.iterdir()) == [
        "README.md",
        "added_tokens.json",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "processor_config.json",
        "rwkv_vocab_v20230424.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    generation = json.loads((converted.full / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (261, 0)
    assert generation["suppress_tokens"] == [IMAGE_TOKEN_ID]  # the model's own default is kept
    card = (converted.full / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card
    assert "| VisualRWKV-6 7B | 75.8 | 64.3 | 68.2 | 51.0 | 84.7 | 1387.8 | 65.8 | 63.7 |" in card
    assert "| LLaVA-1.5-7B | 78.5 |" in card
    for setting in ("`full.pth`", "| Weights dtype | float32 |", "| Image scanning (`scan_mode`) | bidirectional |",
                    "middle (the sandwich prompt)", "17 (grid_size -1, cls token last)"):
        assert setting in card
    assert "`A_rwkv.pth`, `A_visual.pth`" in (converted.pair / "README.md").read_text()


def test_model_card_is_the_packaged_template_filled_in(converted):
    template = (Path(visualrwkv_hf.__file__).parent / "model_card_template.md").read_text(encoding="utf-8")
    card = (converted.full / "README.md").read_text(encoding="utf-8")
    assert "$" not in card
    # Every line of the template but the three filled in is in the card, in order.
    card_lines = iter(card.splitlines())
    assert all(line in card_lines for line in template.splitlines() if "${" not in line)


def test_released_defaults_are_used_without_flags(converted):
    config = converted.model.config
    assert (config.scan_mode, config.image_position, config.grid_size) == ("bidirectional", "middle", -1)
    assert config.architectures == ["VisualRWKVForConditionalGeneration"]
    assert config.text_config.num_hidden_layers == 4 and config.text_config.hidden_size == TEXT_WIDTH
    processor = converted.processor
    assert (processor.image_position, processor.num_image_tokens) == ("middle", NUM_IMAGE_TOKENS)
    assert processor.image_token_id == IMAGE_TOKEN_ID == config.image_token_id
    # The image processor works at the vision encoder's resolution.
    assert processor.image_processor.crop_size.height == processor.image_processor.crop_size.width == 56


def test_default_vision_config_is_clip_vit_l_14_336():
    """Without a vision config the vit.* weights must be CLIP ViT-L/14-336: checked with shapes only (meta tensors)."""
    with torch.device("meta"):
        vit_l = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L_14_336)).half().state_dict()
        projector = torch.empty(TEXT_WIDTH, 1024, dtype=torch.float16)
    rwkv, _ = export_pair(original_state_dict())
    visual = {f"vit.vision_model.{k}": v for k, v in vit_l.items()} | {"proj.weight": projector}
    config, state_dict = convert_original_to_hf(OriginalCheckpoint.from_pair(rwkv, visual))
    vision = config.vision_config
    assert vision.model_type == "clip_vision_model"
    assert {name: getattr(vision, name) for name in CLIP_VIT_L_14_336} == CLIP_VIT_L_14_336
    assert (config.scan_mode, config.image_position, config.grid_size) == ("bidirectional", "middle", -1)
    assert config.num_image_tokens == 577 and config.dtype == torch.float16
    assert state_dict["model.vision_tower.encoder.layers.23.mlp.fc1.weight"].shape == (4096, 1024)
    assert image_processor_for(config).crop_size.height == 336


@torch.no_grad()
def test_vision_tower_equals_clip_loaded_with_the_same_weights(converted, tmp_path):
    reference = reference_clip(converted.files, tmp_path)
    pixel_values = converted.processor(images=test_image(), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 56, 56)
    ours = converted.model.model.vision_tower(pixel_values).last_hidden_state
    torch.testing.assert_close(ours, reference(pixel_values).last_hidden_state, rtol=0, atol=0)


def test_projector_is_proj_weight(converted):
    projector = converted.model.model.multi_modal_projector.linear
    assert projector.bias is None
    assert torch.equal(projector.weight, converted.files.state_dict["proj.weight"])


@torch.no_grad()
def test_language_model_matches_rwkv_package(converted, tmp_path):
    # The rwkv.* part in fp32: the package preprocesses some tensors in the file's dtype, so an fp16 file loses digits.
    rwkv = {k.removeprefix("rwkv."): v for k, v in converted.files.state_dict.items() if k.startswith("rwkv.")}
    torch.save(rwkv, tmp_path / "rwkv.pth")
    prompt = torch.randint(1, IMAGE_TOKEN_ID, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    reference_logits, _ = reference_rwkv(tmp_path / "rwkv.pth").forward(prompt, None, full_output=True)
    logits = converted.model(torch.tensor([prompt])).logits[0]
    assert relative_error(logits, reference_logits) < TOLERANCE


@torch.no_grad()
def manual_reference_logits(files: OriginalFiles, clip: CLIPVisionModel, input_ids, pixel_values, model):
    """The original data flow written out: CLIP's last hidden state, cls moved last, proj.weight, spliced into the
    embeddings, then our RWKV-6 blocks with the patch span reversed in the odd blocks (bidirectional scan)."""
    original = files.state_dict
    features = clip(pixel_values).last_hidden_state[0]
    features = torch.cat([features[1:], features[:1]]) @ original["proj.weight"].T
    ids = input_ids[0]
    hidden = original["rwkv.emb.weight"][ids].clone()
    start = int((ids == IMAGE_TOKEN_ID).nonzero()[0])
    hidden[start : start + NUM_IMAGE_TOKENS] = features
    patches = torch.arange(start, start + NUM_IMAGE_TOKENS - 1)  # the cls token, last, stays put
    language_model = model.model.language_model
    for block_idx, block in enumerate(language_model.blocks):
        order = torch.arange(len(ids))
        if block_idx % 2 == 1:
            order[patches] = patches.flip(0)
        output = block(hidden[order][None])[0]
        hidden = torch.empty_like(output)
        hidden[order] = output
    return language_model.norm_out(hidden) @ original["rwkv.head.weight"].T


@torch.no_grad()
def test_image_and_question_forward_equals_the_original_data_flow(converted, tmp_path):
    inputs = converted.processor(images=test_image(), text=QUESTION, return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == NUM_IMAGE_TOKENS
    logits = converted.model(**inputs).logits[0]
    clip = reference_clip(converted.files, tmp_path)
    expected = manual_reference_logits(converted.files, clip, inputs["input_ids"], inputs["pixel_values"],
                                       converted.model)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@torch.no_grad()
def test_pair_and_full_checkpoint_give_identical_folders(converted):
    full, pair = load_file(converted.full / "model.safetensors"), load_file(converted.pair / "model.safetensors")
    assert full.keys() == pair.keys() == converted.model.state_dict().keys()
    assert all(torch.equal(full[k], pair[k]) for k in full)
    for name in ("config.json", "generation_config.json", "processor_config.json", "chat_template.jinja"):
        assert (converted.full / name).read_text() == (converted.pair / name).read_text()
    pair_model = AutoModelForImageTextToText.from_pretrained(converted.pair).eval()
    inputs = AutoProcessor.from_pretrained(converted.pair)(images=test_image(), text=QUESTION, return_tensors="pt")
    assert torch.equal(pair_model(**inputs).logits, converted.model(**inputs).logits)


@pytest.mark.parametrize(
    ("stored", "requested", "expected"),
    [(torch.float16, None, torch.float16), (torch.bfloat16, "auto", torch.bfloat16),
     (torch.float32, None, torch.float32), (torch.bfloat16, "float32", torch.float32)],
)
def test_dtype_auto_keeps_the_checkpoints_own(stored, requested, expected):
    state_dict = {k: v.to(stored) if v.is_floating_point() else v for k, v in original_state_dict().items()}
    config, converted = convert_original_to_hf(
        OriginalCheckpoint.from_full(state_dict), CLIPVisionConfig(**TINY_CLIP), dtype=requested
    )
    assert config.dtype == expected and {t.dtype for t in converted.values()} == {expected}


@torch.no_grad()
def test_converted_folder_loads_with_auto_classes_and_generates(converted):
    model, processor = converted.model, converted.processor
    assert type(model) is VisualRWKVForConditionalGeneration and type(processor) is VisualRWKVProcessor
    inputs = processor(images=test_image(), text=QUESTION, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert 1 <= len(new_tokens) <= 6 and IMAGE_TOKEN_ID not in new_tokens.tolist()
    assert isinstance(processor.post_process_image_text_to_text(new_tokens[None])[0], str)


def test_flags_set_scan_mode_image_position_and_grid_size(tmp_path):
    files = write_original_files(tmp_path)
    output = convert_visualrwkv_checkpoint(
        tmp_path / "hf", checkpoint=files.full, vision_config=files.vision_config, scan_mode="multidirectional",
        image_position="last", grid_size=2, dtype="bfloat16", progress=False,
    )
    model = AutoModelForImageTextToText.from_pretrained(output)
    processor = AutoProcessor.from_pretrained(output)
    assert (model.config.scan_mode, model.config.image_position, model.config.grid_size) == (
        "multidirectional", "last", 2
    )
    assert model.dtype == torch.bfloat16
    assert (processor.image_position, processor.num_image_tokens) == ("last", 5)  # 2 x 2 pooled patches + cls


# ------------------------------------------------------------------------------------------------------ errors


def vision_config_file(directory: Path, **changes) -> Path:
    path = directory / "vision.json"
    path.write_text(CLIPVisionConfig(**{**TINY_CLIP, **changes}).to_json_string())
    return path


VISION_MISMATCHES = {
    "default-vit-l": (
        {},
        r"does not match the vision config \(clip_vision_model: hidden_size=1024, num_hidden_layers=24, patch_size=14, "
        r"image_size=336, intermediate_size=4096\); its weights imply hidden_size=32, num_hidden_layers=2, "
        r"patch_size=14, image_size=56, intermediate_size=64\. Give the matching config with --vision-config",
    ),
    "more-layers": (
        {"num_hidden_layers": 3},
        r"num_hidden_layers=3.*its weights imply .*num_hidden_layers=2.*missing tensors .*"
        r"'vit.vision_model.encoder.layers.2.self_attn.k_proj.weight' \(32, 32\)",
    ),
    "larger-image": (
        {"image_size": 84},
        r"image_size=84.*image_size=56.*'vit.vision_model.embeddings.position_embedding.weight' is \(17, 32\), "
        r"expected \(37, 32\)",
    ),
    "wider-mlp": (
        {"intermediate_size": 128},
        r"intermediate_size=128.*intermediate_size=64.*'vit.vision_model.encoder.layers.0.mlp.fc1.weight' is "
        r"\(64, 32\), expected \(128, 32\)",
    ),
}


@pytest.mark.parametrize("name", list(VISION_MISMATCHES))
def test_vision_config_mismatch_is_refused_and_nothing_is_written(name, tmp_path):
    changes, message = VISION_MISMATCHES[name]
    files = write_original_files(tmp_path)
    vision_config = vision_config_file(tmp_path, **changes) if changes else None
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=message):
        convert_visualrwkv_checkpoint(
            tmp_path / "hf", checkpoint=files.full, vision_config=vision_config, progress=False
        )
    assert sorted(os.listdir(tmp_path)) == before


def test_unusable_vision_configs_are_refused(tmp_path):
    files = write_original_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="Vision config .* not found: give a JSON file or a folder"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", checkpoint=files.full, vision_config=tmp_path / "absent")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="Cannot read the vision config"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", checkpoint=files.full, vision_config=tmp_path / "broken.json")
    invalid = json.loads(vision_config_file(tmp_path).read_text()) | {"num_attention_heads": 5}
    (tmp_path / "invalid.json").write_text(json.dumps(invalid))
    with pytest.raises(ValueError, match="(?s)Cannot read the vision config .* not a multiple of the number of"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", checkpoint=files.full, vision_config=tmp_path / "invalid.json")
    assert not (tmp_path / "hf").exists()


def changed(remove=(), add=None):
    state_dict = original_state_dict()
    for key in remove:
        del state_dict[key]
    state_dict.update(add or {})
    return state_dict


BAD_CHECKPOINTS = {
    "missing-projector": (
        lambda: changed(remove=["proj.weight"]),
        r"projector .* missing tensors .*'proj.weight' \(64, 32\)",
    ),
    "projector-of-another-width": (
        lambda: changed(add={"proj.weight": torch.zeros(64, 48)}),
        r"inconsistent shapes: 'proj.weight' is \(64, 48\), expected \(64, 32\)",
    ),
    "missing-vision-tensor": (
        lambda: changed(remove=["vit.vision_model.encoder.layers.1.mlp.fc2.weight"]),
        r"missing tensors .*'vit.vision_model.encoder.layers.1.mlp.fc2.weight' \(32, 64\)",
    ),
    "extra-vision-tensor": (
        lambda: changed(add={"vit.vision_model.head.weight": torch.zeros(32)}),
        r"unexpected tensors, not part of such a model: 'vit.vision_model.head.weight'",
    ),
    "extra-tensor": (
        lambda: changed(add={"optimizer.exp_avg": torch.zeros(3)}),
        r"projector .* unexpected tensors, not part of such a model: 'optimizer.exp_avg'",
    ),
    "missing-rwkv-tensor": (
        lambda: changed(remove=["rwkv.blocks.1.att.gate.weight"]),
        r"missing tensors .*'rwkv.blocks.1.att.gate.weight' \(64, 64\)",
    ),
    "rwkv6-language-model-alone": (
        lambda: random_blinkdl_rwkv6(**TINY_RWKV),
        r"not a full VisualRWKV checkpoint.*RWKV-6 language model alone.*--rwkv A_rwkv.pth --visual A_visual.pth",
    ),
    "visual-half-alone": (
        lambda: export_pair(original_state_dict())[1],
        r"not a full VisualRWKV checkpoint.*`_visual.pth` half of an exported pair",
    ),
    "no-vision-tower": (
        lambda: {k: v for k, v in original_state_dict().items() if k.startswith("rwkv.")},
        r"holds no vision tower: expected 'vit.\*' tensors",
    ),
    "random-dict": (lambda: {"weight": torch.zeros(3)}, r"not a full VisualRWKV checkpoint: expected 'rwkv.\*'"),
    "list": (lambda: [torch.zeros(3)], r"is not a state dict: expected a dict .* got list"),
    "non-tensor-values": (lambda: changed(add={"epoch": 3}), r"not a plain state dict.*'epoch'"),
}


@pytest.mark.parametrize("name", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_refused_and_nothing_is_written(name, tmp_path):
    make, message = BAD_CHECKPOINTS[name]
    torch.save(make(), tmp_path / "bad.pth")
    vision_config = vision_config_file(tmp_path)
    with pytest.raises(ValueError, match=message):
        convert_visualrwkv_checkpoint(
            tmp_path / "out" / "hf", checkpoint=tmp_path / "bad.pth", vision_config=vision_config, progress=False
        )
    assert sorted(os.listdir(tmp_path)) == ["bad.pth", "vision.json"]


def test_pair_errors(tmp_path):
    files = write_original_files(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="Give either a full VisualRWKV checkpoint .* or both files"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", rwkv=files.rwkv)
    with pytest.raises(ValueError, match="Give either"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", checkpoint=files.full, rwkv=files.rwkv, visual=files.visual)
    with pytest.raises(ValueError, match="has 'rwkv.\\*' keys: it is a full VisualRWKV checkpoint"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", rwkv=files.full, visual=files.visual)
    with pytest.raises(ValueError, match="A_rwkv.pth holds no vision tower.* the RWKV-6 and visual files swapped"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", rwkv=files.visual, visual=files.rwkv)
    with pytest.raises(ValueError, match="projector in .*full.pth .* unexpected tensors.*'rwkv.emb.weight'"):
        convert_visualrwkv_checkpoint(
            tmp_path / "hf", rwkv=files.rwkv, visual=files.full, vision_config=files.vision_config
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_visualrwkv_checkpoint(tmp_path / "hf", rwkv=files.rwkv, visual=tmp_path / "absent.pth")
    assert sorted(os.listdir(tmp_path)) == before


def test_failure_while_writing_leaves_nothing_and_pushes_nothing(tmp_path, monkeypatch):
    files = write_original_files(tmp_path)
    before = sorted(os.listdir(tmp_path))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(visualrwkv_hf.convert_visualrwkv, "model_card", disk_full)
    monkeypatch.setattr(visualrwkv_hf.convert_visualrwkv, "HfApi", disk_full)  # would fail loudly if reached
    with pytest.raises(OSError, match="No space left"):
        convert_visualrwkv_checkpoint(
            tmp_path / "hf", checkpoint=files.full, vision_config=files.vision_config, push_to_hub="me/x",
            progress=False,
        )
    assert sorted(os.listdir(tmp_path)) == before


def test_non_empty_output_needs_overwrite(tmp_path):
    files = write_original_files(tmp_path)
    output = tmp_path / "hf"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite"):
        convert_visualrwkv_checkpoint(output, checkpoint=files.full, vision_config=files.vision_config)
    assert os.listdir(output) == ["keep.txt"]
    convert_visualrwkv_checkpoint(
        output, checkpoint=files.full, vision_config=files.vision_config, overwrite=True, progress=False
    )
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` and each file's bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


def inputs_inside_the_output(files: OriginalFiles) -> dict[str, tuple[dict, Path, str]]:
    """(inputs, output, the input named in the error) where the output folder is, or holds, an input."""
    directory = files.full.parent
    config_file = files.vision_config / "config.json"
    return {
        "full checkpoint in the output": ({"checkpoint": files.full}, directory, str(files.full)),
        "output is the vision config folder": (
            {"checkpoint": files.full, "vision_config": files.vision_config}, files.vision_config,
            str(files.vision_config),
        ),
        "vision config file in the output": (
            {"checkpoint": files.full, "vision_config": config_file}, files.vision_config, str(config_file)
        ),
        "pair in the output's subfolder": (
            {"rwkv": files.rwkv, "visual": files.visual}, directory.parent, str(files.rwkv)
        ),
    }


@pytest.mark.parametrize("case", [
    "full checkpoint in the output", "output is the vision config folder", "vision config file in the output",
    "pair in the output's subfolder",
])
def test_an_output_holding_an_input_is_refused_even_with_overwrite(case, tmp_path):
    (tmp_path / "originals").mkdir()
    files = write_original_files(tmp_path / "originals")
    inputs, output, named = inputs_inside_the_output(files)[case]
    inputs.setdefault("vision_config", files.vision_config)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"^The input {re.escape(named)} (is|lies inside) the output "
                                         rf"{re.escape(str(output))}: writing there would delete it\."):
        convert_visualrwkv_checkpoint(output, overwrite=True, progress=False, **inputs)
    assert snapshot(tmp_path) == before


def test_nan_and_inf_weights_are_named_per_file_and_refused_unless_allowed():
    state_dict = original_state_dict()
    state_dict["vit.vision_model.encoder.layers.1.mlp.fc1.weight"][0, :2] = float("nan")
    state_dict["proj.weight"][3, 3] = float("inf")
    rwkv, visual = export_pair(state_dict)
    rwkv["blocks.2.att.output.weight"][0, 0] = float("nan")
    pair = OriginalCheckpoint.from_pair(rwkv, visual, "A_rwkv.pth", "A_visual.pth")
    vision_config = CLIPVisionConfig(**TINY_CLIP)
    with pytest.raises(ValueError, match=re.escape(
        "A_rwkv.pth holds NaN or infinite weights in 1 tensor: 'blocks.2.att.output.weight' (1 NaN, 0 inf of 4096 "
        "values)"
    )):
        convert_original_to_hf(pair, vision_config)
    rwkv["blocks.2.att.output.weight"][0, 0] = 0.0
    with pytest.raises(ValueError, match=re.escape(
        "A_visual.pth holds NaN or infinite weights in 2 tensors: 'vit.vision_model.encoder.layers.1.mlp.fc1.weight' "
        "(2 NaN, 0 inf of 2048 values), 'proj.weight' (0 NaN, 1 inf of 2048 values)"
    )):
        convert_original_to_hf(pair, vision_config)
    _, converted = convert_original_to_hf(pair, vision_config, allow_nonfinite=True)
    assert converted["model.multi_modal_projector.linear.weight"][3, 3] == float("inf")
    assert converted["model.vision_tower.encoder.layers.1.mlp.fc1.weight"][0, :2].isnan().all()
    # A full checkpoint names its keys as in the file.
    state_dict = original_state_dict()
    state_dict["rwkv.emb.weight"][7, 0] = float("-inf")
    with pytest.raises(ValueError, match=re.escape("full.pth holds NaN or infinite weights in 1 tensor: "
                                                   "'rwkv.emb.weight' (0 NaN, 1 inf of ")):
        convert_original_to_hf(OriginalCheckpoint.from_full(state_dict, "full.pth"), vision_config)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls (and the folder's files at upload time)."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", sorted(os.listdir(kwargs["folder_path"])), kwargs))


def test_push_to_hub_creates_the_repo_and_uploads_the_finished_folder(tmp_path, monkeypatch):
    files = write_original_files(tmp_path)
    monkeypatch.setattr(RecordingHfApi, "calls", [])
    monkeypatch.setattr(visualrwkv_hf.convert_visualrwkv, "HfApi", RecordingHfApi)
    output = convert_visualrwkv_checkpoint(
        tmp_path / "hf", rwkv=files.rwkv, visual=files.visual, vision_config=files.vision_config,
        push_to_hub="someone/visualrwkv6-tiny", progress=False,
    )
    (create, repo_id, create_kwargs), (upload, uploaded_files, upload_kwargs) = RecordingHfApi.calls
    assert (create, repo_id, create_kwargs) == ("create_repo", "someone/visualrwkv6-tiny",
                                                {"repo_type": "model", "exist_ok": True})
    assert upload == "upload_folder" and uploaded_files == sorted(os.listdir(output))
    assert "model.safetensors" in uploaded_files and "README.md" in uploaded_files
    assert Path(upload_kwargs["folder_path"]) == output
    assert (upload_kwargs["repo_id"], upload_kwargs["repo_type"]) == ("someone/visualrwkv6-tiny", "model")


def test_image_processor_follows_the_vision_encoder():
    from transformers import SiglipVisionConfig
    from transformers.image_utils import OPENAI_CLIP_MEAN

    text = dict(hidden_size=32, num_hidden_layers=2, head_size=8)
    siglip = VisualRWKVConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14
        ).to_dict(),
        text_config=text,
    )
    pixels = image_processor_for(siglip)(test_image(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 56, 56)
    assert tuple(image_processor_for(siglip).image_mean) == (0.5, 0.5, 0.5)
    clip = VisualRWKVConfig(vision_config=CLIPVisionConfig(image_size=56, patch_size=14).to_dict(), text_config=text)
    processor = image_processor_for(clip)
    assert tuple(processor.image_mean) == tuple(OPENAI_CLIP_MEAN)
    assert processor(test_image(), return_tensors="pt")["pixel_values"].shape == (1, 3, 56, 56)
