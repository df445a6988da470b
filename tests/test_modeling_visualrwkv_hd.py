"""VisualRWKV (modeling_visualrwkv.py) with the three-encoder backbone of VisualRWKV-HD / -UHD: the behaviours every
family keeps (padded batches, cache reuse, pipeline, LoRA presets, remote code, bad inputs). Kept apart from
test_modeling_visualrwkv.py, whose tiny CLIP models are much faster; these run the real 448 / 1024 px inputs through
tiny towers."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from visualrwkv_hf import (
    RwkvWorldTokenizer,
    VisualRWKVConfig,
    VisualRWKVForConditionalGeneration,
    VisualRWKVProcessor,
    freeze_for_training,
    lora_config,
)
from visualrwkv_hf.image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor
from visualrwkv_hf.remote_code import add_remote_code

from test_modeling_sam_dino_siglip import TINY_VISION_CONFIG

QUESTIONS = ("What color?", "Describe the whole picture, please.")
TEXT = dict(hidden_size=32, num_hidden_layers=2, head_size=8, time_mix_extra_dim=4, time_decay_extra_dim=6)


def tiny_config(tiles_per_side: int = 0, projector_type: str = "gated_mlp") -> VisualRWKVConfig:
    vision = {"model_type": "visualrwkv_sam_dino_siglip", "tiles_per_side": tiles_per_side}
    vision |= {f"{name}_config": kwargs for name, kwargs in TINY_VISION_CONFIG.items()}
    return VisualRWKVConfig(vision_config=vision, text_config=TEXT, projector_type=projector_type)


def tiny_model(seed: int = 0, **kwargs) -> VisualRWKVForConditionalGeneration:
    torch.manual_seed(seed)
    model = VisualRWKVForConditionalGeneration(tiny_config(**kwargs)).eval()
    with torch.no_grad():  # visible image features: the projector's default init is small
        for parameter in model.model.multi_modal_projector.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.5)
    return model


def tiny_processor(tiles_per_side: int = 0) -> VisualRWKVProcessor:
    return VisualRWKVProcessor(
        image_processor=SamDinoSiglipImageProcessor(tiles_per_side=tiles_per_side),
        tokenizer=RwkvWorldTokenizer(),
        num_image_tokens=1024,
    )


def random_image(seed: int, size=(52, 40)) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hd():
    return tiny_model(), tiny_processor()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, hd) -> Path:
    folder = tmp_path_factory.mktemp("hd")
    model, processor = hd
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@torch.no_grad()
def test_padded_batch_with_and_without_image_equals_each_alone(hd):
    model, processor = hd
    batch = processor(images=[[random_image(1)], []], text=list(QUESTIONS), padding=True, return_tensors="pt")
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values", "high_res_pixel_values"]
    assert batch["pixel_values"].shape[0] == batch["high_res_pixel_values"].shape[0] == 1
    logits = model(**batch).logits
    alone_image = model(**processor(images=random_image(1), text=QUESTIONS[0], return_tensors="pt")).logits[0]
    alone_text = model(**processor(text=QUESTIONS[1], return_tensors="pt")).logits[0]
    for row, alone in ((0, alone_image), (1, alone_text)):
        torch.testing.assert_close(logits[row, -alone.shape[0] :], alone, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_generation_with_cache_equals_recomputing(hd):
    model, processor = hd
    inputs = processor(images=random_image(2), text=QUESTIONS[0], return_tensors="pt")
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    cached = model.generate(**inputs, **settings)
    recomputed = model.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached, recomputed)
    # the features computed once and reused give the same answer
    features = model.get_image_features(inputs["pixel_values"], inputs["high_res_pixel_values"], return_dict=True)
    reused = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        mm_encoder_outputs={"image": features}, **settings,
    )
    assert torch.equal(cached, reused)


@torch.no_grad()
def test_uhd_reads_five_views_and_twice_the_channels():
    model, processor = tiny_model(tiles_per_side=2, projector_type="relu_mlp"), tiny_processor(tiles_per_side=2)
    inputs = processor(images=random_image(3), text=QUESTIONS[0], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 5, 3, 448, 448)
    assert model.model.multi_modal_projector.in_proj.in_features == 2 * (32 + 48 + 32)
    assert torch.isfinite(model(**inputs).logits).all()


def test_pipeline_answers_from_a_saved_folder(folder):
    pipe = pipeline("image-text-to-text", model=str(folder))
    (output,) = pipe(images=random_image(4), text=QUESTIONS[0], max_new_tokens=3, return_full_text=False)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=random_image(4), text=QUESTIONS[0], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output["generated_text"] == processor.decode(generated[0, inputs["input_ids"].shape[1] :],
                                                        skip_special_tokens=True)


@pytest.mark.parametrize("projector_type", ["gated_mlp", "input_gated_mlp"])
def test_lora_projector_preset_adapts_every_mlp_linear_and_no_tower(projector_type):
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_model(projector_type=projector_type), lora_config("projector", r=2))
    adapted = {name.split(".base_layer")[0] for name, _ in peft_model.named_modules() if name.endswith("base_layer")}
    expected = {"in_proj", "gate", "out_proj"} if projector_type == "gated_mlp" else {"gate", "out_proj"}
    assert {name.rsplit(".", 1)[1] for name in adapted} == expected
    assert all("multi_modal_projector" in name for name in adapted)
    everything = get_peft_model(tiny_model(projector_type=projector_type), lora_config("all-linear", r=2))
    assert not any("vision_tower" in name and "lora_" in name for name, _ in everything.named_parameters())


def test_training_freezes_the_three_towers_and_trains_the_mlp(hd):
    model = freeze_for_training(tiny_model())
    towers = model.model.vision_tower
    assert not any(p.requires_grad for p in towers.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    processor = hd[1]
    inputs = processor(images=random_image(5), text=QUESTIONS[0], return_tensors="pt")
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["input_ids"] == 65530, -100)).loss
    loss.backward()
    assert model.model.multi_modal_projector.out_proj.weight.grad.abs().sum() > 0


def test_bad_inputs_are_refused_with_what_is_expected(hd):
    model, processor = hd
    inputs = processor(images=random_image(6), text=QUESTIONS[0], return_tensors="pt")
    with pytest.raises(ValueError, match="needs `high_res_pixel_values`"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    broken = inputs["high_res_pixel_values"].clone()
    broken[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`high_res_pixel_values` of image\(s\) \[0\] hold NaN"):
        model(**{**inputs, "high_res_pixel_values": broken})
    with pytest.raises(ValueError, match="Got 2 images for 1 rows with image placeholders"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1, 1),
                 "high_res_pixel_values": inputs["high_res_pixel_values"].repeat(2, 1, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"`pixel_values` must be \(images, 1, 3, 448, 448\)"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][..., :224, :224]})
    with pytest.raises(ValueError, match="takes one image a prompt"):
        processor(images=[[random_image(1), random_image(2)]], text=[QUESTIONS[0]])


def test_small_images_are_resized_not_refused():
    processor = tiny_processor()
    inputs = processor(images=random_image(7, size=(3, 2)), text=QUESTIONS[0], return_tensors="pt")
    assert inputs["high_res_pixel_values"].shape == (1, 1, 3, 1024, 1024)
    with pytest.raises(ValueError, match="cannot be split into 2 x 2 tiles: it needs at least 2 pixels a side"):
        tiny_processor(tiles_per_side=2)(images=random_image(7, size=(1, 5)), text=QUESTIONS[0])


# Runs in `python -I` where `visualrwkv_hf` cannot be imported (as test_remote_code's script).
WITHOUT_PACKAGE = r"""
import os, sys
sys.path[:] = [entry for entry in sys.path if not os.path.isdir(os.path.join(entry, "visualrwkv_hf"))]
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, image_path, question, output_path = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=Image.open(image_path), text=question, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({"classes": [type(model).__module__, type(processor.image_processor).__module__], "logits": logits},
           output_path)
"""


def remote_code_run_equals_the_package(folder: Path, processor, question: str, tmp_path: Path, monkeypatch) -> list:
    """Copies a saved folder, adds remote code to the copy, loads it in a Python without this package (`-I`) and
    asserts its logits for one image and `question` equal the package's on `folder`; returns the files added."""
    remote = tmp_path / "remote"
    remote.mkdir()
    for path in folder.iterdir():
        (remote / path.name).write_bytes(path.read_bytes())
    written = add_remote_code(remote)
    image_path = tmp_path / "image.png"
    random_image(8).save(image_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "VISUALRWKV_WKV_BACKEND": "torch"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_PACKAGE, str(remote), str(image_path), question, str(tmp_path / "out.pt")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(name.startswith("transformers_modules.") for name in result["classes"]), result["classes"]
    monkeypatch.setenv("VISUALRWKV_WKV_BACKEND", "torch")
    model = VisualRWKVForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(**processor(images=PIL.Image.open(image_path), text=question, return_tensors="pt")).logits
    torch.testing.assert_close(result["logits"], expected)
    return written


def test_remote_code_folder_loads_without_the_package(folder, tmp_path, monkeypatch, hd):
    remote_code_run_equals_the_package(folder, hd[1], QUESTIONS[0], tmp_path, monkeypatch)
