"""`visualrwkv demo`: a VisualRWKV that learns to see on a laptop CPU in minutes.

It draws a synthetic visual-QA set (2-4 coloured shapes on a 48 x 48 canvas; questions about colour, shape, position
and count whose answers need both the image and the question), trains a tiny VisualRWKV on it from scratch with
plain `transformers.Trainer`, saves it, and answers held-out questions through `pipeline("image-text-to-text")`.

There are no pretrained weights offline, so the vision tower is a tiny CLIP trained from scratch together with the
rest; unlike the paper's recipe (a frozen CLIP) it is NOT frozen. The canvas is a 3 x 3 grid of cells of one patch
each, so every object lies inside one vision patch and the language model reads all 9 patches plus the cls token.

Every answer is one word from a set of four per question type, drawn uniformly, so guessing from the question alone
scores 25%. The held-out questions are about freshly drawn images, and no held-out (scene, question) pair occurs in
training.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

CELL = 16  # pixels per grid cell; also the vision patch size
GRID = 3
IMAGE_SIZE = CELL * GRID
BACKGROUND = (255, 255, 255)
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (230, 190, 0)}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# The four places an object can take, as (row, column) cells of the 3 x 3 grid: a diamond around the empty centre.
POSITIONS = {"top": (0, 1), "left": (1, 0), "right": (1, 2), "bottom": (2, 1)}
COUNT_WORDS = ("one", "two", "three", "four")
SHAPE_SIZES = (9, 11, 13)  # odd, so a cross is symmetric about its centre pixel
QUESTION_TYPES = ("color", "shape", "position", "count")
# The ablation's task (benchmarks/ablation.py): all four places taken, the question names the one to describe, so
# the instruction decides which object the model must read; 16 two-word answers.
DESCRIBE = "describe"
# Weight std of the RWKV-6 linears: 0.02 (the transformers default) makes a 64-wide model's blocks so close to the
# identity that almost nothing of the image reaches the answer at the start; about 1 / sqrt(width) passes it on.
INIT_RANGE = 0.15
VISION_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TEXT_SIZES = dict(hidden_size=64, num_hidden_layers=2, head_size=16, time_mix_extra_dim=8, time_decay_extra_dim=16)
DEFAULT_OUTPUT = "outputs/visualrwkv-demo"
# `visualrwkv demo`'s budget: 4-4.5 minutes of training on 2 CPU cores (measured with other jobs running); 1200 steps
# were too few for some seeds (72% held-out on seed 1).
DEFAULT_STEPS = 1500
DEFAULT_BATCH_SIZE = 32
# At 3e-3 the model sat near chance for most of the run and only some seeds found how to read the image before the
# rate decayed (1500 steps: 97.5% on seed 0, 56.5% on seed 1); at half the rate both do, by mid-run (98%, 100%).
DEFAULT_LEARNING_RATE = 1.5e-3
WHITE = (1.0, 1.0, 1.0)  # the background, as the image processor's rescaled pixels
WHITE_STD = (0.5, 0.5, 0.5)
# Learning-rate multiplier of the vision tower and projector, which make 3e-4 at the default rate. At the base rate
# their features grow and drift while the language model learns to read them: 400-step screens at a base rate of
# 3e-3 reached 36% held-out with the vision part at 3e-3 and 46% at 3e-4; 9e-4 did worse than 3e-4 over 1500 steps.
VISION_LR_SCALE = 0.2


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    position: str


@dataclass
class Sample:
    """One image with one question and its one-word answer."""

    objects: tuple[SceneObject, ...]
    question_type: str
    question: str
    answer: str
    image: PIL.Image.Image

    @property
    def key(self) -> tuple:
        """What the sample asks about what, ignoring the jitter of the drawing."""
        return frozenset(self.objects), self.question

    def to_llava(self) -> dict:
        """The sample as a LLaVA-format record (the image kept in memory)."""
        return {
            "image": self.image,
            "conversations": [
                {"from": "human", "value": "<image>\n" + self.question},
                {"from": "gpt", "value": self.answer},
            ],
        }


def draw_scene(objects: tuple[SceneObject, ...], rng: random.Random) -> PIL.Image.Image:
    """The scene on a white canvas: each object inside its cell, of a random size, shifted by at most one pixel.
    Every shape covers its centre pixel, so a cell's centre shows its object's colour."""
    image = PIL.Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for obj in objects:
        row, col = POSITIONS[obj.position]
        half = rng.choice(SHAPE_SIZES) // 2
        x = col * CELL + CELL // 2 + rng.randint(-1, 1)
        y = row * CELL + CELL // 2 + rng.randint(-1, 1)
        left, top, right, bottom = x - half, y - half, x + half, y + half
        color = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        elif obj.shape == "triangle":
            draw.polygon([(x, top), (left, bottom), (right, bottom)], fill=color)
        else:  # cross: two bars a third of the size thick
            arm = max(1, (2 * half + 1) // 6)
            draw.rectangle((left, y - arm, right, y + arm), fill=color)
            draw.rectangle((x - arm, top, x + arm, bottom), fill=color)
    return image


def _scene(target: list[SceneObject], others: list[tuple[str, str]], rng: random.Random) -> tuple[SceneObject, ...]:
    """The target objects at their positions plus (shape, colour) distractors at the remaining positions."""
    free = [position for position in POSITIONS if position not in {obj.position for obj in target}]
    rng.shuffle(free)
    return tuple(target) + tuple(SceneObject(shape, color, position) for (shape, color), position in zip(others, free))


def make_question(question_type: str, rng: random.Random) -> tuple[tuple[SceneObject, ...], str, str]:
    """A scene, a question of the given type about it and the answer, drawn so the answer is uniform over its four
    values and the question's words are needed to find it (the object it names is one of several)."""
    positions = list(POSITIONS)
    rng.shuffle(positions)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    num_others = rng.randint(1, 3)
    if question_type == "color":  # the named shape is the only one of its kind
        others = [(rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLORS))) for _ in range(num_others)]
        return _scene([SceneObject(shape, color, positions[0])], others, rng), f"What color is the {shape}?", color
    if question_type == "shape":  # the named colour is the only one of its kind
        others = [(rng.choice(SHAPES), rng.choice([c for c in COLORS if c != color])) for _ in range(num_others)]
        return _scene([SceneObject(shape, color, positions[0])], others, rng), (
            f"What shape is the {color} object?"
        ), shape
    if question_type == "position":  # a distractor shares the colour or the shape, so both words count
        twin = (rng.choice([s for s in SHAPES if s != shape]), color) if rng.random() < 0.5 else (
            shape, rng.choice([c for c in COLORS if c != color])
        )
        others = [twin] + [
            pair for pair in ((rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(num_others - 1))
            if pair != (shape, color)
        ]
        target = SceneObject(shape, color, positions[0])
        return _scene([target], others, rng), f"Where is the {color} {shape}?", target.position
    if question_type == "count":  # 1-4 objects of the named shape, in any colours, among 2-4 objects
        count = rng.randint(1, 4)
        targets = [SceneObject(shape, rng.choice(list(COLORS)), position) for position in positions[:count]]
        others = [
            (rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLORS)))
            for _ in range(rng.randint(max(0, 2 - count), 4 - count))
        ]
        return _scene(targets, others, rng), f"How many {PLURALS[shape]} are there?", COUNT_WORDS[count - 1]
    if question_type == DESCRIBE:
        objects = tuple(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), position) for position in positions)
        target = objects[0]
        return objects, f"What is at the {target.position}?", f"{target.color} {target.shape}"
    raise ValueError(f"Unknown question type {question_type!r}; expected one of {(*QUESTION_TYPES, DESCRIBE)}.")


def make_samples(
    num_samples: int, seed: int, question_types: tuple[str, ...] = QUESTION_TYPES, exclude: frozenset = frozenset()
) -> list[Sample]:
    """`num_samples` samples cycling through `question_types`, none whose `key` is in `exclude`."""
    rng = random.Random(seed)
    samples = []
    while len(samples) < num_samples:
        question_type = question_types[len(samples) % len(question_types)]
        objects, question, answer = make_question(question_type, rng)
        sample = Sample(objects, question_type, question, answer, draw_scene(objects, rng))
        if sample.key not in exclude:
            samples.append(sample)
    return samples


def make_splits(
    num_train: int, num_test: int, seed: int, question_types: tuple[str, ...] = QUESTION_TYPES
) -> tuple[list[Sample], list[Sample]]:
    """Training samples and held-out samples with no (scene, question) pair in common."""
    test = make_samples(num_test, seed + 1, question_types)
    train = make_samples(num_train, seed, question_types, exclude=frozenset(sample.key for sample in test))
    return train, test


def build_model(
    image_position: str | None = None,
    scan_mode: str = "bidirectional",
    seed: int = 0,
    num_text_layers: int | None = None,
):
    """A random tiny VisualRWKV (a CLIP of `VISION_SIZES` on 16-pixel patches, RWKV-6 blocks of `TEXT_SIZES`, the
    World vocabulary) and its processor, image processor sized for the 48-pixel canvas. `image_position` None keeps
    `VisualRWKVConfig`'s default; `num_text_layers` overrides the number of RWKV-6 blocks."""
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from . import RwkvWorldTokenizer, VisualRWKVConfig, VisualRWKVForConditionalGeneration, VisualRWKVProcessor

    config = VisualRWKVConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=CELL, **VISION_SIZES),
        text_config=dict(
            TEXT_SIZES, wkv_chunk_size=16, initializer_range=INIT_RANGE,
            num_hidden_layers=num_text_layers or TEXT_SIZES["num_hidden_layers"],
        ),
        scan_mode=scan_mode,
        **({} if image_position is None else {"image_position": image_position}),
    )
    torch.manual_seed(seed)
    model = VisualRWKVForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        # The white canvas maps to 0, so a blank patch embeds to its position alone and the objects carry the
        # signal; with CLIP's statistics the background dominated every patch and the features barely varied
        # between images (their spread across a batch shrank to ~5% of their size early in training).
        image_mean=WHITE,
        image_std=WHITE_STD,
    )
    processor = VisualRWKVProcessor(
        image_processor=image_processor,
        tokenizer=RwkvWorldTokenizer(),
        image_position=config.image_position,
        num_image_tokens=config.num_image_tokens,
    )
    return model, processor


class AnswerWindowCollator:
    """`VisualRWKVDataCollator`'s batches moved to the left padding, plus `logits_to_keep`: the positions whose
    logits predict a trained label. In a model this small the 65536-way head costs most of a training step, and here
    only the answer and its turn end are trained; left-padded, they end every row at the same positions, so for
    one-word answers two logits per row suffice instead of the span from the earliest answer of the batch to the end
    (five, right-padded). The padding is masked, so a row's outputs do not depend on its side. Train with
    `compute_loss_func=kept_logits_loss` (`ops/loss.py`), the loss of those logits."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, samples: list[dict]) -> dict:
        import torch

        batch = self.collator(samples)
        # Rolling each row by its padding moves the padding to the front and keeps the tokens in order.
        shifts = (batch["attention_mask"] == 0).sum(1)
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key] = torch.stack([row.roll(int(shift)) for row, shift in zip(batch[key], shifts)])
        labels = batch["labels"]
        length = labels.shape[1]
        first_label = torch.where(labels != -100, torch.arange(length), length).min()
        batch["logits_to_keep"] = torch.arange(first_label - 1, length - 1)  # each predicts the next label
        return batch


def train_model(
    model, processor, samples: list[Sample], output_dir: Path, *, steps: int, batch_size: int, learning_rate: float,
    seed: int, progress: bool = True, vision_learning_rate: float | None = None,
) -> float:
    """Trains the model with `transformers.Trainer`, saves it and the processor to `output_dir` and returns the
    training time in seconds. The vision tower trains too (it starts from random), at `vision_learning_rate`
    (default `VISION_LR_SCALE` times the rate); the token embedding stays frozen, as in the original recipe, which
    also spares the optimizer its 65536 rows."""
    import torch
    from transformers import Trainer, TrainingArguments

    from .data import LlavaDataset, VisualRWKVDataCollator
    from .ops.loss import kept_logits_loss

    model.get_input_embeddings().requires_grad_(False)
    vision, language = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (vision if "vision_tower" in name or "projector" in name else language).append(parameter)
    # Trainer builds its scheduler on this optimizer; the schedule scales each group's own rate.
    optimizer = torch.optim.AdamW(
        [{"params": language}, {"params": vision, "lr": vision_learning_rate or learning_rate * VISION_LR_SCALE}],
        lr=learning_rate, weight_decay=0.0, fused=True,  # unfused, the 65536-row head's update took a fifth of a step
    )
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        max_grad_norm=1.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,  # the collator takes the dataset's records as they are
        use_cpu=True,
        seed=seed,
        disable_tqdm=not progress,
        # Batches are drawn (images processed, prompts tokenized) in a second process, on the second core, while
        # this one trains: a tenth of a step's time otherwise.
        dataloader_num_workers=1,
    )
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=LlavaDataset([sample.to_llava() for sample in samples]),
        data_collator=AnswerWindowCollator(VisualRWKVDataCollator(processor)),
        compute_loss_func=kept_logits_loss,
        optimizers=(optimizer, None),
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    trainer.save_model(str(output_dir))
    # Saved here rather than given to Trainer, which would reset the model's end of turn ("\n\n") to the
    # tokenizer's end-of-text id.
    processor.save_pretrained(str(output_dir))
    return elapsed


def answer_questions(folder: Path, samples: list[Sample], batch_size: int = 64) -> list[str]:
    """The saved model's greedy answers through `pipeline("image-text-to-text")`."""
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(folder))
    chats = [
        [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                      {"type": "text", "text": sample.question}]}]
        for sample in samples
    ]
    # Generation options go in generate_kwargs: the pipeline hands any other keyword to the processor.
    outputs = pipe(
        text=chats, max_new_tokens=4, generate_kwargs={"do_sample": False}, batch_size=batch_size,
        return_full_text=False,
    )
    return [output["generated_text"] for (output,) in outputs]  # one answer per chat


def normalize_answer(prediction: str) -> str:
    return prediction.strip().rstrip(".").lower()


def is_correct(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == answer


def run_demo(
    output: Path, *, num_train: int, num_test: int, steps: int, batch_size: int, learning_rate: float, seed: int,
    num_examples: int = 8, progress: bool = True, overwrite: bool = False,
) -> float:
    """The whole demo: data, training, saving, held-out answers through the pipeline. Returns the accuracy.

    `output` must be new, empty, or an earlier demo's folder (it holds `sample.png`), unless `overwrite`: the
    model's files are written over same-named ones, which would ruin, say, a converted model given by mistake.
    """
    import torch

    from .checkpoint_io import check_output_dir

    check_output_dir(output, overwrite=overwrite or (output / "sample.png").is_file())
    start = time.perf_counter()
    # These ops are too small to gain from a second thread, and on a busy machine one thread per process is faster;
    # the caller's thread count comes back afterwards (a library call must not change the process's numerics).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = make_splits(num_train, num_test, seed)
        print(
            f"Drew {len(train)} training and {len(test)} held-out questions ({', '.join(QUESTION_TYPES)}) about "
            f"{IMAGE_SIZE} x {IMAGE_SIZE} images of 2-4 shapes; no held-out (scene, question) pair is in training."
        )
        model, processor = build_model(seed=seed)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"Training a random VisualRWKV ({n_params / 1e6:.1f}M parameters, most in the 65536-token embedding and "
            f"head; vision tower trained from scratch, NOT frozen) for {steps} steps of {batch_size} with "
            "transformers.Trainer:"
        )
        train_seconds = train_model(
            model, processor, train, output, steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
            progress=progress,
        )
        sample_image = output / "sample.png"
        test[0].image.save(sample_image)
        predictions = answer_questions(output, test)
        correct = [is_correct(prediction, sample.answer) for prediction, sample in zip(predictions, test)]
        print(f"\nHeld-out answers through pipeline('image-text-to-text', model={str(output)!r}):")
        for sample, prediction, right in list(zip(test, predictions, correct))[:num_examples]:
            print(f"  {sample.question:<36} -> {prediction!r:<12} ({'right' if right else 'wrong: ' + sample.answer})")
        for question_type in QUESTION_TYPES:
            scores = [right for sample, right in zip(test, correct) if sample.question_type == question_type]
            print(f"  {question_type:<9} {sum(scores) / len(scores):6.1%} of {len(scores)} (chance 25%)")
        accuracy = sum(correct) / len(correct)
        print(
            f"Held-out accuracy {accuracy:.1%} ({sum(correct)}/{len(correct)}); training {train_seconds:.0f} s, "
            f"all {time.perf_counter() - start:.0f} s.\nSaved to {output}/. Try: visualrwkv chat --model {output} "
            f"--image {sample_image} {test[0].question!r}   (answer: {test[0].answer})"
        )
        return accuracy
    finally:
        torch.set_num_threads(threads)

