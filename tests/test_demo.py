"""`visualrwkv demo` at a tiny size: the drawn data answer their questions (read back from the pixels), the held-out
split shares no (scene, question) pair with training, and a few Trainer steps give a folder that loads and answers
through the pipeline and `visualrwkv chat`."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText

from visualrwkv_hf import demo
from visualrwkv_hf.cli import main
from visualrwkv_hf.data import VisualRWKVDataCollator
from visualrwkv_hf.ops.loss import kept_logits_loss


def read_scene(image) -> dict[str, tuple[str, str]]:
    """Position -> (shape, colour) of the objects in a drawn image, from its pixels alone."""
    pixels = np.asarray(image)
    scene = {}
    for position, (row, col) in demo.POSITIONS.items():
        cell = pixels[row * demo.CELL:(row + 1) * demo.CELL, col * demo.CELL:(col + 1) * demo.CELL]
        filled = (cell != demo.BACKGROUND).any(-1)
        if not filled.any():
            continue
        rows, cols = np.nonzero(filled)
        box = filled[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        colour = next(name for name, rgb in demo.COLORS.items() if (cell[filled] == rgb).all())
        corners = box[[0, 0, -1, -1], [0, -1, 0, -1]]
        if corners.all():
            shape = "square"
        elif corners[2:].all() and not corners[:2].any():
            shape = "triangle"
        else:  # a disc fills ~78% of its box, a cross of bars a third as thick ~55%
            shape = "circle" if box.mean() > 0.68 else "cross"
        scene[position] = (shape, colour)
    return scene


def answer_from_pixels(image, question: str) -> str:
    scene = read_scene(image)
    if match := re.fullmatch(r"What color is the (\w+)\?", question):
        (colour,) = [c for s, c in scene.values() if s == match[1]]
        return colour
    if match := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (shape,) = [s for s, c in scene.values() if c == match[1]]
        return shape
    if match := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (position,) = [p for p, (s, c) in scene.items() if (s, c) == (match[2], match[1])]
        return position
    if match := re.fullmatch(r"How many (\w+) are there\?", question):
        shape = {plural: shape for shape, plural in demo.PLURALS.items()}[match[1]]
        return demo.COUNT_WORDS[sum(s == shape for s, _ in scene.values()) - 1]
    if match := re.fullmatch(r"What is at the (\w+)\?", question):
        return " ".join(reversed(scene[match[1]]))
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_the_pixels_and_are_balanced():
    samples = demo.make_samples(400, seed=3, question_types=(*demo.QUESTION_TYPES, demo.DESCRIBE))
    for sample in samples:
        assert answer_from_pixels(sample.image, sample.question) == sample.answer, sample
        assert 2 <= len(read_scene(sample.image)) <= 4
    for question_type in demo.QUESTION_TYPES:
        answers = [sample.answer for sample in samples if sample.question_type == question_type]
        counts = {answer: answers.count(answer) for answer in set(answers)}
        assert len(counts) == 4 and max(counts.values()) < 0.45 * len(answers), (question_type, counts)


def test_held_out_split_shares_no_scene_question_pair():
    train, test = demo.make_splits(300, 100, seed=0)
    assert not {sample.key for sample in train} & {sample.key for sample in test}
    assert len({sample.key for sample in test}) > 90


def test_the_answer_window_with_its_kept_logits_loss_matches_the_full_loss():
    """The left-padded batch with two kept logits per row gives the model's own loss over the right-padded batch."""
    model, processor = demo.build_model(seed=0)
    samples = demo.make_samples(6, seed=1, question_types=(*demo.QUESTION_TYPES, demo.DESCRIBE))
    records = [sample.to_llava() for sample in samples]
    collator = VisualRWKVDataCollator(processor)
    full = collator(records)
    window = demo.AnswerWindowCollator(collator)(records)
    assert (window["attention_mask"][:, -1] == 1).all()  # every row ends at the same position
    assert len(window["logits_to_keep"]) == 3  # a two-word answer and its turn end
    labels = window.pop("labels")
    with torch.no_grad():
        expected = model(**full).loss
        loss = kept_logits_loss(model(**window), labels)
    torch.testing.assert_close(loss, expected)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "visualrwkv-demo"
    accuracy = demo.run_demo(
        output, num_train=32, num_test=8, steps=4, batch_size=8, learning_rate=3e-3, seed=0, num_examples=2,
        progress=False,
    )
    assert 0.0 <= accuracy <= 1.0
    return output


def test_demo_gives_back_the_callers_thread_count(tmp_path):
    # The demo trains on one thread; a caller's later results (other tests here) must not depend on having run it.
    torch.set_num_threads(2)
    demo.run_demo(
        tmp_path / "out", num_train=8, num_test=4, steps=1, batch_size=4, learning_rate=1e-3, seed=0, num_examples=0,
        progress=False,
    )
    assert torch.get_num_threads() == 2


def test_demo_saves_a_folder_that_loads_and_answers(demo_folder, capsys):
    model = AutoModelForImageTextToText.from_pretrained(demo_folder)
    assert model.generation_config.eos_token_id == 261  # "\n\n" still ends the answer
    test = demo.make_splits(0, 2, seed=0)[1]
    answers = demo.answer_questions(demo_folder, test)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert (demo_folder / "sample.png").is_file()
    assert (demo_folder / "tokenizer.json").is_file()  # for clients that read only tokenizer.json
    assert main(["chat", "--model", str(demo_folder), "--image", str(demo_folder / "sample.png"),
                 "--max-new-tokens", "3", test[0].question]) == 0


def test_pipeline_answers_without_a_warning(demo_folder, caplog, capfd):
    # A load and a pipeline call as the demo makes them: nothing is wrong, so the user sees no warning.
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        demo.answer_questions(demo_folder, demo.make_splits(0, 4, seed=0)[1])
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    # transformers' own logger writes to stderr directly; its progress bars are all that may show there
    printed = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert [line for line in printed if "Loading weights" not in line] == []


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    # A converted model given as --output by mistake would lose its weights to the demo's same-named files.
    output = tmp_path / "my-model"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="not empty"):
        demo.run_demo(output, num_train=8, num_test=4, steps=1, batch_size=4, learning_rate=1e-3, seed=0)
    assert (output / "model.safetensors").read_bytes() == b"weights"


def test_cli_demo_runs(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["demo", "--output", str(output), "--steps", "2", "--batch-size", "4", "--num-test", "4",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Held-out accuracy" in printed and "NOT frozen" in printed
    assert (output / "config.json").is_file() and (output / "sample.png").is_file()
    # an earlier demo's folder is reused without --overwrite (make demo twice)
    assert main(["demo", "--output", str(output), "--steps", "1", "--batch-size", "4", "--num-test", "4",
                 "--no-progress"]) == 0
