"""`visualrwkv eval`: a converted VisualRWKV on the LLaVA-1.5 evaluation files, answered and scored in one command.

The question files are the ones the official VisualRWKV evaluation scripts read (LLaVA-1.5's): JSONL lines with
`question_id`, `image` (relative to the images folder) and `text` (the question with LLaVA's answer-format suffix
already in it, e.g. `"Answer the question using a single word or phrase."`), or, for ScienceQA, a JSON list of
LLaVA conversations (`id`, optional `image`, `conversations[0]["value"]`). Like the official `evaluate.py`, the
question text goes to the model unchanged as one user turn with the image, formatted by the processor's chat
template (so the sandwich prompt copies the question without the suffix), and the answer is the greedy generation up
to the turn end `"\\n\\n"`, stripped. Unlike it, questions are answered in left-padded batches with the recurrent
cache (the original re-runs the whole sequence for every new token, one question at a time).

Answers go to a JSONL file, one whole line per question (`question_id`, `prompt`, `text`, `model_id`, LLaVA's
answer-file fields, so LLaVA's own converters read it too), flushed batch by batch. A rerun skips the questions
already answered (a question is its `question_id` and its text: MME gives both questions about an image the same
id) and drops a last line cut off by an interruption. At the end the answers are scored against the ground truth
(the official annotation files, or fields in the question lines) and the scores are printed as a table and written
next to the answers as JSON.

The scorers are pure functions, written from the benchmarks' definitions:

* VQAv2, TextVQA: VQA accuracy. Prediction and each of the 10 human answers are normalised as the VQA evaluation
  (EvalAI) does: lower case, commas and question marks dropped, `'s` split off, punctuation removed or turned into a
  space, periods not followed by a digit removed, number words to digits, articles dropped, apostrophe-less
  contractions restored. A prediction scores the mean over the 10 ways to leave one human answer out of
  `min(1, matching remaining answers / 3)`.
* GQA: exact match of the prediction (lower case, trailing period dropped) with the answer.
* ScienceQA: the option letter read from the answer (the letter alone, `"B. ..."` or `"The answer is B"`), right
  when it is the correct choice's; accuracy overall and on the questions with an image (ScienceQA-IMG).
* POPE: the first sentence is "no" when it holds the word `no`, `No` or `not`, else "yes"; accuracy, precision,
  recall and F1 of "yes", and the share of "yes" answers, per category (adversarial, popular, random) and their mean.
* MME: "yes" or "no" when the answer is one of them or its first four characters hold one (else neither); per
  subtask the accuracy over questions and acc+ over images (both questions right), in percent, score = acc + acc+;
  perception and cognition are the sums of their subtasks' scores.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = ("vqav2", "gqa", "scienceqa", "textvqa", "pope", "mme")
LLAVA_SHORT_ANSWER = "Answer the question using a single word or phrase."
IMAGE_MARKER = "<image>"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 128  # the official evaluate.py's

# ---------------------------------------------------------------------------------------------------------------------
# Answer normalisation of the VQA evaluation

_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Contractions the VQA evaluation restores when written without their apostrophes ("dont" -> "don't"). Forms whose
# apostrophe-less spelling is a word of its own ("its", "well", "were", "ill", "shed", ...) are left out.
_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm", "i've",
    "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she'll", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's",
    "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
    "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're",
    "they've", "'twas", "wasn't", "we'd've", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've",
    "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who're", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've", "you'd",
    "you'd've", "you'll", "you're", "you've",
)


def _apostrophe_less_spellings(word: str) -> list[str]:
    """Every spelling of `word` with at least one of its apostrophes left out ("couldn't've" -> "couldntve",
    "couldnt've", "couldn'tve")."""
    pieces = word.split("'")
    spellings = []
    for kept in itertools.product(("'", ""), repeat=len(pieces) - 1):
        if all(kept):
            continue
        spellings.append(pieces[0] + "".join(glue + piece for glue, piece in zip(kept, pieces[1:])))
    return spellings


_CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _apostrophe_less_spellings(word)}


def _strip_punctuation(text: str) -> str:
    # A mark next to a space (or any mark in a text holding a digit-comma-digit number) is removed, otherwise it
    # separates words; a period goes unless a digit follows it (a decimal point).
    # Whether a mark is next to a space is read from the text as given, not as earlier marks left it.
    remove_all = re.search(r"\d,\d", text) is not None
    stripped = text
    for mark in _PUNCTUATION:
        if remove_all or mark + " " in text or " " + mark in text:
            stripped = stripped.replace(mark, "")
        else:
            stripped = stripped.replace(mark, " ")
    return re.sub(r"\.(?!\d)", "", stripped)


def normalize_vqa_answer(answer: str) -> str:
    """An answer normalised as the VQA evaluation does (see the module docstring): `"Two dogs."` -> `"2 dogs"`."""
    text = " ".join(answer.split()).lower().replace(",", "").replace("?", "").replace("'s", " 's")
    words = []
    for word in _strip_punctuation(text).split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """VQA accuracy of one prediction: over the ways to leave one human answer out, the mean of
    `min(1, matches among the others / 3)`, answers normalised by `normalize_vqa_answer`."""
    if not human_answers:
        raise ValueError("VQA accuracy needs the human answers; got none.")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in human_answers]
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


# ---------------------------------------------------------------------------------------------------------------------
# GQA, ScienceQA, POPE, MME


def normalize_gqa_answer(answer: str) -> str:
    """GQA's comparison form: stripped, lower case, without a trailing period."""
    return answer.strip().rstrip(".").strip().lower()


def gqa_exact_match(prediction: str, answer: str) -> bool:
    return normalize_gqa_answer(prediction) == normalize_gqa_answer(answer)


OPTION_LETTERS = "ABCDE"


def scienceqa_choice(prediction: str, num_choices: int) -> int | None:
    """The chosen option's index read from an answer: the letter alone, a letter followed by `". "`, or
    `"The answer is X"`; None when no letter of the `num_choices` options is found."""
    text = prediction.replace("\n", ". ").strip()
    letters = OPTION_LETTERS[:num_choices]
    match = re.fullmatch(r"([A-E])", text) or re.match(r"([A-E])\. ", text) or re.search(r"The answer is ([A-E])", text)
    if match and match.group(1) in letters:
        return letters.index(match.group(1))
    return None


def pope_yes_no(prediction: str) -> str:
    """"no" when the answer's first sentence holds the word `no`, `No` or `not`, else "yes"."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """POPE's binary metrics, "yes" positive, in percent: accuracy, precision, recall, F1 and the share of "yes"
    answers. `predictions` are answers (read by `pope_yes_no`), `labels` "yes" or "no". An undefined ratio (no
    "yes" predicted, or no "yes" label) is 0."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(
            f"POPE needs one label per prediction; got {len(predictions)} predictions, {len(labels)} labels."
        )
    said_yes = [pope_yes_no(prediction) == "yes" for prediction in predictions]
    is_yes = [check_yes_no(label, "POPE label") == "yes" for label in labels]
    true_positive = sum(p and t for p, t in zip(said_yes, is_yes))
    true_negative = sum(not p and not t for p, t in zip(said_yes, is_yes))
    precision = true_positive / sum(said_yes) if any(said_yes) else 0.0
    recall = true_positive / sum(is_yes) if any(is_yes) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100 * (true_positive + true_negative) / len(labels),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": 100 * sum(said_yes) / len(said_yes),
    }


def check_yes_no(label: str, what: str) -> str:
    label = str(label).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"A {what} must be 'yes' or 'no', got {label!r}.")
    return label


def mme_yes_no(prediction: str) -> str:
    """"yes", "no" or "other" as MME's calculation reads an answer: the whole answer (lower case, periods dropped)
    when it is yes or no, else whichever of them its first four characters hold."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(records: list[tuple[str, str, str, str]]) -> dict[str, Any]:
    """MME scores from (subtask, image, prediction, answer) records: per subtask `acc` (percent of questions right),
    `acc_plus` (percent of images with every question right) and `score` = acc + acc_plus; `perception` and
    `cognition` sum the scores of the subtasks of each kind that are present."""
    by_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for subtask, image, prediction, answer in records:
        by_image[subtask][image].append(mme_yes_no(prediction) == check_yes_no(answer, "MME answer"))
    subtasks = {}
    for subtask, images in by_image.items():
        results = [right for answers in images.values() for right in answers]
        acc = 100 * sum(results) / len(results)
        acc_plus = 100 * sum(all(answers) for answers in images.values()) / len(images)
        subtasks[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "perception": sum(subtasks[name]["score"] for name in MME_PERCEPTION if name in subtasks),
        "cognition": sum(subtasks[name]["score"] for name in MME_COGNITION if name in subtasks),
        "subtasks": subtasks,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Question files


@dataclass(frozen=True)
class Question:
    """One evaluation question as read from its file."""

    question_id: Any
    text: str  # as in the file, LLaVA's suffix (and a "<image>" marker, if any) included
    image: str | None  # path relative to the images folder
    line: int  # 1-based line (JSONL) or item (JSON list) number, for messages
    record: dict

    @property
    def key(self) -> str:
        """What identifies the question in the answers file: its id and its text."""
        return json.dumps([self.question_id, self.text])

    @property
    def category(self) -> str | None:
        return self.record.get("category")


def _parse_question(record: Any, where: str, line: int) -> Question:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object (a question), got {type(record).__name__}.")
    question_id = next((record[key] for key in ("question_id", "id") if key in record), None)
    if question_id is None:
        raise ValueError(f"{where}: the question has no 'question_id' (or 'id').")
    if "text" in record:
        text = record["text"]
    elif record.get("conversations"):  # LLaVA conversation format (ScienceQA's llava_test_CQM-A.json)
        text = record["conversations"][0].get("value") if isinstance(record["conversations"][0], dict) else None
    else:
        raise ValueError(f"{where}: the question has no 'text' (nor LLaVA 'conversations').")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: the question text must be a non-empty string, got {text!r}.")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a file name, got {image!r}.")
    if IMAGE_MARKER in text and image is None:
        raise ValueError(f"{where}: the question text holds {IMAGE_MARKER!r} but the question has no 'image'.")
    return Question(question_id, text, image, line, record)


def load_questions(path: str | os.PathLike) -> list[Question]:
    """The questions of a LLaVA evaluation file: JSONL (one question a line) or a JSON list. Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Question file not found: {path}")
    content = path.read_text(encoding="utf-8")
    questions = []
    if path.suffix == ".json":
        try:
            records = json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}).") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of questions (or use a .jsonl file, one a line).")
        questions = [_parse_question(record, f"{path} item {i}", i) for i, record in enumerate(records, 1)]
    else:
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path} line {number} is not valid JSON ({error.msg}); expected one question object a line."
                ) from None
            questions.append(_parse_question(record, f"{path} line {number}", number))
    if not questions:
        raise ValueError(f"{path} holds no questions.")
    seen = {}
    for question in questions:
        if question.key in seen:
            raise ValueError(
                f"{path}: line {question.line} repeats the question of line {seen[question.key]} (same id "
                f"{question.question_id!r} and text); each question must be unique."
            )
        seen[question.key] = question.line
    return questions


# ---------------------------------------------------------------------------------------------------------------------
# Ground truth: the official annotation files, or fields in the question lines


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}).") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number} is not valid JSON ({error.msg}).") from None
    return records


def _strip_suffix(text: str) -> str:
    return text.replace(IMAGE_MARKER, "").replace(LLAVA_SHORT_ANSWER, "").strip()


INLINE_FIELDS = {"vqav2": "answers", "textvqa": "answers", "gqa": "answer", "scienceqa": "answer", "pope": "label",
                 "mme": "answer"}


def load_ground_truth(benchmark: str, questions: list[Question], answers: str | os.PathLike | None) -> dict | None:
    """Each question's ground truth by `Question.key` (the form each scorer takes), from `answers` (the official
    file or folder, see docs/evaluation.md) or, without it, from the question lines' own field (`answers`, `answer`
    or `label`, see `INLINE_FIELDS`). None when neither is there: the answers are written but not scored."""
    check_benchmark(benchmark)
    if answers is None:
        field = INLINE_FIELDS[benchmark]
        if not all(field in question.record for question in questions):
            return None
        truth = {question.key: question.record[field] for question in questions}
        if benchmark in ("pope", "mme"):
            truth = {key: check_yes_no(label, f"{benchmark} {field}") for key, label in truth.items()}
        if benchmark == "scienceqa":  # inline ScienceQA answers are option letters
            for question in questions:
                letter = question.record[field]
                if not isinstance(letter, str) or letter not in OPTION_LETTERS or len(letter) != 1:
                    raise ValueError(
                        f"Question {question.question_id!r} (line {question.line}): a ScienceQA 'answer' must be an "
                        f"option letter {', '.join(OPTION_LETTERS)}, got {letter!r}."
                    )
                truth[question.key] = {"answer": OPTION_LETTERS.index(letter), "choices": None}
        return truth
    path = Path(answers)
    if not path.exists():
        raise FileNotFoundError(f"Answers not found: {path}")
    loader = {"vqav2": _vqa_truth, "textvqa": _textvqa_truth, "gqa": _gqa_truth, "scienceqa": _scienceqa_truth,
              "pope": _pope_truth, "mme": _mme_truth}[benchmark]
    try:
        return loader(questions, path)
    except (KeyError, TypeError, AttributeError) as error:  # an entry without the field a format has
        raise ValueError(
            f"{path} is not in {benchmark}'s annotation format ({type(error).__name__}: {error}); see "
            "docs/evaluation.md for the files --answers takes."
        ) from None


def _missing(path: Path, question: Question) -> ValueError:
    return ValueError(
        f"{path} has no answer for question {question.question_id!r} (question file line {question.line}): is it "
        "the annotation file of the same split?"
    )


def _vqa_truth(questions: list[Question], path: Path) -> dict:
    """VQAv2's annotation JSON (`{"annotations": [{"question_id", "answers": [{"answer"}, ...]}]}`)."""
    data = _read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: expected VQAv2's annotation JSON, an object with 'annotations'.")
    by_id = {str(a["question_id"]): [answer["answer"] for answer in a["answers"]] for a in data["annotations"]}
    truth = {}
    for question in questions:
        if str(question.question_id) not in by_id:
            raise _missing(path, question)
        truth[question.key] = by_id[str(question.question_id)]
    return truth


def _textvqa_truth(questions: list[Question], path: Path) -> dict:
    """TextVQA's annotation JSON (`{"data": [{"image_id", "question", "answers"}]}`), matched as LLaVA matches it:
    by image id and the question (the text's first line) in lower case."""
    data = _read_json(path)
    if not isinstance(data, dict) or "data" not in data:
        raise ValueError(f"{path}: expected TextVQA's annotation JSON, an object with 'data'.")
    by_question = {(a["image_id"], a["question"].strip().lower()): a["answers"] for a in data["data"]}
    truth = {}
    for question in questions:
        image_id = Path(question.image or "").stem
        asked = _strip_suffix(question.text).split("\n")[0].strip().lower()
        if (image_id, asked) not in by_question:
            raise _missing(path, question)
        truth[question.key] = by_question[image_id, asked]
    return truth


def _gqa_truth(questions: list[Question], path: Path) -> dict:
    """GQA's questions JSON (`{question_id: {"answer", ...}}`, e.g. testdev_balanced_questions.json)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected GQA's questions JSON, an object keyed by question id.")
    truth = {}
    for question in questions:
        entry = data.get(str(question.question_id))
        if not isinstance(entry, dict) or "answer" not in entry:
            raise _missing(path, question)
        truth[question.key] = entry["answer"]
    return truth


def _scienceqa_truth(questions: list[Question], path: Path) -> dict:
    """ScienceQA's problems.json (`{id: {"answer": index, "choices": [...]}}`) or the folder holding it."""
    data = _read_json(path / "problems.json" if path.is_dir() else path)
    truth = {}
    for question in questions:
        entry = data.get(str(question.question_id)) if isinstance(data, dict) else None
        if not isinstance(entry, dict) or "answer" not in entry:
            raise _missing(path, question)
        truth[question.key] = {"answer": entry["answer"], "choices": len(entry.get("choices", OPTION_LETTERS))}
    return truth


def _pope_truth(questions: list[Question], path: Path) -> dict:
    """POPE's label files `coco_pope_<category>.json` (JSONL, `label` yes/no) in a folder, or one such file; the
    n-th question of a category takes the n-th label (as LLaVA's eval_pope pairs them), its question checked."""
    files = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no coco_pope_<category>.json label files.")
    labels = {file.stem.removeprefix("coco_pope_"): _read_jsonl(file) for file in files}
    if not path.is_dir():  # one file: every question takes its labels, whatever its category
        labels = {None: next(iter(labels.values()))}
    by_category: dict[Any, list[Question]] = defaultdict(list)
    for question in questions:
        by_category[question.category if path.is_dir() else None].append(question)
    truth = {}
    for category, members in by_category.items():
        if category not in labels:
            raise ValueError(f"{path} has no labels for POPE category {category!r} (coco_pope_{category}.json).")
        if len(labels[category]) != len(members):
            raise ValueError(
                f"{path}: {len(labels[category])} labels for category {category!r} but {len(members)} questions."
            )
        for question, label in zip(members, labels[category]):
            if "text" in label and _strip_suffix(label["text"]) != _strip_suffix(question.text):
                raise ValueError(
                    f"{path}: label for {label['text']!r} does not match question {question.question_id!r} "
                    f"({question.text!r}, question file line {question.line}); the files are not of the same split."
                )
            truth[question.key] = check_yes_no(label["label"], "POPE label")
    return truth


def _mme_truth(questions: list[Question], path: Path) -> dict:
    """MME's release folder (`MME_Benchmark_release_version`): per subtask folder, `<image>.txt` files of
    "question<TAB>answer" lines (in the folder or its `questions_answers_YN/`). LLaVA's question ids are
    `<subtask>/<image file>`; the question is the text without LLaVA's suffix, with " Please answer yes or no." as in
    MME's own files."""
    truth = {}
    for question in questions:
        subtask, _, image_file = str(question.question_id).partition("/")
        txt_name = Path(image_file).stem + ".txt"
        candidates = [path / subtask / "questions_answers_YN" / txt_name, path / subtask / txt_name]
        qa_file = next((file for file in candidates if file.is_file()), None)
        if qa_file is None:
            raise ValueError(
                f"{path} has no {subtask}/{txt_name} (nor {subtask}/questions_answers_YN/{txt_name}) for question "
                f"{question.question_id!r} (line {question.line}): give MME's release folder as --answers."
            )
        pairs = dict(line.rstrip("\n").split("\t")[:2] for line in qa_file.read_text(encoding="utf-8").splitlines()
                     if "\t" in line)
        asked = _strip_suffix(question.text)
        for form in (asked, asked + " Please answer yes or no.", asked + "  Please answer yes or no."):
            if form in pairs:
                truth[question.key] = check_yes_no(pairs[form], f"MME answer in {qa_file}")
                break
        else:
            raise ValueError(f"{qa_file} has no line for the question {asked!r} (question file line {question.line}).")
    return truth


def check_benchmark(benchmark: str) -> str:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}.")
    return benchmark


# ---------------------------------------------------------------------------------------------------------------------
# Scoring the written answers


def score_answers(
    benchmark: str, questions: list[Question], predictions: dict[str, str], truth: dict
) -> dict[str, Any]:
    """The benchmark's scores (percent) of `predictions` (answer text by `Question.key`) against `truth`
    (`load_ground_truth`). Questions without a prediction are not counted."""
    check_benchmark(benchmark)
    answered = [question for question in questions if question.key in predictions]
    if not answered:
        raise ValueError("No answered questions to score.")
    scores: dict[str, Any] = {"benchmark": benchmark, "questions": len(answered)}
    if benchmark in ("vqav2", "textvqa"):
        values = [vqa_accuracy(predictions[q.key], truth[q.key]) for q in answered]
        scores["accuracy"] = 100 * sum(values) / len(values)
    elif benchmark == "gqa":
        scores["accuracy"] = 100 * sum(gqa_exact_match(predictions[q.key], truth[q.key]) for q in answered) / len(
            answered
        )
    elif benchmark == "scienceqa":
        right = {}
        for q in answered:
            num_choices = truth[q.key]["choices"] or len(OPTION_LETTERS)
            right[q.key] = scienceqa_choice(predictions[q.key], num_choices) == truth[q.key]["answer"]
        scores["accuracy"] = 100 * sum(right.values()) / len(right)
        with_image = [right[q.key] for q in answered if q.image is not None]
        scores["image_questions"] = len(with_image)
        scores["image_accuracy"] = 100 * sum(with_image) / len(with_image) if with_image else None
    elif benchmark == "pope":
        by_category: dict[str, list[Question]] = defaultdict(list)
        for q in answered:
            by_category[q.category or "all"].append(q)
        categories = {
            category: pope_metrics([predictions[q.key] for q in members], [truth[q.key] for q in members])
            for category, members in sorted(by_category.items())
        }
        scores["categories"] = categories
        for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
            scores[metric] = sum(values[metric] for values in categories.values()) / len(categories)
    else:  # mme
        scores.update(mme_scores([
            (str(q.question_id).partition("/")[0] if q.category is None else q.category, q.image or str(q.question_id),
             predictions[q.key], truth[q.key])
            for q in answered
        ]))
    return scores


def format_scores(scores: dict[str, Any]) -> str:
    """The results table printed at the end of `visualrwkv eval`."""
    lines = [f"{scores['benchmark']}: {scores['questions']} questions"]
    if scores["benchmark"] == "pope":
        metrics = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        lines.append(f"  {'category':<14}" + "".join(f"{metric:>11}" for metric in metrics))
        rows = [*scores["categories"].items(), ("mean", {metric: scores[metric] for metric in metrics})]
        lines += [f"  {name:<14}" + "".join(f"{values[metric]:>11.2f}" for metric in metrics) for name, values in rows]
    elif scores["benchmark"] == "mme":
        lines.append(f"  {'subtask':<24}{'acc':>9}{'acc+':>9}{'score':>9}")
        for kind, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
            present = [name for name in names if name in scores["subtasks"]]
            for name in present:
                values = scores["subtasks"][name]
                lines.append(f"  {name:<24}{values['acc']:>9.2f}{values['acc_plus']:>9.2f}{values['score']:>9.2f}")
            if present:
                lines.append(f"  {kind + ' (sum)':<24}{'':>18}{scores[kind]:>9.2f}")
        others = [name for name in scores["subtasks"] if name not in MME_PERCEPTION + MME_COGNITION]
        for name in others:
            values = scores["subtasks"][name]
            lines.append(f"  {name:<24}{values['acc']:>9.2f}{values['acc_plus']:>9.2f}{values['score']:>9.2f}")
    else:
        lines.append(f"  {'accuracy':<24}{scores['accuracy']:>9.2f}")
        if scores["benchmark"] == "scienceqa" and scores["image_accuracy"] is not None:
            lines.append(f"  {'image accuracy':<24}{scores['image_accuracy']:>9.2f}  ({scores['image_questions']} "
                         "questions with an image)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The answers file


def read_answers(path: Path, questions: list[Question]) -> dict[str, str]:
    """The answers already in `path` by question key; a last line cut off by an interruption (no newline at its
    end) is removed from the file. Lines that are not ours, or answers to questions not in `questions`, are refused:
    the file belongs to another run."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise ValueError(f"--output {path} is not a file.")
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as file:  # drop the half-written last line; the rerun answers its question again
            file.truncate(len(complete))
    known = {question.key for question in questions}
    answers = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            key = json.dumps([record["question_id"], record["prompt"]])
            text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"--output {path} line {number} is not an answer line of `visualrwkv eval` (question_id, prompt, "
                "text); give a new --output file."
            ) from None
        if key not in known:
            raise ValueError(
                f"--output {path} line {number} answers a question that is not in the question file "
                f"({record['question_id']!r}): it holds another run's answers; give a new --output file."
            )
        answers[key] = text
    return answers


def scores_path(output: Path) -> Path:
    """Where the scores go: next to the answers, `<answers stem>.scores.json`."""
    return output.with_name(output.stem + ".scores.json")


# ---------------------------------------------------------------------------------------------------------------------
# The runner


def prompt_inputs(processor, batch: list[Question], images_dir: Path | None):
    """The model inputs of a batch of questions, left-padded: each question one user turn with its image."""
    from .image_loading import load_rgb_image

    conversations, images = [], []
    for question in batch:
        content = [{"type": "text", "text": question.text.replace(IMAGE_MARKER, "").strip()}]
        if question.image is not None:
            content.insert(0, {"type": "image"})
            images.append([load_rgb_image(images_dir / question.image)])
        else:
            images.append([])
        conversations.append([{"role": "user", "content": content}])
    prompts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages in conversations]
    has_images = any(images)
    return processor(images=images if has_images else None, text=prompts, padding=True, return_tensors="pt")


def answer_batch(model, processor, batch: list[Question], images_dir: Path | None, max_new_tokens: int) -> list[str]:
    """Greedy answers to a batch of questions, left-padded, with the recurrent cache."""
    import torch

    from .tokenization_rwkv_world import TURN_END_TOKEN_ID

    inputs = prompt_inputs(processor, batch, images_dir).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=TURN_END_TOKEN_ID,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    return processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])


def check_images(questions: list[Question], images_dir: str | os.PathLike | None) -> Path | None:
    """The images folder, after checking that every question's image is in it (before any generation)."""
    needing = [question for question in questions if question.image is not None]
    if not needing:
        return None if images_dir is None else Path(images_dir)
    if images_dir is None:
        raise ValueError(f"{len(needing)} questions have images: give the folder holding them as --images.")
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"Images folder not found: {images_dir}")
    missing = [question for question in needing if not (images_dir / question.image).is_file()]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} of {len(needing)} question images are missing from {images_dir}, the first "
            f"{images_dir / first.image} (question {first.question_id!r}, line {first.line})."
        )
    return images_dir


def run_evaluation(
    model_dir: str | os.PathLike,
    benchmark: str,
    questions_file: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    output: str | os.PathLike,
    answers: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Answers every question of `questions_file` not yet in `output`, then scores all answers (None when there is
    no ground truth), prints the table and writes the scores to `scores_path(output)`. Inputs are all checked
    before the model loads: a bad file fails in seconds, not after hours of generation."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    from . import VisualRWKVForConditionalGeneration
    from .loading import visualrwkv_folder_config

    check_benchmark(benchmark)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size and --max-new-tokens must be positive, got {batch_size} and {max_new_tokens}.")
    model_dir, output = Path(model_dir), Path(output)
    config = visualrwkv_folder_config(model_dir)  # early: before any question is read
    questions = load_questions(questions_file)
    images = check_images(questions, images_dir)
    truth = load_ground_truth(benchmark, questions, answers)
    done = read_answers(output, questions)
    todo = [question for question in questions if question.key not in done]

    if todo:
        output.parent.mkdir(parents=True, exist_ok=True)
        processor = AutoProcessor.from_pretrained(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = VisualRWKVForConditionalGeneration.from_pretrained(model_dir, config=config).to(device).eval()
        with open(output, "a", encoding="utf-8") as file, tqdm(
            total=len(questions), initial=len(done), desc=benchmark, unit="q", disable=not progress
        ) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                texts = answer_batch(model, processor, batch, images, max_new_tokens)
                lines = "".join(
                    json.dumps({"question_id": q.question_id, "prompt": q.text, "text": text,
                                "model_id": model_dir.name}, ensure_ascii=False) + "\n"
                    for q, text in zip(batch, texts)
                )
                file.write(lines)  # whole lines only; an interrupted write leaves a cut last line, dropped on resume
                file.flush()
                bar.update(len(batch))
    print(f"{len(questions)} answers in {output} ({len(todo)} new, {len(done)} from an earlier run).")

    if truth is None:
        print("No ground truth (--answers, or answer fields in the question file): the answers are not scored.")
        return None
    scores = score_answers(benchmark, questions, read_answers(output, questions), truth)
    target = scores_path(output)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, target)
    print(format_scores(scores))
    print(f"Scores written to {target}")
    return scores


__all__ = [
    "BENCHMARKS",
    "Question",
    "answer_batch",
    "format_scores",
    "gqa_exact_match",
    "load_ground_truth",
    "load_questions",
    "mme_scores",
    "mme_yes_no",
    "normalize_vqa_answer",
    "pope_metrics",
    "pope_yes_no",
    "prompt_inputs",
    "read_answers",
    "run_evaluation",
    "scienceqa_choice",
    "score_answers",
    "scores_path",
    "vqa_accuracy",
]
