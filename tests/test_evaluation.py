"""`visualrwkv eval`: each scorer against cases computed by hand from the benchmark's definition, the question and
answer files of each benchmark in their official formats (tiny synthetic copies), and the whole command on a tiny
random VisualRWKV: one line per question, batched answers equal one-at-a-time answers, an interrupted run resumes to
the same file, the printed table and the scores file are the scorer's on the written answers, bad inputs fail early
with a readable message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_pipeline import random_image, save_tiny_visualrwkv
from visualrwkv_hf.cli import main
from visualrwkv_hf.evaluation import (
    LLAVA_SHORT_ANSWER,
    format_scores,
    gqa_exact_match,
    load_ground_truth,
    load_questions,
    mme_scores,
    mme_yes_no,
    normalize_vqa_answer,
    pope_metrics,
    pope_yes_no,
    read_answers,
    run_evaluation,
    score_answers,
    scienceqa_choice,
    scores_path,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------------------------------
# Scorers, by hand


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("2 dogs", "2 dogs"),
        ("The Red Car!", "red car"),  # case, article, punctuation
        ("an apple", "apple"),
        ("none", "0"),
        ("dont", "don't"),  # apostrophe-less contraction restored
        ("couldnt've", "couldn't've"),
        ("2.5", "2.5"),  # a period before a digit is a decimal point
        ("1,000", "1000"),
        ("hi-fi", "hi fi"),  # a mark inside a word separates
        ("left - right", "left right"),  # a mark next to a space goes
        ("x-y/-z", "x y z"),  # ... next to a space in the answer as given, not after "/" became a space
        ("What?", "what"),
        ("  yes \n", "yes"),
    ],
)
def test_vqa_normalisation(answer, normalised):
    assert normalize_vqa_answer(answer) == normalised


@pytest.mark.parametrize(
    "matches, accuracy",
    [
        # k of 10 humans gave the prediction. Leaving out one of those k leaves k - 1 matches, one of the other
        # 10 - k leaves k; accuracy = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
        (0, 0.0),
        (1, (1 * 0 + 9 * 1 / 3) / 10),  # 0.3
        (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),  # 0.6
        (3, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_counts_matches_over_leave_one_out_subsets(matches, accuracy):
    humans = ["two dogs"] * matches + ["cat"] * (10 - matches)
    assert vqa_accuracy("2 dogs", humans) == pytest.approx(accuracy)
    assert vqa_accuracy("Two dogs.", humans) == pytest.approx(accuracy)  # normalised on both sides


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("yes", [])


def test_gqa_exact_match():
    assert gqa_exact_match("Yes.", "yes")
    assert gqa_exact_match(" Left ", "left")
    assert not gqa_exact_match("the left", "left")  # no article removal in GQA
    assert not gqa_exact_match("no", "yes")


@pytest.mark.parametrize(
    "prediction, num_choices, choice",
    [
        ("B", 3, 1),
        ("C. blue", 3, 2),
        ("The answer is A.", 2, 0),
        ("I think the answer is B", 4, None),  # "the", not "The answer is"
        ("D", 3, None),  # not one of the three options
        ("E", 5, 4),
        ("blue", 3, None),
    ],
)
def test_scienceqa_choice(prediction, num_choices, choice):
    assert scienceqa_choice(prediction, num_choices) == choice


def test_pope_yes_no_reads_the_first_sentence():
    assert pope_yes_no("No") == "no"
    assert pope_yes_no("There is not a dog.") == "no"
    assert pope_yes_no("Yes, there is a dog. There is no cat.") == "yes"  # only the first sentence counts
    assert pope_yes_no("No, there is none") == "no"
    assert pope_yes_no("Nope") == "yes"  # only the words no / No / not


def test_pope_metrics_by_hand():
    # yes/yes TP, yes/no FP, no/no TN, no/yes FN, yes/yes TP: TP 2, FP 1, TN 1, FN 1.
    metrics = pope_metrics(["Yes", "Yes", "No", "No", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert metrics == pytest.approx(
        {"accuracy": 60.0, "precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3, "yes_ratio": 60.0}
    )
    # Never "yes": precision and F1 are undefined, reported as 0.
    assert pope_metrics(["No", "No"], ["yes", "no"]) == pytest.approx(
        {"accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    )
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["yes"], ["maybe"])


def test_mme_reading_and_scores_by_hand():
    assert [mme_yes_no(answer) for answer in ("Yes.", "no", "Yes, it is", "Not sure", "maybe")] == [
        "yes", "no", "yes", "no", "other"
    ]
    records = [
        ("existence", "a.jpg", "Yes", "Yes"), ("existence", "a.jpg", "No", "No"),  # both right
        ("existence", "b.jpg", "Yes", "Yes"), ("existence", "b.jpg", "Yes", "No"),  # one right
        ("count", "c.jpg", "maybe", "Yes"), ("count", "c.jpg", "No", "No"),  # one right ("maybe" is neither)
        ("code_reasoning", "d.png", "No", "Yes"), ("code_reasoning", "d.png", "Yes", "No"),  # none right
    ]
    scores = mme_scores(records)
    assert scores["subtasks"]["existence"] == pytest.approx({"acc": 75.0, "acc_plus": 50.0, "score": 125.0})
    assert scores["subtasks"]["count"] == pytest.approx({"acc": 50.0, "acc_plus": 0.0, "score": 50.0})
    assert scores["subtasks"]["code_reasoning"] == pytest.approx({"acc": 0.0, "acc_plus": 0.0, "score": 0.0})
    assert scores["perception"] == pytest.approx(175.0)
    assert scores["cognition"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic files in each benchmark's official format

QUESTIONS = ("What color is the car?", "How many dogs are there?", "Is it sunny?", "What is written on the sign?",
             "Where is the cat?")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_images(folder: Path, names: list[str]) -> Path:
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(index, size=(30 + 3 * index, 40)).save(folder / name)
    return folder


def vqav2_files(root: Path) -> dict:
    images = [f"COCO_test2015_{i:012d}.jpg" for i in range(5)]
    questions = write_jsonl(root / "llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 1000 + i, "image": images[i], "text": f"{q}\n{LLAVA_SHORT_ANSWER}", "category": "default"}
        for i, q in enumerate(QUESTIONS)
    ])
    annotations = root / "v2_mscoco_val2014_annotations.json"
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": 1000 + i, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                              for j, a in enumerate(["red"] * (i + 1) + ["blue"] * (9 - i))]}
        for i in range(5)
    ]}))
    return {"questions": questions, "images": write_images(root / "test2015", images), "answers": annotations}


def gqa_files(root: Path) -> dict:
    images = [f"n{i}.jpg" for i in range(5)]
    questions = write_jsonl(root / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": f"20{i}", "image": images[i], "text": f"{q}\n{LLAVA_SHORT_ANSWER}"}
        for i, q in enumerate(QUESTIONS)
    ])
    truth = root / "testdev_balanced_questions.json"
    truth.write_text(json.dumps({f"20{i}": {"question": q, "answer": ["yes", "no"][i % 2], "imageId": f"n{i}"}
                                 for i, q in enumerate(QUESTIONS)}))
    return {"questions": questions, "images": write_images(root / "images", images), "answers": truth}


def textvqa_files(root: Path) -> dict:
    image_ids = [f"{i:016x}" for i in range(3)]
    questions = write_jsonl(root / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602 + i, "image": f"{image_ids[i % 3]}.jpg",
         "text": f"{q}\nReference OCR token: STOP, 12\n{LLAVA_SHORT_ANSWER}"}
        for i, q in enumerate(QUESTIONS)
    ])
    annotations = root / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"data": [
        {"question_id": 34602 + i, "image_id": image_ids[i % 3], "question": q.lower(), "answers": ["stop"] * 10}
        for i, q in enumerate(QUESTIONS)
    ]}))
    images = write_images(root / "train_images", [f"{image_id}.jpg" for image_id in image_ids])
    return {"questions": questions, "images": images, "answers": annotations}


def scienceqa_files(root: Path) -> dict:
    records, problems = [], {}
    for i, q in enumerate(QUESTIONS):
        choices = ["red", "blue", "green"][: 2 + i % 2]
        text = f"Context: none\n{q}\nOptions: " + " ".join(f"({'ABC'[j]}) {c}" for j, c in enumerate(choices))
        text += "\nAnswer with the option's letter from the given choices directly."
        conversations = [{"from": "human", "value": text}, {"from": "gpt", "value": "A"}]
        record = {"id": str(100 + i), "conversations": conversations}
        if i % 2 == 0:  # ScienceQA mixes questions with and without an image
            record["image"] = f"{100 + i}/image.png"
            record["conversations"][0]["value"] = "<image>\n" + text
        records.append(record)
        problems[str(100 + i)] = {"question": q, "choices": choices, "answer": i % len(choices)}
    questions = root / "llava_test_CQM-A.json"
    questions.write_text(json.dumps(records))
    (root / "problems.json").write_text(json.dumps(problems))
    images = write_images(root / "images" / "test", [r["image"] for r in records if "image" in r])
    return {"questions": questions, "images": images, "answers": root}


def pope_files(root: Path) -> dict:
    categories = ("adversarial", "popular", "random")
    records, labels = [], {category: [] for category in categories}
    for i in range(6):
        category = categories[i % 3]
        text = f"Is there a {['dog', 'cat', 'car'][i % 3]} in the image?"
        records.append({"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg",
                        "text": f"{text}\n{LLAVA_SHORT_ANSWER}", "category": category})
        labels[category].append({"question_id": len(labels[category]) + 1, "image": records[-1]["image"],
                                 "text": text, "label": ["yes", "no"][i // 3]})
    questions = write_jsonl(root / "llava_pope_test.jsonl", records)
    (root / "coco").mkdir()
    for category, entries in labels.items():
        write_jsonl(root / "coco" / f"coco_pope_{category}.json", entries)
    images = write_images(root / "val2014", [r["image"] for r in records])
    return {"questions": questions, "images": images, "answers": root / "coco"}


def mme_files(root: Path) -> dict:
    release = root / "MME_Benchmark_release_version"
    records = []
    layouts = {"existence": ("000000006040.jpg", True), "code_reasoning": ("0020.png", False)}
    for subtask, (image, has_subfolders) in layouts.items():
        image_dir = release / subtask / "images" if has_subfolders else release / subtask
        qa_dir = release / subtask / "questions_answers_YN" if has_subfolders else release / subtask
        write_images(image_dir, [image])
        qa_dir.mkdir(parents=True, exist_ok=True)
        pairs = [("Is there a train in this image? Please answer yes or no.", "Yes"),
                 ("Is there a bed in this image? Please answer yes or no.", "No")]
        (qa_dir / (Path(image).stem + ".txt")).write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
        for question, _ in pairs:
            image_path = f"{subtask}/images/{image}" if has_subfolders else f"{subtask}/{image}"
            records.append({"question_id": f"{subtask}/{image}", "image": image_path,
                            "text": f"{question}\n{LLAVA_SHORT_ANSWER}", "category": subtask})
    questions = write_jsonl(root / "llava_mme.jsonl", records)
    return {"questions": questions, "images": release, "answers": release}


FORMATS = {"vqav2": vqav2_files, "gqa": gqa_files, "textvqa": textvqa_files, "scienceqa": scienceqa_files,
           "pope": pope_files, "mme": mme_files}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_visualrwkv(tmp_path_factory.mktemp("tiny-visualrwkv"))


def run_eval(model_dir, benchmark, files, output, *extra) -> int:
    argv = ["eval", "--model", str(model_dir), "--benchmark", benchmark, "--questions", str(files["questions"]),
            "--images", str(files["images"]), "--output", str(output), "--max-new-tokens", "3", "--no-progress",
            *extra]
    if files.get("answers") is not None:
        argv += ["--answers", str(files["answers"])]
    return main(argv)


def answer_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("benchmark", list(FORMATS))
def test_ground_truth_from_the_official_files(benchmark, tmp_path):
    """Every question finds its answer in the official annotation file, and it is the one written there."""
    files = FORMATS[benchmark](tmp_path)
    questions = load_questions(files["questions"])
    truth = load_ground_truth(benchmark, questions, files["answers"])
    assert set(truth) == {question.key for question in questions}
    first = truth[questions[0].key]
    expected = {"vqav2": ["red"] + ["blue"] * 9, "gqa": "yes", "textvqa": ["stop"] * 10,
                "scienceqa": {"answer": 0, "choices": 2}, "pope": "yes", "mme": "yes"}[benchmark]
    assert first == expected


@pytest.mark.parametrize("benchmark", list(FORMATS))
def test_eval_command_answers_and_scores_each_format(benchmark, model_dir, tmp_path, capsys):
    files = FORMATS[benchmark](tmp_path)
    output = tmp_path / "answers" / "run.jsonl"
    assert run_eval(model_dir, benchmark, files, output, "--batch-size", "3") == 0
    printed = capsys.readouterr().out

    questions = load_questions(files["questions"])
    lines = answer_lines(output)
    assert [(line["question_id"], line["prompt"]) for line in lines] == [(q.question_id, q.text) for q in questions]
    assert all(isinstance(line["text"], str) and line["model_id"] == model_dir.name for line in lines)

    # The scores file and the printed table are the scorer's on the written answers.
    truth = load_ground_truth(benchmark, questions, files["answers"])
    expected = score_answers(benchmark, questions, read_answers(output, questions), truth)
    assert json.loads(scores_path(output).read_text()) == json.loads(json.dumps(expected))
    assert format_scores(expected) in printed
    assert expected["questions"] == len(questions)


def test_batched_answers_equal_one_at_a_time(model_dir, tmp_path):
    # ScienceQA mixes questions with and without an image in one batch; the prompts differ in length.
    files = scienceqa_files(tmp_path)
    assert run_eval(model_dir, "scienceqa", files, tmp_path / "one.jsonl", "--batch-size", "1") == 0
    assert run_eval(model_dir, "scienceqa", files, tmp_path / "all.jsonl", "--batch-size", "5") == 0
    one, batched = answer_lines(tmp_path / "one.jsonl"), answer_lines(tmp_path / "all.jsonl")
    assert batched == one
    assert len({line["text"] for line in one}) > 1  # the random model's answers do depend on the question


def test_interrupted_run_resumes_to_the_same_file(model_dir, tmp_path, capsys):
    files = vqav2_files(tmp_path)
    full = tmp_path / "full.jsonl"
    assert run_eval(model_dir, "vqav2", files, full, "--batch-size", "2") == 0

    # An interrupted run: the first two answers written, the third cut off mid-line.
    output = tmp_path / "resumed.jsonl"
    complete = full.read_text().splitlines(keepends=True)
    output.write_text("".join(complete[:2]) + complete[2][:25])
    capsys.readouterr()
    assert run_eval(model_dir, "vqav2", files, output, "--batch-size", "2") == 0
    assert "(3 new, 2 from an earlier run)" in capsys.readouterr().out  # the cut answer is given again
    assert output.read_bytes() == full.read_bytes()
    assert scores_path(output).read_text() == scores_path(full).read_text()


def test_resume_answers_only_the_questions_left(model_dir, tmp_path, capsys):
    files = gqa_files(tmp_path)
    lines = files["questions"].read_text().splitlines(keepends=True)
    first = dict(files, questions=tmp_path / "first.jsonl")
    first["questions"].write_text("".join(lines[:2]))
    output = tmp_path / "run.jsonl"
    assert run_eval(model_dir, "gqa", first, output) == 0
    before = output.read_text()
    capsys.readouterr()

    assert run_eval(model_dir, "gqa", files, output) == 0
    assert "(3 new, 2 from an earlier run)" in capsys.readouterr().out
    assert output.read_text().startswith(before)
    assert len(answer_lines(output)) == 5

    # A finished run does nothing more.
    assert run_eval(model_dir, "gqa", files, output) == 0
    assert "(0 new, 5 from an earlier run)" in capsys.readouterr().out
    assert len(answer_lines(output)) == 5


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_malformed_question_line_names_its_number(model_dir, tmp_path, capsys):
    files = gqa_files(tmp_path)
    lines = files["questions"].read_text().splitlines(keepends=True)
    files["questions"].write_text("".join(lines[:2]) + '{"question_id": "x", "text": \n' + "".join(lines[2:]))
    output = tmp_path / "run.jsonl"
    assert run_eval(model_dir, "gqa", files, output) == 1
    error = capsys.readouterr().err
    assert "line 3 is not valid JSON" in error and "one question object a line" in error
    assert not output.exists()  # nothing written


def test_missing_image_is_refused_before_generation(model_dir, tmp_path, capsys):
    files = pope_files(tmp_path)
    (files["images"] / "COCO_val2014_000000000004.jpg").unlink()
    output = tmp_path / "run.jsonl"
    assert run_eval(model_dir, "pope", files, output) == 1
    error = capsys.readouterr().err
    assert "1 of 6 question images are missing" in error and "COCO_val2014_000000000004.jpg" in error
    assert "line 5" in error
    assert not output.exists()


def test_unknown_benchmark(model_dir, tmp_path, capsys):
    files = gqa_files(tmp_path)
    with pytest.raises(SystemExit):
        run_eval(model_dir, "mmbench", files, tmp_path / "run.jsonl")
    assert "invalid choice: 'mmbench'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown benchmark 'mmbench'; expected one of vqav2, gqa"):
        load_ground_truth("mmbench", load_questions(files["questions"]), None)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "a.jpg", "text": "Q?"}', "no 'question_id'"),
        ('{"question_id": 1, "image": "a.jpg"}', "no 'text'"),
        ('{"question_id": 1, "text": "<image>\\nQ?"}', "holds '<image>' but the question has no 'image'"),
        ('[1, 2]', "expected a JSON object"),
        ('{"question_id": 1, "text": "Q?"}\n{"question_id": 1, "text": "Q?"}', "line 2 repeats the question of line 1"),
    ],
)
def test_bad_question_lines(line, message, tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_questions(path)


def test_answers_of_another_run_are_refused(model_dir, tmp_path, capsys):
    files = gqa_files(tmp_path)
    output = write_jsonl(tmp_path / "run.jsonl", [{"question_id": "other", "prompt": "?", "text": "yes"}])
    assert run_eval(model_dir, "gqa", files, output) == 1
    assert "line 1 answers a question that is not in the question file" in capsys.readouterr().err


def test_annotation_file_of_another_split_is_refused(model_dir, tmp_path, capsys):
    files = vqav2_files(tmp_path)
    files["answers"].write_text(json.dumps({"annotations": []}))
    assert run_eval(model_dir, "vqav2", files, tmp_path / "run.jsonl") == 1
    assert "has no answer for question 1000 (question file line 1)" in capsys.readouterr().err


def test_without_ground_truth_answers_are_written_unscored(model_dir, tmp_path, capsys):
    files = dict(vqav2_files(tmp_path), answers=None)
    output = tmp_path / "run.jsonl"
    assert run_eval(model_dir, "vqav2", files, output) == 0
    assert "not scored" in capsys.readouterr().out
    assert len(answer_lines(output)) == 5 and not scores_path(output).exists()


def perfect_answer(benchmark: str, truth) -> str:
    """An answer the benchmark's ground truth counts right (VQA: the first human answer)."""
    if benchmark == "scienceqa":
        return "ABCDE"[truth["answer"]]
    return truth[0] if isinstance(truth, list) else truth


@pytest.mark.parametrize(
    "benchmark, expected",
    [
        # Question i has i + 1 of 10 humans saying "red": VQA accuracy 0.3, 0.6, 0.9, 1, 1 -> mean 76%.
        ("vqav2", {"accuracy": 76.0}),
        ("textvqa", {"accuracy": 100.0}),
        ("gqa", {"accuracy": 100.0}),
        ("scienceqa", {"accuracy": 100.0, "image_accuracy": 100.0, "image_questions": 3}),
        ("pope", {"accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0}),
        ("mme", {"perception": 200.0, "cognition": 200.0}),
    ],
)
def test_a_finished_answers_file_is_scored_without_generating(benchmark, expected, model_dir, tmp_path, capsys):
    """Answers equal to the ground truth, written as a finished run: the rerun only scores them, with the numbers
    worked out by hand from the synthetic annotations (the ground truth is matched to the right questions)."""
    files = FORMATS[benchmark](tmp_path)
    questions = load_questions(files["questions"])
    truth = load_ground_truth(benchmark, questions, files["answers"])
    output = write_jsonl(tmp_path / "run.jsonl", [
        {"question_id": q.question_id, "prompt": q.text, "text": perfect_answer(benchmark, truth[q.key]),
         "model_id": "m"} for q in questions
    ])
    if benchmark == "vqav2":  # written as a model might: normalised to "red"
        output = write_jsonl(output, [{**line, "text": "Red."} for line in answer_lines(output)])
    assert run_eval(model_dir, benchmark, files, output) == 0
    assert f"(0 new, {len(questions)} from an earlier run)" in capsys.readouterr().out
    scores = json.loads(scores_path(output).read_text())
    assert {key: scores[key] for key in expected} == pytest.approx(expected)


def test_annotations_in_another_format_are_refused_before_generation(model_dir, tmp_path, capsys):
    files = textvqa_files(tmp_path)
    files["answers"].write_text(json.dumps({"data": [{"question": "what?"}]}))  # no image_id, no answers
    output = tmp_path / "run.jsonl"
    assert run_eval(model_dir, "textvqa", files, output) == 1
    error = capsys.readouterr().err
    assert "is not in textvqa's annotation format" in error and "docs/evaluation.md" in error
    assert not output.exists()


def test_pope_labels_must_be_yes_or_no(tmp_path):
    files = pope_files(tmp_path)
    label_file = files["answers"] / "coco_pope_random.json"
    label_file.write_text(label_file.read_text().replace('"label": "no"', '"label": "maybe"'))
    with pytest.raises(ValueError, match="POPE label must be 'yes' or 'no', got 'maybe'"):
        load_ground_truth("pope", load_questions(files["questions"]), files["answers"])


def test_a_folder_without_a_model_is_refused(tmp_path, capsys):
    files = gqa_files(tmp_path)
    assert run_eval(tmp_path / "nothing", "gqa", files, tmp_path / "run.jsonl") == 1
    assert "is not a model folder (no config.json)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must be positive"):
        run_evaluation(tmp_path, "gqa", files["questions"], files["images"], tmp_path / "run.jsonl", batch_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# lm-eval-harness's `hf-multimodal` model on a converted folder


LM_EVAL_TASK = """task: visualrwkv_tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_image: !function utils.doc_to_image
doc_to_text: "<image>{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_hf_multimodal_answers_as_the_pipeline_does(model_dir, tmp_path, monkeypatch):
    """A local lm-eval task (YAML, JSONL questions and PNG images written here; nothing downloaded) run by lm-eval's own
    `hf-multimodal` model on the folder, with the chat template: each answer is the pipeline's for the same chat, and
    the score is lm-eval's exact match against targets of which one is that answer."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval-harness comes with the `eval` extra")
    from lm_eval.tasks import TaskManager
    from PIL import Image
    from transformers import pipeline

    from test_pipeline import chat, chat_answer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = pipeline("image-text-to-text", model=str(model_dir))
    questions = ["What color?", "Describe the picture.", "How many?"]
    docs = []
    for index, question in enumerate(questions):
        image_path = tmp_path / f"image{index}.png"
        random_image(index).save(image_path)
        answer = chat_answer(pipe(text=chat(Image.open(image_path), question), max_new_tokens=8, do_sample=False))
        docs.append({"image": str(image_path), "question": question, "pipeline": answer})
    for doc in docs:  # only the first question's target is the model's answer
        doc["answer"] = doc["pipeline"] if doc is docs[0] else "red"
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    write_jsonl(task_dir / "questions.jsonl", docs)
    (task_dir / "utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_image(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n"
    )
    (task_dir / "tiny_vqa.yaml").write_text(LM_EVAL_TASK.format(data=task_dir / "questions.jsonl"))

    results = lm_eval.simple_evaluate(
        model="hf-multimodal",
        model_args={"pretrained": str(model_dir)},
        tasks=["visualrwkv_tiny_vqa"],
        task_manager=TaskManager(include_path=str(task_dir)),
        apply_chat_template=True,
        batch_size=2,
        device="cpu",
        log_samples=True,
    )
    samples = sorted(results["samples"]["visualrwkv_tiny_vqa"], key=lambda sample: sample["doc_id"])
    assert [sample["filtered_resps"][0] for sample in samples] == [doc["pipeline"] for doc in docs]
    assert samples[0]["arguments"][0][0] == pipe.processor.apply_chat_template(
        chat(None, questions[0]), add_generation_prompt=True
    )
    assert results["results"]["visualrwkv_tiny_vqa"]["exact_match,none"] == pytest.approx(1 / 3)
    # lm-eval's results table (pytablewriter: an old release, which a python-dateutil pin can pull in, loses its header)
    header = lm_eval.utils.make_table(results).splitlines()[0]
    assert [cell.strip() for cell in header.split("|")[1:4]] == ["Tasks", "Version", "Filter"]
