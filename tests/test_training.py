"""Training with plain transformers.Trainer and PEFT on a tiny VisualRWKV: full fine-tuning and LoRA lower the loss,
freezing options, bf16 on CPU, merge equality, the merged folder, resume equality, two processes (gloo), and LoRA on
two-image samples with a tiny VisualRWKV-7."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

from visualrwkv_hf import RwkvWorldTokenizer, VisualRWKVForConditionalGeneration, VisualRWKVProcessor
from visualrwkv_hf.data import LlavaDataset, VisualRWKVDataCollator
from visualrwkv_hf.image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor
from visualrwkv_hf.ops.loss import sample_level_causal_lm_loss, sample_level_loss
from visualrwkv_hf.training import LORA_TARGETS, freeze_for_training, lora_config

from test_pipeline import save_tiny_visualrwkv

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_tiny import tiny_records  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_tiny_visualrwkv(tmp_path_factory.mktemp("tiny-visualrwkv"))


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def dataset():
    return LlavaDataset(tiny_records())


@pytest.fixture
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder)


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,  # the dataset's items are the collator's input
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **overrides})


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def train(model, processor, dataset, output_dir, **overrides) -> Trainer:
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=dataset,
        data_collator=VisualRWKVDataCollator(processor),
    )
    trainer.train()
    return trainer


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_full_fine_tuning_lowers_the_loss(model, processor, dataset, tmp_path, bf16):
    batch = VisualRWKVDataCollator(processor)([dataset[index] for index in range(len(dataset))])
    vision_before = {name: value.clone() for name, value in model.model.vision_tower.state_dict().items()}
    freeze_for_training(model)
    before = batch_loss(model, batch)
    train(model, processor, dataset, tmp_path, activation_checkpointing=True, bf16=bf16)
    assert batch_loss(model, batch) < before - 0.1
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision_before[name]), name


def test_freeze_for_training_options(model):
    freeze_for_training(model, train_embeddings=True, frozen_blocks=2, train_projector=False)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert not any("vision_tower" in name or "multi_modal_projector" in name for name in trainable)
    assert "model.language_model.embeddings.weight" in trainable and "lm_head.weight" in trainable
    assert not any(".blocks.0." in name or ".blocks.1." in name for name in trainable)
    assert any(".blocks.2." in name for name in trainable) and any(".blocks.3." in name for name in trainable)
    freeze_for_training(model)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "model.language_model.embeddings.weight" not in trainable
    assert "model.multi_modal_projector.linear.weight" in trainable and any(".blocks.0." in n for n in trainable)
    with pytest.raises(ValueError, match="frozen_blocks"):
        freeze_for_training(model, frozen_blocks=5)


@pytest.mark.parametrize("targets", ["all", "all-linear"])
def test_lora_lowers_the_loss_and_merges(model, processor, dataset, tmp_path, targets):
    batch = VisualRWKVDataCollator(processor)([dataset[index] for index in range(len(dataset))])
    peft_model = get_peft_model(model, lora_config(targets, r=4, lora_alpha=8))
    adapted = {name.split(".lora_A")[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    # PEFT's matching: the module name is a target or ends with "." + target
    expected = {name for name, _ in model.named_modules()
                if any(name == target or name.endswith("." + target) for target in LORA_TARGETS["all"])}
    assert {name.removeprefix("base_model.model.") for name in adapted} == expected  # no vision tower
    before = batch_loss(peft_model, batch)
    train(peft_model, processor, dataset, tmp_path / "run", activation_checkpointing=True, learning_rate=1e-2)
    adapted_loss = batch_loss(peft_model, batch)
    assert adapted_loss < before - 0.1

    with torch.no_grad():
        adapted_logits = peft_model(**batch).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is VisualRWKVForConditionalGeneration
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted_logits, atol=1e-4, rtol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    assert not any("lora" in key for key in load_file(tmp_path / "merged" / "model.safetensors"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, adapted_logits, atol=1e-4, rtol=1e-4)


def test_sample_level_loss_trains(model, processor, dataset, tmp_path):
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=dataset,
        data_collator=VisualRWKVDataCollator(processor),
        compute_loss_func=sample_level_loss,
    )
    batch = VisualRWKVDataCollator(processor)([dataset[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        # Trainer calls the model without the labels and hands them to `compute_loss_func`
        expected = sample_level_causal_lm_loss(model(**{**batch, "labels": None}).logits, batch["labels"])
        assert trainer.compute_loss(model, dict(batch)) == pytest.approx(expected.item(), rel=1e-6)
        assert model(**batch).loss.item() != pytest.approx(expected.item(), rel=1e-3)  # not the token-level mean
    model.train()
    trainer.train()
    losses = step_losses(trainer)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_resume_from_checkpoint_continues_with_the_same_losses(folder, processor, dataset, tmp_path):
    def fresh_model():
        return AutoModelForImageTextToText.from_pretrained(folder)

    overrides = dict(per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2)
    uninterrupted = step_losses(train(fresh_model(), processor, dataset, tmp_path / "a", **overrides))
    # A new model and Trainer, resumed from the first run's step-2 checkpoint, stand in for an interrupted run.
    resumed = Trainer(
        model=fresh_model(),
        args=training_args(tmp_path / "b", **overrides),
        train_dataset=dataset,
        data_collator=VisualRWKVDataCollator(processor),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    # The resumed state's log holds the checkpoint's two losses, then the two computed after resuming.
    assert len(uninterrupted) == 4
    assert step_losses(resumed) == pytest.approx(uninterrupted, abs=1e-6)


def test_two_processes_match_one_process(tmp_path):
    """tests/scripts/train_tiny.py under `accelerate launch --num_processes 2` (CPU, gloo) gives the model that one
    process gives with the same global batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    single = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "one"), "--per-device-batch-size", "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # accelerate starts several CPU processes (torchrun, gloo) through its multi-GPU launcher; `--cpu` runs one.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    double = subprocess.run(
        [*launcher, str(SCRIPT), "--output-dir", str(tmp_path / "two"), "--per-device-batch-size", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "model.safetensors")
    initial = load_file(tmp_path / "one" / "initial" / "model.safetensors")
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[key], initial[key]) for key in one)  # training changed the model
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)


def test_lora_on_two_image_samples_lowers_the_loss_of_a_tiny_visualrwkv7(tmp_path):
    """VisualRWKV-7 reads several images per sample: LoRA (projector included) through Trainer on two-image records,
    each batch's images collated row by row."""
    from test_modeling_visualrwkv7 import IMAGE_ID, random_image, tiny_model

    model = tiny_model(grid_size=4)  # 16 tokens per image, the original train.py's default
    with torch.no_grad():  # a head of trained scale: at the 0.02 init every logit is ~0, whatever the adapters do
        model.lm_head.weight.normal_(0, 1)
    processor = VisualRWKVProcessor(
        image_processor=SamDinoSiglipImageProcessor(), tokenizer=RwkvWorldTokenizer(),
        num_image_tokens=model.config.num_image_tokens, image_position="first", image_token_id=IMAGE_ID,
    )
    dataset = LlavaDataset([
        {"image": [random_image(seed), random_image(seed + 10)], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich one is brighter?"}, {"from": "gpt", "value": answer}]}
        for seed, answer in enumerate(["The left one.", "The second image, clearly."])
    ])
    collator = VisualRWKVDataCollator(processor)
    batch = collator([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape[0] == batch["high_res_pixel_values"].shape[0] == 4
    peft_model = get_peft_model(model, lora_config("all", r=4, lora_alpha=8))
    before = batch_loss(peft_model, batch)
    Trainer(
        model=peft_model,
        args=training_args(tmp_path, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2),
        train_dataset=dataset,
        data_collator=collator,
    ).train()
    assert batch_loss(peft_model, batch) < before - 0.1
    assert not any("vision_tower" in name and "lora_" in name for name, _ in peft_model.named_parameters())
