"""`visualrwkv web`: a chat about an image in the browser, with a converted VisualRWKV folder (Gradio).

Upload, paste or pick an image (the examples are the demo's synthetic shapes, with a question each), ask about it, and
the answer streams in; follow-up questions continue the conversation; Clear starts it again on the same image, and a
new image starts a new one. The page holds one image per conversation, as VisualRWKV-6, HD and UHD take;
VisualRWKV-7 reads several (through `visualrwkv serve` or the pipeline).

* Answers are the pipeline's. The first question's prompt is the one `pipeline("image-text-to-text")` builds (the
  chat template with the folder's image position); generation is greedy and stops at the turn end `"\\n\\n"`. The
  pieces are streamed by serve's `AnswerStreamer` (`serving.py`): each is what the answer (the text up to the turn
  end, stripped) has gained and no later token can change, so the pieces join to exactly the pipeline's answer.
* Follow-ups reuse the recurrent state. After an answer, the state (`generate(..., return_dict_in_generate=True)`
  returns it as `cache`) holds the whole conversation, image included; a follow-up runs only its own turn,
  `"User: <question>\\n\\nAssistant:"`, after the answer and its turn end, so the image and the earlier turns are not
  read again. The conversation is thus the first prompt followed by plain turns, as `image_position="first"` and
  `"last"` continue one; the sandwich's own multi-turn layout (every question of the conversation before the image)
  would change the first turn with each question and re-read everything. Each turn continues a copy of the state, so
  a turn that fails or is abandoned leaves the conversation as it was.
* Images go through `load_rgb_image`, as everywhere in this package: a file it cannot read shows its error message
  on the page, under the image.
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .image_loading import load_rgb_image
from .tokenization_rwkv_world import TURN_END_TOKEN_ID

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # Gradio's
DEFAULT_MAX_NEW_TOKENS = 256
ANSWERING = "Answering..."
NUM_EXAMPLES = 4  # one per question type of the demo
# System fonts only: the default theme's web fonts come from the internet, which the page may not reach.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]
# Small images (the demo's are 48 pixels wide) fill the image box, with sharp pixels
CSS = "#image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One browser session's chat: the image, the (question, answer) turns so far, and after the first answer the
    conversation's token ids and the recurrent state that has read them (`cache`)."""

    image: PIL.Image.Image | None = None
    turns: tuple[tuple[str, str], ...] = ()
    ids: torch.Tensor | None = None
    cache: Any = None

    def messages(self, question: str | None = None, partial_answer: str = "") -> list[dict]:
        """The turns as the chat shows them, with `question` and the answer so far after them when given."""
        turns = self.turns + (((question, partial_answer),) if question is not None else ())
        return [
            message
            for asked, answered in turns
            for message in ({"role": "user", "content": asked}, {"role": "assistant", "content": answered})
        ]


class _AnswerFeed(BaseStreamer):
    """`generate()`'s streamer that hands the new tokens (not the prompt, which comes first) to an `AnswerStreamer`,
    whose queue receives the answer's pieces and then None."""

    def __init__(self, answer_streamer):
        self.answer_streamer, self.prompt_seen = answer_streamer, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            self.answer_streamer.put_token(token_id)

    def end(self) -> None:
        self.answer_streamer.end()


class _StopWhenSet(StoppingCriteria):
    """Stops `generate()` at the next token once `event` is set: an answer nobody reads any more (the page asked
    for something else, or left) frees the model at once."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class WebChat:
    """A loaded folder's model and processor, answering the questions of any number of `Conversation`s."""

    def __init__(self, model, processor, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    def turn_inputs(self, conversation: Conversation, question: str) -> dict:
        """`generate()`'s inputs for `question`: the first question's prompt with the image, as the pipeline makes
        it; or the conversation's ids with the new turn appended, and the state that has read them."""
        if conversation.ids is None:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            return dict(self.processor(images=conversation.image, text=prompt, return_tensors="pt"))
        prompt = self.processor.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True
        )
        ids = conversation.ids
        if ids[0, -1].item() != TURN_END_TOKEN_ID:  # an answer cut by max_new_tokens: its turn is closed first
            ids = torch.cat([ids, torch.tensor([[TURN_END_TOKEN_ID]])], 1)
        ids = torch.cat([ids, self.processor(text=prompt, return_tensors="pt")["input_ids"]], 1)
        # generate() advances the state in place: a copy keeps this conversation's own intact
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cache": copy.deepcopy(conversation.cache)}

    def answer(self, conversation: Conversation, question: str) -> Iterator[str | Conversation]:
        """Answers `question` in `conversation`: yields the answer so far each time it grows, then the conversation
        with the new turn."""
        from .serving import AnswerStreamer

        inputs = self.turn_inputs(conversation, question)
        pieces: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}
        stop = threading.Event()

        def generate() -> None:
            try:
                result["output"] = self.model.generate(
                    **{name: value.to(self.model.device) if torch.is_tensor(value) else value
                       for name, value in inputs.items()},
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    eos_token_id=TURN_END_TOKEN_ID,
                    return_dict_in_generate=True,
                    streamer=_AnswerFeed(AnswerStreamer(self.processor, pieces)),
                    stopping_criteria=[_StopWhenSet(stop)],
                )
            except Exception as error:  # re-raised in the caller's thread
                result["error"] = error
                pieces.put(None)

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        answer = ""
        try:
            while (piece := pieces.get()) is not None:
                answer += piece
                yield answer
        finally:  # also when the caller stops iterating (Gradio cancels an abandoned answer)
            stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        output = result["output"]
        yield dataclasses.replace(
            conversation,
            turns=conversation.turns + ((question, answer),),
            ids=output.sequences.cpu(),
            cache=output.cache,
        )


def load_web_chat(model_dir: str | Path, device: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> WebChat:
    """A `WebChat` on a folder written by `visualrwkv convert` or `visualrwkv demo`."""
    from transformers import AutoProcessor

    from . import VisualRWKVForConditionalGeneration
    from .loading import visualrwkv_folder_config

    config = visualrwkv_folder_config(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = VisualRWKVForConditionalGeneration.from_pretrained(model_dir, config=config).to(device).eval()
    return WebChat(model, processor, max_new_tokens)


def read_upload(payload: dict) -> PIL.Image.Image:
    """The image of an upload as the page sends it (a file Gradio saved, or a data URL), read by `load_rgb_image`;
    its errors name the file as the user knows it."""
    if payload.get("path"):
        source = Path(payload["path"]).read_bytes()
    else:
        source = payload.get("url") or ""
    try:
        return load_rgb_image(source)
    except (ValueError, OSError) as error:
        name = payload.get("orig_name") or "the image"
        raise ValueError(f"{name}: {error}") from None


def example_images(num_examples: int = NUM_EXAMPLES, seed: int = 0) -> list[tuple[PIL.Image.Image, str]]:
    """Images and questions of the demo's task (`demo.make_samples`), one per question type."""
    from .demo import make_samples

    return [(sample.image, sample.question) for sample in make_samples(num_examples, seed)]


def build_app(chat: WebChat, title: str = "VisualRWKV"):
    """The Gradio app: image (upload, paste or example) and chat side by side, a question box, Send and Clear."""
    import gradio as gr

    def error_text(error: str | Exception) -> str:
        return f"**Error:** {error}"

    def on_image(payload: dict | None):
        """A new image (or none): a new conversation, or the reason the file cannot be read."""
        if payload is None:
            return Conversation(), [], ""
        try:
            image = read_upload(payload)
        except ValueError as error:
            return Conversation(), [], error_text(error)
        return Conversation(image=image), [], f"Image of {image.width} x {image.height} pixels: ask about it."

    def on_ask(question: str, conversation: Conversation):
        question = question.strip()
        if conversation.image is None:
            yield conversation.messages(), conversation, error_text(
                "no image to ask about: upload or paste one, or pick an example."
            ), question
            return
        if not question:
            yield conversation.messages(), conversation, error_text("type a question first."), question
            return
        yield conversation.messages(question), conversation, ANSWERING, ""
        start = time.perf_counter()
        for update in chat.answer(conversation, question):
            if isinstance(update, Conversation):
                yield update.messages(), update, f"Answered in {time.perf_counter() - start:.2f} s.", ""
            else:
                yield conversation.messages(question, update), conversation, ANSWERING, ""

    def on_clear(conversation: Conversation):
        """The conversation starts again, on the same image."""
        return Conversation(image=conversation.image), [], ""

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nUpload or paste an image, or pick an example, then ask about it.")
        conversation = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=2):
                # PNG: the examples reach the model with the pixels they were drawn with (Gradio's default is WebP)
                image = gr.Image(
                    label="Image", type="filepath", format="png", sources=["upload", "clipboard"], height=400,
                    elem_id="image",
                )
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                # The answer exactly as the model wrote it (no Markdown); no "share" button (it needs the Hub)
                chatbot = gr.Chatbot(
                    label="Chat", height=400, render_markdown=False, buttons=["copy", "copy_all"],
                    feedback_options=None, elem_id="chat",
                )
                question = gr.Textbox(
                    label="Question", placeholder="What color is the circle?", lines=1, elem_id="question"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
        gr.Examples(
            [[example, text] for example, text in example_images()], inputs=[image, question],
            label="Examples (the demo's shapes)", elem_id="examples",
        )
        ask = {
            "fn": on_ask, "inputs": [question, conversation], "outputs": [chatbot, conversation, status, question],
            "concurrency_id": "answer",  # Send and Enter share one queue: one answer is generated at a time
        }
        asking = [send.click(**ask), question.submit(**ask)]
        # preprocess=False: the upload reaches `read_upload` as it is, so that a file Pillow cannot open gets
        # `load_rgb_image`'s message instead of failing inside Gradio's own image conversion.
        image.change(
            on_image, inputs=image, outputs=[conversation, chatbot, status], preprocess=False, cancels=asking
        )
        for clearing in (clear.click, chatbot.clear):  # the Clear button, and the chat's own bin icon
            clearing(on_clear, inputs=conversation, outputs=[conversation, chatbot, status], cancels=asking)
    return app


def check_port(host: str, port: int) -> None:
    """Refuses, before anything loads, an address the app could not listen on (Gradio's own message is about its
    `launch()` arguments)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as error:
        raise OSError(
            f"Cannot listen on {host}:{port} ({error.strerror or error}): another program may be using the port; "
            "pass another --port (or --host)."
        ) from None


def serve_web(
    model_dir: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> None:
    """Loads the folder and serves the app at http://host:port until interrupted."""
    check_port(host, port)
    chat = load_web_chat(model_dir, device, max_new_tokens)  # a bad folder fails before Gradio's imports
    import gradio as gr

    app = build_app(chat, title=f"VisualRWKV: {Path(model_dir).name}")
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    app.queue().launch(server_name=host, server_port=port, theme=theme, css=CSS, show_error=True)


__all__ = ["Conversation", "WebChat", "build_app", "load_web_chat", "serve_web"]
