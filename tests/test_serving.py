"""`visualrwkv serve` (transformers' OpenAI-compatible server) on a tiny random VisualRWKV folder: the real server, on
a free loopback port in a subprocess, called with the `openai` client and with `transformers chat`, answers every
chat (text, data-URL image, system message; streaming or not; in a row or concurrently) with the text the
image-text-to-text pipeline gives for it. The answer rules themselves (`answer_text`, `AnswerStreamer`) are checked
without a server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_modeling_visualrwkv7 as visualrwkv7_tests
from test_pipeline import MAX_NEW_TOKENS, QUESTIONS, folder, pipe, random_image  # noqa: F401 (fixtures)
from transformers import AutoProcessor, pipeline


pytest.importorskip("fastapi", reason="`visualrwkv serve` needs the `serve` extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="`visualrwkv serve` needs the `serve` extra: pip install -e '.[serve]'")

from transformers.cli.serving import model_manager as serve_model_manager  # noqa: E402 (needs fastapi, checked above)
from transformers.cli.serving.utils import Modality  # noqa: E402

from visualrwkv_hf.serving import AnswerStreamer, VisualRWKVModelLoader, answer_text  # noqa: E402


SERVER_START_TIMEOUT = 120  # seconds: imports and the model's process on a busy 2-core machine
REQUEST_TIMEOUT = 120
# Subprocesses never reach the network (no Hub look-ups, no update check)
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "NO_COLOR": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_server(folder: Path, log_path: Path, *options: str):
    """`visualrwkv serve FOLDER OPTIONS` on a free loopback port, in a subprocess; its base URL. Stopped on exit,
    with the processes it started (which exit with it)."""
    port = free_port()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "visualrwkv_hf.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
             str(port), *options],
            stdout=log, stderr=subprocess.STDOUT, env=OFFLINE_ENV,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"`visualrwkv serve` exited ({process.returncode}):\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`visualrwkv serve` did not answer in {SERVER_START_TIMEOUT}s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(process)


def openai_client(base_url: str, folder: Path) -> openai.OpenAI:
    """An `openai` client of the server; `client.model` is the model it serves (the folder, as it was started)."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)
    (model,) = client.models.list().data
    assert model.id == str(folder)
    client.model = model.id
    return client


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    with running_server(folder, tmp_path_factory.mktemp("serve-log") / "serve.log") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server, folder):
    return openai_client(server, folder)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server reads the pipeline's pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chats(image_seed: int, question: str, system: str | None = None) -> tuple[list[dict], list[dict]]:
    """The same chat for the pipeline (a PIL image) and for the server (the image as a data URL)."""
    image = random_image(image_seed)
    pipeline_chat = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    ]
    openai_chat = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": question},
        ]}
    ]
    if system is not None:
        pipeline_chat.insert(0, {"role": "system", "content": system})
        openai_chat.insert(0, {"role": "system", "content": system})
    return pipeline_chat, openai_chat


def pipeline_answer(pipe, messages: list[dict]) -> str:
    (result,) = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS)
    return result["generated_text"][-1]["content"]


def ask(client, messages: list[dict], stream: bool = False) -> tuple[str, str]:
    """The server's greedy answer and its finish reason; streamed, the chunks joined."""
    kwargs = dict(model=client.model, messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    chunks, finish_reason = [], None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            chunks.append(chunk.choices[0].delta.content or "")
            finish_reason = chunk.choices[0].finish_reason or finish_reason
    return "".join(chunks), finish_reason


def test_text_only_answer_is_the_pipelines(client, pipe):
    question = QUESTIONS[1]
    answer, finish_reason = ask(client, [{"role": "user", "content": question}])
    assert answer == pipeline_answer(pipe, [{"role": "user", "content": [{"type": "text", "text": question}]}])
    assert finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_image_and_system_message_answer_is_the_pipelines(client, pipe, stream):
    for image_seed, system in ((0, None), (1, "You are a careful assistant.")):
        pipeline_chat, openai_chat = chats(image_seed, QUESTIONS[0], system)
        answer, _ = ask(client, openai_chat, stream=stream)
        assert answer == pipeline_answer(pipe, pipeline_chat)
    # The image reaches the model: two images, two answers (as the pipeline's differ for this tiny model)
    assert ask(client, chats(0, QUESTIONS[0])[1])[0] != ask(client, chats(1, QUESTIONS[0])[1])[0]


def test_streamed_and_whole_answers_agree(client):
    _, openai_chat = chats(2, QUESTIONS[1], "Answer briefly.")
    assert ask(client, openai_chat, stream=True) == ask(client, openai_chat, stream=False)


def test_requests_in_a_row_and_concurrently(client, pipe):
    cases = [(seed, question) for seed in (3, 4) for question in QUESTIONS]
    expected = [pipeline_answer(pipe, chats(seed, question)[0]) for seed, question in cases]
    in_a_row = [ask(client, chats(seed, question)[1])[0] for seed, question in cases[:3]]
    assert in_a_row == expected[:3]
    with ThreadPoolExecutor(max_workers=4) as pool:  # half of them streamed
        concurrent = list(
            pool.map(lambda index: ask(client, chats(*cases[index])[1], stream=index % 2 == 1)[0], range(4))
        )
    assert concurrent == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chats_the_model_cannot_take_are_bad_requests_that_say_why(client, stream):
    _, openai_chat = chats(0, QUESTIONS[0])
    image_part = openai_chat[0]["content"][0]
    for content, message in [
        ([image_part, image_part, {"type": "text", "text": "Which one?"}], "one image per conversation"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "not an image format"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            ask(client, [{"role": "user", "content": content}], stream=stream)
        assert message in error.value.response.json()["detail"]
    assert ask(client, openai_chat, stream=stream)[0]  # and the server goes on answering


def test_visualrwkv7_answers_a_request_with_several_images(tmp_path):
    """A VisualRWKV-7 folder served: a request with two image parts gets the pipeline's answer for the same two
    images, in order (serve passes every image part on; the chat template puts them first, one line each)."""
    folder = tmp_path / "visualrwkv7"
    visualrwkv7_tests.tiny_model().save_pretrained(folder)
    visualrwkv7_tests.tiny_processor().save_pretrained(folder)
    images, question = [random_image(seed) for seed in (3, 4)], QUESTIONS[0]

    def chat(parts):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]

    seven = pipeline("image-text-to-text", model=str(folder))
    # the two orders give different answers (this tiny model reads the later image most), so the server's answers
    # show that it passed both images in the order given
    expected = [pipeline_answer(seven, chat({"type": "image", "image": image} for image in order))
                for order in (images, images[::-1])]
    assert expected[0] != expected[1]
    with running_server(folder, tmp_path / "serve.log") as base_url:
        client = openai_client(base_url, folder)
        answers = [ask(client, chat({"type": "image_url", "image_url": {"url": data_url(image)}} for image in order))[0]
                   for order in (images, images[::-1])]
    assert answers == expected


def test_several_api_server_processes(folder, pipe, tmp_path):
    """`--api-server-count 2`: serve spawns two API server processes (fresh interpreters, which unpickle our loader and
    so import the package) besides the model's; the answers, streamed and not, are the pipeline's text."""
    pipeline_chat, openai_chat = chats(5, QUESTIONS[1], "Be brief.")
    expected = pipeline_answer(pipe, pipeline_chat)
    with running_server(folder, tmp_path / "serve.log", "--api-server-count", "2") as base_url:
        client = openai_client(base_url, folder)
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda index: ask(client, openai_chat, stream=index % 2 == 1)[0], range(4)))
    assert answers == [expected] * 4


def test_transformers_chat_client(server, folder, pipe, tmp_path):
    """`transformers chat` (which always streams) against the server, driven through stdin; the chat it saves holds
    the pipeline's answer."""
    question = QUESTIONS[0]
    # The first `!save` may answer "Continue generating?" (asked after an answer cut at the token limit): then the
    # second one saves. `!exit` ends the session.
    commands = f"{question}\n!save\n!save\n!exit\n"
    result = subprocess.run(
        [sys.executable, "-m", "transformers.cli.transformers", "chat", str(folder), server,
         "do_sample=False", f"max_new_tokens={MAX_NEW_TOKENS}", "--save-folder", str(tmp_path), "--user", "tester"],
        # not HF_HUB_OFFLINE: its HTTP client (huggingface_hub's) then refuses every address, loopback included
        input=commands, capture_output=True, text=True, timeout=REQUEST_TIMEOUT,
        env={**OFFLINE_ENV, "HF_HUB_OFFLINE": "0"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A local model's name is a path: `os.path.join` puts the saved chats next to the model
    (saved,) = {path.read_text() for path in folder.glob("chat_*.json")}
    chat = json.loads(saved)["chat_history"]
    assert chat[0] == {"role": "user", "content": question}
    assert chat[1]["role"] == "assistant"
    expected = pipeline_answer(pipe, [{"role": "user", "content": [{"type": "text", "text": question}]}])
    assert chat[1]["content"] == expected


def test_serve_help_is_transformers_serves(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "visualrwkv_hf.cli", "serve", "--help"], capture_output=True, text=True, timeout=120,
        env={**OFFLINE_ENV, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "visualrwkv serve" in result.stdout and "--port" in result.stdout and "--host" in result.stdout


# Without a server


def test_serve_finds_our_loader_and_keeps_other_models_as_they_were(folder):
    from transformers import AutoConfig, GPT2Config, LlavaConfig

    assert serve_model_manager.ModelLoader is VisualRWKVModelLoader  # where serve looks it up
    assert serve_model_manager.ModelLoader.get_model_modality(AutoConfig.from_pretrained(folder)) is Modality.VLM
    base = VisualRWKVModelLoader.__mro__[1]
    for config in (
        GPT2Config(architectures=["GPT2LMHeadModel"]), LlavaConfig(architectures=["LlavaForConditionalGeneration"])
    ):
        assert VisualRWKVModelLoader.get_model_modality(config) is base.get_model_modality(config) is not None


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder)


def ids(processor, *pieces: str | int) -> list[int]:
    """Token ids: each string piece encoded on its own, ints as they are."""
    out = []
    for piece in pieces:
        out += [piece] if isinstance(piece, int) else processor.tokenizer.encode(piece, add_special_tokens=False)
    return out


def stream(processor, token_ids: list[int]) -> list[str]:
    """The chunks `AnswerStreamer` queues for `token_ids`."""
    queue = asyncio.Queue()
    streamer = AnswerStreamer(processor, queue)
    for token_id in token_ids:
        streamer.put_token(token_id)
    streamer.end()
    chunks = []
    while (item := queue.get_nowait()) is not None:
        chunks.append(item)
    return chunks


def test_answer_text_is_the_pipelines_post_processing(processor):
    euro = "€".encode()
    cases = [
        ids(processor, " yellow", 261),  # the trained format: one space, the answer, the turn end
        ids(processor, " two words", 261, " after the end"),
        ids(processor, "  \n spaced out  ", "\n", "\n", "more"),  # a turn end made of two "\n" tokens
        ids(processor, " no end yet  "),  # cut at the token limit
        ids(processor, " image", processor.image_token_id, " token"),  # special ids are skipped
        [processor.tokenizer.convert_tokens_to_ids(bytes([byte]).decode("utf-8", "surrogateescape")) for byte in euro],
    ]
    for token_ids in cases:
        text = processor.decode(token_ids, skip_special_tokens=True)
        assert answer_text(text) == processor.post_process_image_text_to_text([token_ids])[0]
    assert answer_text(processor.decode(cases[0], skip_special_tokens=True)) == "yellow"


def test_streamed_chunks_join_to_the_answer(processor):
    euro_bytes = [processor.tokenizer.convert_tokens_to_ids(bytes([b]).decode("utf-8", "surrogateescape"))
                  for b in "€".encode()]
    cases = {
        "trained format": (ids(processor, " big", " red", " ball", 261), ["big", " red", " ball"]),
        # a trailing space is held until text follows it, and dropped at the end
        "held whitespace": (ids(processor, " a", " ", "b", " ", " "), ["a", " b"]),
        # leading whitespace is never sent
        "leading whitespace": (ids(processor, "\n", " ", " x", 261), ["x"]),
        # a character cut across tokens is sent whole, once its last byte comes
        "split character": (ids(processor, " price ") + euro_bytes + ids(processor, "5"), ["price", " €", "5"]),
        # nothing after the first turn end, even when it is made of two "\n"
        "turn end from two tokens": (ids(processor, " one", "\n", "\n", " two"), ["one"]),
        "no tokens": ([], []),
    }
    for name, (token_ids, expected_chunks) in cases.items():
        chunks = stream(processor, token_ids)
        assert chunks == expected_chunks, name
        assert "".join(chunks) == answer_text(processor.decode(token_ids, skip_special_tokens=True)), name
