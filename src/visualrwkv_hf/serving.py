"""`visualrwkv serve`: transformers' OpenAI-compatible server (`transformers serve`) for VisualRWKV folders.

Plain `transformers serve` cannot serve a VisualRWKV folder, for three reasons, each handled here by a subclass of
serve's own class that defers to it for every other model:

* Loading. Serve never imports this package, so `visualrwkv` is an unknown model type; it finds the model class as
  `getattr(transformers, architectures[0])` and the modality (text, or image and text) in transformers' own tables
  of model names. `VisualRWKVModelLoader` loads our folders with our classes, as image-and-text models. The model runs
  in a process serve starts with multiprocessing's "spawn" (a fresh interpreter), which receives the loader pickled:
  unpickling it imports this module, and with it the package, which registers our classes in that process too; the
  same holds for the API server processes of `--api-server-count N`.
* The answer. Generation stops on the turn end 261 (`"\\n\\n"`), an ordinary token (see `tokenization_rwkv_world`),
  after an answer that the trained format starts with a space (`"Assistant: yellow\\n\\n"`).
  `VisualRWKVEngineClient` returns the answer the image-text-to-text pipeline returns
  (`processor.post_process_image_text_to_text`): the text up to the first `"\\n\\n"`, stripped (`answer_text`).
  The tokenizer's `decode(ids, skip_special_tokens=True)` drops the final turn end and the leading space too, but it
  cannot see a `"\\n\\n"` that the model wrote inside other tokens.
* Streaming. Serve decodes streamed tokens with the Rust `tokenizers.decoders.DecodeStream` on
  `tokenizer._tokenizer` (the World tokenizer's `tokenizer.json` form), which streams the bytes but not the pipeline's
  cut. `AnswerStreamer` streams the answer as above instead: each chunk is what the answer has gained and can no
  longer lose (see `AnswerStreamer.put_token`), so the chunks join to exactly the non-streaming answer.

Importing this module installs the two subclasses in serve's `model_manager` module (where serve looks them up, also
in the processes it spawns); `main` then runs `transformers serve` with the given command line, in this process.
"""

from __future__ import annotations

import asyncio

import transformers.cli.serving.model_manager as serve_model_manager
from transformers.cli.serving.utils import Detokenizer, Modality, _StreamError

from . import VisualRWKVConfig, VisualRWKVForConditionalGeneration, VisualRWKVProcessor
from .processing_visualrwkv import TURN_END


def answer_text(text: str) -> str:
    """The answer in the text of the generated tokens: up to the first turn end `"\\n\\n"`, stripped (what
    `VisualRWKVProcessor.post_process_image_text_to_text` returns for the generated tokens)."""
    return text.split(TURN_END, 1)[0].strip()


class VisualRWKVModelLoader(serve_model_manager.ModelLoader):
    """Serve's model loader, which also loads VisualRWKV folders (with this package's classes, as image-and-text
    models)."""

    @classmethod
    def get_model_modality(cls, config, processor=None) -> Modality | None:
        # Serve calls it on the class it finds in its module: this one, once installed
        if isinstance(config, VisualRWKVConfig):
            return Modality.VLM
        return super().get_model_modality(config, processor)

    def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
        from transformers import AutoConfig

        repo, revision, _ = serve_model_manager.parse_model_id(model_id)
        config = AutoConfig.from_pretrained(repo, revision=revision, trust_remote_code=self.trust_remote_code)
        if not isinstance(config, VisualRWKVConfig):
            return super()._load_model(model_id, tqdm_class=tqdm_class, progress_callback=progress_callback)
        if progress_callback is not None:
            progress_callback({"status": "loading", "model": model_id, "stage": "config"})
        kwargs = {"revision": revision, "dtype": self.dtype, "device_map": self.device, "tqdm_class": tqdm_class}
        quantization_config = self.get_quantization_config()
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return VisualRWKVForConditionalGeneration.from_pretrained(repo, config=config, **kwargs)


class AnswerStreamer(Detokenizer):
    """Serve's streamer for a VisualRWKV request: streams the answer `answer_text` gives for the tokens generated so
    far. A chunk is sent once it can no longer change: the text is decoded in full on each token (with the World
    tokenizer, microseconds for an answer's length), and held back are leading and trailing whitespace (stripped in
    the end, unless more text follows), an incomplete UTF-8 character at the end (it decodes to U+FFFD until its last
    byte comes), and everything after a turn end."""

    def __init__(self, processor: VisualRWKVProcessor, queue: asyncio.Queue):
        self._processor, self._queue, self._parser = processor, queue, None
        self._ids: list[int] = []
        self._sent = 0  # characters of the answer sent so far
        self.total_tokens = 0
        self.task: asyncio.Task | None = None

    def _send(self, answer: str) -> None:
        if len(answer) > self._sent:
            self._queue.put_nowait(answer[self._sent :])
            self._sent = len(answer)

    def _text(self) -> str:
        return self._processor.decode(self._ids, skip_special_tokens=True)

    def put_token(self, token_id: int) -> None:
        self.total_tokens += 1
        self._ids.append(token_id)
        text = self._text()
        if TURN_END in text:  # the answer is complete; the model's process stops on the turn end token
            self._send(answer_text(text))
        else:
            self._send(text.rstrip("\ufffd").strip())

    def end(self) -> None:
        self._send(answer_text(self._text()))
        super().end()


class VisualRWKVEngineClient(serve_model_manager.EngineClient):
    """Serve's client of a model's process, which returns and streams a VisualRWKV model's answers as the pipeline
    gives them (`answer_text`, `AnswerStreamer`)."""

    @property
    def _is_visualrwkv(self) -> bool:
        return isinstance(self.processor, VisualRWKVProcessor)

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict) -> tuple[str, int, list[int]]:
        text, prompt_length, generated_ids = await super().generate_non_streaming(inputs, generation_kwargs)
        if self._is_visualrwkv:
            text = answer_text(text)
        return text, prompt_length, generated_ids

    def _send_streaming_request(self, method: str, args: tuple, response_parser=None):
        if not self._is_visualrwkv:
            return super()._send_streaming_request(method, args, response_parser)
        # As serve's own, with `AnswerStreamer` for its Rust `DecodeStream`
        output_queue = asyncio.Queue()
        streamer = AnswerStreamer(self.processor, output_queue)

        async def wait_for_the_end() -> None:
            try:
                await self._send_request(method, args=args, streamer=streamer)
                streamer.end()
            except asyncio.CancelledError:
                pass
            except Exception as error:
                output_queue.put_nowait(_StreamError(str(error)))

        streamer.task = asyncio.create_task(wait_for_the_end())
        return output_queue, streamer


# Where serve looks them up: `Serve` and `GenerationState` import `ModelLoader` from this module when called,
# `EngineClient.modality` and `ModelManager` use its globals.
serve_model_manager.ModelLoader = VisualRWKVModelLoader
serve_model_manager.EngineClient = VisualRWKVEngineClient


def main(argv: list[str], prog_name: str = "visualrwkv serve") -> None:
    """Runs `transformers serve` with the command line `argv` (its own options: `--help` lists them), in this
    process, with VisualRWKV folders served as described in the module docstring."""
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer(add_completion=False)
    app.command(name="serve")(Serve)
    app(args=argv, prog_name=prog_name)
