"""Fine-tunes a tiny random VisualRWKV for a few Trainer steps on four in-memory samples; the same script runs in one
process or under `accelerate launch --num_processes N` (tests/test_training.py compares the two).

Writes `<output-dir>/initial` (the model before training) and `<output-dir>/model` (after), from the main process.
The four samples are one global batch, so every step sees all of them whatever the process count.
"""

import argparse
import sys
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_pipeline import random_image, save_tiny_visualrwkv  # noqa: E402

from visualrwkv_hf.data import LlavaDataset, VisualRWKVDataCollator  # noqa: E402
from visualrwkv_hf.training import freeze_for_training  # noqa: E402

ANSWERS = ["Red", "Blue", "Green", "A yellow square"]


def tiny_records() -> list[dict]:
    """Four samples: three with an image (answers of different lengths), one text only."""
    records = [
        {"image": random_image(seed), "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": answer}]}
        for seed, answer in enumerate(ANSWERS[:3])
    ]
    records.append(
        {"conversations": [{"from": "human", "value": "Name a shape."}, {"from": "gpt", "value": ANSWERS[3]}]}
    )
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--per-device-batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()

    args = TrainingArguments(
        output_dir=str(options.output_dir / "trainer"),
        per_device_train_batch_size=options.per_device_batch_size,
        learning_rate=3e-3,
        max_steps=options.steps,
        lr_scheduler_type="constant",
        save_strategy="no",
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    folder = options.output_dir / "initial"
    if args.process_index == 0:
        save_tiny_visualrwkv(folder)
    with args.main_process_first():
        model = freeze_for_training(AutoModelForImageTextToText.from_pretrained(folder))
        processor = AutoProcessor.from_pretrained(folder)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=LlavaDataset(tiny_records()),
        data_collator=VisualRWKVDataCollator(processor),
    )
    trainer.train()
    trainer.save_model(str(options.output_dir / "model"))


if __name__ == "__main__":
    main()
