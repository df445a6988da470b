"""`visualrwkv web`: the chat's turns in-process (streamed pieces, follow-ups continuing the recurrent state), then the
real app in a real browser: `visualrwkv web` on a tiny random folder, on a free loopback port, driven by headless
Chromium through Selenium, asserting on what the page shows. The answers it shows are checked against independent
computations: the pipeline for a first question, and for a follow-up a fresh `generate()` without a cache over the
whole conversation, image included, whose format the test spells out itself.

The browser tests skip only where no Chromium and chromedriver are installed (`make test` installs them, as root);
Debian's packages: `apt-get install chromium chromium-driver`.

Run as a script, it takes the screenshot of docs/images/web_chat.png from a real answer:
`PYTHONPATH=src python tests/test_web.py --model outputs/visualrwkv-demo --output docs/images/web_chat.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the script; pytest puts tests/ on the path itself
from test_pipeline import chat, folder, pipe, random_image  # noqa: E402,F401 (fixtures)
from test_serving import OFFLINE_ENV, free_port, stop  # noqa: E402

from visualrwkv_hf import VisualRWKVForConditionalGeneration  # noqa: E402
from visualrwkv_hf.cli import main  # noqa: E402
from visualrwkv_hf.image_loading import load_rgb_image  # noqa: E402
from visualrwkv_hf.tokenization_rwkv_world import TURN_END_TOKEN_ID  # noqa: E402
from visualrwkv_hf.web import Conversation, WebChat, example_images  # noqa: E402

MAX_NEW_TOKENS = 24  # long enough for the page to show an answer in several pieces
QUESTIONS = ("What color?", "And what shape is it?")
APP_START_TIMEOUT = 120  # seconds: imports and the model on a busy 2-core machine
# An answer may wait for the CPU kernel's first build (about a minute on a busy machine; once per machine)
ANSWER_TIMEOUT = 180
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no headless browser: install Chromium and its driver (Debian: apt-get install chromium chromium-driver; "
    "`make test` does it when run as root)",
)


@pytest.fixture(scope="module")
def model(folder):
    return VisualRWKVForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def web_chat(model, pipe):
    return WebChat(model, pipe.processor, MAX_NEW_TOKENS)


def pipeline_answer(pipe, image, question: str) -> str:
    (output,) = pipe(
        text=chat(image, question), max_new_tokens=MAX_NEW_TOKENS, generate_kwargs={"do_sample": False},
        return_full_text=False,
    )
    return output["generated_text"]


def as_shown(text: str) -> str:
    """`text` as a page shows it: HTML turns every carriage return (alone or before a line feed) into a line feed,
    and the random test model's answers hold some."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@torch.no_grad()
def recomputed_answers(model, processor, image, questions) -> list[str]:
    """The answers of a conversation about `image`, each from a fresh greedy `generate()` without a cache over the
    whole conversation so far, image included: the first question's prompt as the processor formats a plain
    question, each answer as generated and closed by the turn end, then `"User: <question>\\n\\n"` and
    `"Assistant:"` (each turn tokenized on its own)."""
    inputs = processor(images=image, text=questions[0], return_tensors="pt")
    ids, answers = inputs["input_ids"], []
    for index, question in enumerate(questions):
        if index:
            turn = processor.tokenizer.encode(f"User: {question}\n\n") + processor.tokenizer.encode("Assistant:")
            ids = torch.cat([ids, torch.tensor([turn])], 1)
        generated = model.generate(
            ids, pixel_values=inputs["pixel_values"], max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
            eos_token_id=TURN_END_TOKEN_ID, use_cache=False,
        )
        answers.append(processor.post_process_image_text_to_text(generated[0, ids.shape[1]:]))
        ids = generated if generated[0, -1] == TURN_END_TOKEN_ID else torch.cat(
            [generated, torch.tensor([[TURN_END_TOKEN_ID]])], 1
        )
    return answers


def ask(web_chat: WebChat, conversation: Conversation, question: str) -> tuple[list[str], Conversation]:
    """The answer's pieces as `WebChat.answer` yields them, and the conversation after it."""
    *pieces, after = web_chat.answer(conversation, question)
    assert isinstance(after, Conversation)
    return pieces, after


# ------------------------------------------------------------------------------------------------ in-process


def test_an_answer_streams_in_growing_pieces_that_end_as_the_pipelines_answer(web_chat, pipe):
    image = random_image(0)
    pieces, after = ask(web_chat, Conversation(image=image), QUESTIONS[0])
    expected = pipeline_answer(pipe, image, QUESTIONS[0])
    assert len(pieces) > 1 and pieces[-1] == expected
    assert all(later.startswith(earlier) and later != earlier for earlier, later in zip(pieces, pieces[1:]))
    assert after.turns == ((QUESTIONS[0], expected),) and after.image is image


def test_a_follow_up_reads_only_its_own_turn_and_answers_as_a_full_recompute(web_chat, model, pipe):
    image = random_image(0)
    first = ask(web_chat, Conversation(image=image), QUESTIONS[0])[1]
    vision_runs, read_lengths = [], []
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *args: vision_runs.append(1)),
        model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: read_lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
        ),
    ]
    try:
        inputs = web_chat.turn_inputs(first, QUESTIONS[1])
        pieces, second = ask(web_chat, first, QUESTIONS[1])
    finally:
        for hook in hooks:
            hook.remove()
    assert second.turns[-1][1] == pieces[-1] == recomputed_answers(model, pipe.processor, image, QUESTIONS)[1]
    assert not vision_runs  # the image is in the state
    # the first step reads what the state has not seen: the answer's last token, its turn end when max_new_tokens
    # cut it, and the new turn; then one token a step
    assert read_lengths[0] == inputs["input_ids"].shape[1] - first.ids.shape[1] + 1
    assert set(read_lengths[1:]) == {1}
    turn_end = [] if first.ids[0, -1] == TURN_END_TOKEN_ID else [TURN_END_TOKEN_ID]
    tokenizer = pipe.processor.tokenizer
    new_turn = tokenizer.encode(f"User: {QUESTIONS[1]}\n\n") + tokenizer.encode("Assistant:")
    assert inputs["input_ids"][0].tolist() == first.ids[0].tolist() + turn_end + new_turn


def test_a_turn_leaves_the_conversation_it_continued_unchanged(web_chat):
    first = ask(web_chat, Conversation(image=random_image(1)), QUESTIONS[0])[1]
    ids, seen = first.ids.clone(), first.cache.get_seq_length()
    answers = [ask(web_chat, first, QUESTIONS[1])[1].turns[-1][1] for _ in range(2)]
    assert answers[0] == answers[1]  # the second continued the same state, not the one the first left
    assert torch.equal(first.ids, ids) and first.cache.get_seq_length() == seen


def test_a_missing_folder_is_one_line_on_stderr(tmp_path, capsys):
    assert main(["web", "--model", str(tmp_path / "missing"), "--port", str(free_port())]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "is not a model folder (no config.json)" in error


def test_a_port_in_use_is_one_line_on_stderr_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert main(["web", "--model", str(tmp_path / "missing"), "--port", str(port)]) == 1
    error = capsys.readouterr().err
    assert error == (
        f"error: Cannot listen on 127.0.0.1:{port} (Address already in use): another program may be using the port; "
        "pass another --port (or --host).\n"
    )


# ------------------------------------------------------------------------------------------------ in the browser


@contextlib.contextmanager
def running_app(folder: Path, log_path: Path, max_new_tokens: int = MAX_NEW_TOKENS):
    """`visualrwkv web --model FOLDER` on a free loopback port, in a subprocess; its URL. Stopped on exit."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "visualrwkv_hf.cli", "web", "--model", str(folder), "--port", str(port),
             "--max-new-tokens", str(max_new_tokens)],
            stdout=log, stderr=subprocess.STDOUT, env=OFFLINE_ENV,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + APP_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"`visualrwkv web` exited ({process.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`visualrwkv web` did not answer in {APP_START_TIMEOUT}s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


def start_browser() -> webdriver.Chrome:
    """Headless Chromium with the system's chromedriver (Selenium downloads nothing when both are given)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class ChatPage:
    """The app's page in the browser, read and driven as a person would: what it shows, never its state."""

    def __init__(self, browser: webdriver.Chrome, url: str):
        self.browser = browser
        browser.get(url)
        self.wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#question textarea"), "the page to load", 60)

    def wait_for(self, condition, what: str, timeout: float = ANSWER_TIMEOUT):
        try:
            return WebDriverWait(self.browser, timeout, poll_frequency=0.05).until(lambda _: condition())
        except TimeoutException:
            pytest.fail(f"waited {timeout}s for {what}; the page shows status {self.status()!r}, chat {self.chat()}")

    def find(self, selector: str):
        return self.browser.find_element(By.CSS_SELECTOR, selector)

    # Read in one script each, so that the page cannot re-render an element between finding and reading it.
    def status(self) -> str:
        return self.browser.execute_script("return document.querySelector('#status').textContent").strip()

    def chat(self) -> list[tuple[str, str]]:
        """The chat's messages, as (who, text)."""
        messages = self.browser.execute_script(
            "return [...document.querySelectorAll('#chat [data-testid=user], #chat [data-testid=bot]')]"
            ".map(element => [element.dataset.testid, element.textContent])"
        )
        return [tuple(message) for message in messages]

    def upload(self, path: Path) -> None:
        self.find("#image input[type=file]").send_keys(str(path))

    def wait_for_image(self) -> str:
        return self.wait_for(lambda: "pixels: ask about it" in self.status() and self.status(), "the image", 60)

    def ask(self, question: str) -> str:
        """Types the question, sends it, and returns the answer once complete."""
        box = self.find("#question textarea")
        box.clear()
        box.send_keys(question)
        return self.send()

    def send(self) -> str:
        """Sends the question in the box and returns the answer once complete: the question and the start of the
        answer come with the status "Answering...", which turns to "Answered in ..." with the last piece."""
        turns = len(self.chat())
        self.find("#send").click()
        self.wait_for(
            lambda: len(self.chat()) == turns + 2 and self.status().startswith("Answered in "), "the answer"
        )
        return self.chat()[-1][1]

    def record_answers(self) -> None:
        """From now on, the page records every text the chat's last answer shows (`recorded_answers`)."""
        self.browser.execute_script(
            """
            window.shownAnswers = [];
            const chat = document.querySelector('#chat');
            new MutationObserver(() => {
                const answers = chat.querySelectorAll('[data-testid=bot]');
                const text = answers.length ? answers[answers.length - 1].textContent : null;
                if (text !== null && window.shownAnswers[window.shownAnswers.length - 1] !== text)
                    window.shownAnswers.push(text);
            }).observe(chat, {subtree: true, childList: true, characterData: true});
            """
        )

    def recorded_answers(self) -> list[str]:
        return self.browser.execute_script("return window.shownAnswers")


@pytest.fixture(scope="module")
def app(folder, tmp_path_factory):
    with running_app(folder, tmp_path_factory.mktemp("web-log") / "web.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    browser = start_browser()
    yield browser
    browser.quit()


@pytest.fixture
def page(app, browser):
    return ChatPage(browser, app)  # a fresh page: a new session of the app


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    random_image(0).save(path)  # PNG: the page's upload holds the pipeline's pixels
    return path


@needs_browser
def test_the_page_streams_the_pipelines_answer_then_a_follow_up_as_a_full_recompute(
    page, image_file, model, pipe, tmp_path
):
    image = random_image(0)
    expected = recomputed_answers(model, pipe.processor, image, QUESTIONS)  # also builds the CPU kernel, if needed
    assert expected[0] == pipeline_answer(pipe, image, QUESTIONS[0])
    expected = [as_shown(answer) for answer in expected]
    page.upload(image_file)
    assert page.wait_for_image() == f"Image of {image.width} x {image.height} pixels: ask about it."
    page.record_answers()
    assert page.ask(QUESTIONS[0]) == expected[0]
    shown = page.recorded_answers()
    assert shown[-1] == expected[0] and all(expected[0].startswith(text) for text in shown)
    assert len({text for text in shown if text}) > 1, f"the answer did not stream: {shown}"
    assert page.ask(QUESTIONS[1]) == expected[1]
    assert page.chat() == [("user", QUESTIONS[0]), ("bot", expected[0]), ("user", QUESTIONS[1]), ("bot", expected[1])]
    page.browser.save_screenshot(str(tmp_path / "web_chat.png"))


@needs_browser
def test_clear_starts_the_conversation_again_on_the_same_image(page, image_file, model, pipe):
    image = random_image(0)
    fresh = as_shown(pipeline_answer(pipe, image, QUESTIONS[1]))
    assert fresh != recomputed_answers(model, pipe.processor, image, QUESTIONS)[1]  # so that the test tells them apart
    page.upload(image_file)
    page.wait_for_image()
    page.find("#send").click()  # nothing typed yet
    page.wait_for(lambda: page.status() == "Error: type a question first.", "the empty question's error", 30)
    page.ask(QUESTIONS[0])
    page.find("#clear").click()
    page.wait_for(lambda: not page.chat(), "the chat to be cleared", 30)
    assert page.ask(QUESTIONS[1]) == fresh
    assert page.chat() == [("user", QUESTIONS[1]), ("bot", fresh)]


@needs_browser
def test_an_example_fills_the_image_and_the_question(page, pipe):
    image, question = example_images()[1]
    page.find("#examples tbody tr:nth-child(2)").click()
    assert page.wait_for_image() == f"Image of {image.width} x {image.height} pixels: ask about it."
    assert page.find("#question textarea").get_property("value") == question
    page.send()
    assert page.chat() == [("user", question), ("bot", as_shown(pipeline_answer(pipe, image, question)))]


@needs_browser
def test_a_bad_file_shows_why_and_no_question_is_answered(page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG signature, then nothing readable
    with pytest.raises(ValueError) as error:
        load_rgb_image(broken.read_bytes())
    page.upload(broken)
    page.wait_for(lambda: page.status().startswith("Error:"), "the error")
    assert page.status() == f"Error: broken.png: {error.value}"
    assert "not an image format Pillow recognises" in page.status()
    page.find("#question textarea").send_keys("What color?")
    page.find("#send").click()
    page.wait_for(lambda: "no image to ask about" in page.status(), "the missing image's error", 30)
    assert page.status() == "Error: no image to ask about: upload or paste one, or pick an example."
    assert page.chat() == []
    # a file that is no image by its name is refused by the page itself, before the upload
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.upload(notes)
    page.wait_for(
        lambda: any("Invalid file type" in toast.text for toast in page.browser.find_elements(By.CSS_SELECTOR, ".toast-body")),
        "the page's refusal", 30,
    )


# ------------------------------------------------------------------------------------------------ screenshot


def take_screenshot(model_dir: Path, output: Path, example: int, follow_up: str | None) -> None:
    """Starts `visualrwkv web` on `model_dir`, picks an example, asks its question (and `follow_up`) in headless
    Chromium and saves the page to `output`."""
    log_path = output.with_suffix(".log")
    with running_app(model_dir, log_path) as url:
        browser = start_browser()
        try:
            page = ChatPage(browser, url)
            page.find(f"#examples tbody tr:nth-child({example + 1})").click()
            page.wait_for_image()
            page.ask(example_images()[example][1])
            if follow_up:
                page.ask(follow_up)
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(str(output))
            print("\n".join(f"{who}: {text}" for who, text in page.chat()))
        finally:
            browser.quit()
    log_path.unlink()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Screenshot of `visualrwkv web` answering, in headless Chromium.")
    parser.add_argument("--model", required=True, type=Path, help="a VisualRWKV folder (e.g. outputs/visualrwkv-demo)")
    parser.add_argument("--output", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--example", type=int, default=0, help="which example to ask (0-3)")
    parser.add_argument("--follow-up", help="a second question to ask")
    arguments = parser.parse_args()
    take_screenshot(arguments.model, arguments.output, arguments.example, arguments.follow_up)
