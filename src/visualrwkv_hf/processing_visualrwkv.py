"""The VisualRWKV processor: images -> `pixel_values`, chats -> the prompt format VisualRWKV-6 was trained with.

Prompt format (the original's `VisualRWKV-v6/v6.0/src/dataset.py`). A human turn is `"User: " + text + "\\n\\n"`, an
assistant turn `"Assistant: " + text + "\\n\\n"`, an empty turn just `"User:"` / `"Assistant:"` (that is how the
generation prompt `"Assistant:"` is made); no system prompt, no BOS. Turn text is stripped and runs of blank lines
inside it collapse to one `"\\n"`, because `"\\n\\n"` (id 261) ends a turn. The turn that holds the image (an
`{"type": "image"}` part, or `"<image>"` written in the text) loses its `"<image>"` and gets one placed by
`image_position`:

* `"first"`: `"<image>\\n" + text`;
* `"middle"` (the sandwich; the released models): every human turn of the conversation joined by `"\\n"` (in the image
  turn the LLaVA suffix `"Answer the question using a single word or phrase."` is removed), then `"\\n<image>\\n"`,
  then the image turn's own text (suffix kept);
* `"last"`: `text + "\\n<image>"`.

One deliberate difference: the original copies the OTHER human turns into the sandwich only stripped, so a blank line
inside one of them put a turn terminator in the middle of the image turn; here they are collapsed like every turn
text (in the original's training data those turns essentially never hold blank lines, so nothing learnt depends on it).

Tokenization is per segment, as the original does it: each turn on its own, and in the image turn the text on either
side of the image on its own (tokenizing the joined prompt could merge tokens across those boundaries). The image
becomes `num_image_tokens` copies of the `"<image>"` token id, which the model replaces by the image features.

Images are converted to 8-bit RGB before the image processor: transparency is composited onto white (what a viewer
shows, and what transformers' `convert_to_rgb` does; the original's `convert("RGB")` dropped alpha, but its training
images were JPEGs), 16-bit samples are scaled by 255 / 65535, float samples are read as [0, 1] (or [0, 255] when any
value exceeds 1), palette, 1-bit, grayscale and CMYK go through Pillow's conversion.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import PIL.Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, load_image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torch_tensor

from .configuration_visualrwkv import IMAGE_POSITIONS

IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_POSITION = "middle"
DEFAULT_NUM_IMAGE_TOKENS = 577  # 24 x 24 CLIP-L/14-336 patches + the cls token
TURN_END = "\n\n"
GENERATION_PROMPT = "Assistant:"
TURN_PREFIXES = ("User:", "Assistant:")

# Built from the rules in the module docstring. Jinja has no regular expressions: a stripped text's blank-line runs
# collapse exactly when its whitespace-only lines are dropped (its first and last lines are never whitespace-only).
CHAT_TEMPLATE = r"""{#- VisualRWKV-6 prompts; image_position: 'first', 'middle' (the sandwich, default) or 'last'. -#}
{%- set position = image_position | default('middle') -%}
{%- if position not in ['first', 'middle', 'last'] -%}
    {{- raise_exception("image_position must be 'first', 'middle' or 'last', not '" ~ position ~ "'") -}}
{%- endif -%}
{%- macro collapse_blank_lines(text) -%}
    {%- for line in text.split('\n') if line.strip() -%}
        {{- line -}}{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- set turns = namespace(texts=[], has_image=[], human_texts=[]) -%}
{%- for message in messages -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{- raise_exception("VisualRWKV-6 knows only 'user' and 'assistant' turns (it was trained without a "
            ~ "system prompt), not '" ~ message['role'] ~ "'") -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {%- set text = message['content'] -%}
        {%- set image_parts = 0 -%}
    {%- else -%}
        {%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')
            | join('\n') -%}
        {%- set image_parts = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}
    {%- endif -%}
    {%- set has_image = image_parts > 0 or '<image>' in text -%}
    {%- set text = text.replace('<image>', '').strip() -%}
    {%- set turns.texts = turns.texts + [text] -%}
    {%- set turns.has_image = turns.has_image + [has_image] -%}
    {%- if message['role'] == 'user' -%}
        {%- set human_text = text.replace('Answer the question using a single word or phrase.', '').strip()
            if has_image else text -%}
        {%- set turns.human_texts = turns.human_texts + [collapse_blank_lines(human_text)] -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set text = collapse_blank_lines(turns.texts[loop.index0]) -%}
    {%- if turns.has_image[loop.index0] -%}
        {%- if position == 'first' -%}
            {%- set text = '<image>\n' ~ text -%}
        {%- elif position == 'middle' -%}
            {%- set text = turns.human_texts | join('\n') ~ '\n<image>\n' ~ text -%}
        {%- else -%}
            {%- set text = text ~ '\n<image>' -%}
        {%- endif -%}
        {%- set text = text.strip() -%}
    {%- endif -%}
    {%- set speaker = 'User' if message['role'] == 'user' else 'Assistant' -%}
    {%- if text -%}
        {{- speaker ~ ': ' ~ text ~ '\n\n' -}}
    {%- else -%}
        {{- speaker ~ ':' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'Assistant:' -}}
{%- endif -%}
"""


def default_image_processor() -> CLIPImageProcessorPil:
    """The image processor of CLIP ViT-L/14-336 as VisualRWKV-6 uses it: shortest edge resized to 336 (bicubic), center
    crop 336 x 336, OpenAI CLIP mean and std, no pad-to-square. The Pillow backend resizes like the original did."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 336},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 336, "width": 336},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_convert_rgb=True,
    )


def _open_image(source: str | os.PathLike | bytes) -> PIL.Image.Image:
    """Opens and fully decodes an image file, path or bytes, so a corrupt file fails here with its name."""
    if isinstance(source, str) and source.startswith(("http://", "https://", "data:image/")):
        return load_image(source)
    described = "the image bytes" if isinstance(source, bytes) else f"image file {os.fspath(source)!r}"
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"Cannot read {described}: it does not exist.") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"Cannot read {described}: it is not an image format Pillow recognises.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"Cannot read {described}: it is corrupt or truncated ({error}).") from error
    return image


def _samples_to_uint8(samples: np.ndarray) -> np.ndarray:
    """8-bit samples from bool, 8-bit, 16-bit (scaled by 255 / 65535), other integer (0..255) or float arrays."""
    kind, size = samples.dtype.kind, samples.dtype.itemsize
    if kind == "b":
        return samples.astype(np.uint8) * 255
    if kind == "u" and size == 1:
        return samples
    if kind == "u" and size == 2:
        return np.rint(samples / 257.0).astype(np.uint8)
    if kind in "iu":
        if samples.size and (samples.min() < 0 or samples.max() > 255):
            raise ValueError(
                f"Integer image samples must lie in 0..255 (or be uint16 for 16-bit images); got "
                f"{samples.dtype} values in {samples.min()}..{samples.max()}."
            )
        return samples.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(samples).all():
            raise ValueError("Float image samples contain NaN or infinity.")
        low, high = (samples.min(), samples.max()) if samples.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise ValueError(f"Float image samples must lie in [0, 1] or [0, 255]; got values in [{low}, {high}].")
        scale = 255.0 if high <= 1 else 1.0
        return np.rint(samples * scale).astype(np.uint8)
    raise ValueError(f"Unsupported image sample type {samples.dtype}.")


def _array_to_image(array: np.ndarray) -> PIL.Image.Image:
    """A PIL image from an (H, W), (H, W, C) or (C, H, W) array; C = 1 (gray), 2 (gray + alpha, last only), 3, 4."""
    channel_counts = (1, 2, 3, 4)
    if array.ndim == 3 and array.shape[-1] not in channel_counts and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in channel_counts) or 0 in array.shape:
        raise ValueError(
            f"An image array must be (height, width) or have 1-4 channels first or last; got shape {array.shape}. "
            "Pass a batch as a list of images."
        )
    samples = _samples_to_uint8(array)
    mode = {2: "L", 3: {2: "LA", 3: "RGB", 4: "RGBA"}.get(array.shape[-1])}[array.ndim]
    return PIL.Image.fromarray(np.ascontiguousarray(samples), mode=mode)


def load_rgb_image(image: Any) -> PIL.Image.Image:
    """An 8-bit RGB PIL image from a PIL image, a numpy array, a torch tensor, a file path, a URL or encoded bytes.

    See the module docstring for how transparency, 16-bit, float, palette, 1-bit, grayscale and CMYK images convert.
    Anything unreadable raises a `ValueError` (or `FileNotFoundError`) that names the problem.
    """
    if isinstance(image, (str, os.PathLike, bytes)):
        image = _open_image(image)
    elif is_torch_tensor(image):
        image = _array_to_image(image.detach().cpu().numpy())
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(
            f"Cannot use a {type(image).__name__} as an image: pass a PIL image, a numpy array, a torch tensor, "
            "a file path, a URL or the file's bytes."
        )
    # Pillow's own conversion of these modes clips to 0..255 instead of scaling.
    if image.mode.startswith("I"):  # "I;16", "I;16B", ... and "I", Pillow's 32-bit container for 16-bit files
        image = PIL.Image.fromarray(_samples_to_uint8(np.clip(np.asarray(image), 0, 65535).astype(np.uint16)))
    elif image.mode == "F":
        image = PIL.Image.fromarray(_samples_to_uint8(np.asarray(image)))
    try:
        if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
            on_white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(on_white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"Cannot convert an image of mode {image.mode!r} to RGB: {error}") from error


def check_image_position(image_position: str) -> str:
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"`image_position` must be one of {IMAGE_POSITIONS}, got {image_position!r}.")
    return image_position


class VisualRWKVProcessor(ProcessorMixin):
    r"""
    Processor for VisualRWKV-6: an image processor (CLIP ViT-L/14-336's by default) and the RWKV World tokenizer,
    with the chat template and the per-segment tokenization the original was trained with (see the module docstring).

    Args:
        image_processor: Any transformers image processor; `None` builds `default_image_processor()`.
        tokenizer: An `RwkvWorldTokenizer`; `"<image>"` is added to it as a special token when missing (id 65530 in
            the World vocabulary, inside the model's 65536 rows).
        chat_template: Jinja chat template; defaults to `CHAT_TEMPLATE`.
        image_position: Where the image goes in its turn by default: `"first"`, `"middle"` (the sandwich prompt of
            the released models) or `"last"`. `apply_chat_template` and `__call__` take it per call too.
        num_image_tokens: Feature vectors per image (577 for CLIP-L/14-336 with the cls token; fewer with grid
            pooling); one `"<image>"` expands to this many image token ids.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_position: str = DEFAULT_IMAGE_POSITION,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("VisualRWKVProcessor needs a tokenizer (an RwkvWorldTokenizer).")
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"`num_image_tokens` must be a positive integer, got {num_image_tokens!r}.")
        self.image_position = check_image_position(image_position)
        self.num_image_tokens = num_image_tokens
        # Generation appends after the last column, so batches must be padded on the left (the model zeroes padding
        # before every recurrence); a tokenizer made without an explicit side gets left, also in the pipeline.
        if "padding_side" not in tokenizer.init_kwargs:
            tokenizer.padding_side = "left"
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        super().__init__(
            image_processor if image_processor is not None else default_image_processor(),
            tokenizer,
            chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE,
            **kwargs,
        )

    def apply_chat_template(self, conversation, chat_template=None, image_position: str | None = None, **kwargs):
        """`ProcessorMixin.apply_chat_template` with `image_position` (default: the processor's) for the template."""
        image_position = check_image_position(image_position or self.image_position)
        return super().apply_chat_template(conversation, chat_template, image_position=image_position, **kwargs)

    def __call__(self, images=None, text=None, image_position: str | None = None, **kwargs):
        r"""
        Args:
            images: One image per prompt at most (VisualRWKV-6 takes one): a flat list with one image per prompt, or
                one per prompt that holds `"<image>"`, or nested lists (`[[image], []]`). Each is a PIL image, numpy
                array, torch tensor, path, URL or file bytes; see `load_rgb_image`.
            text: A prompt or a list of prompts. A text that starts with `"User:"` or `"Assistant:"` is a formatted
                prompt (what `apply_chat_template` makes) and is tokenized as it is; any other text is one user
                message, formatted with the chat template (image placed by `image_position`, generation prompt
                `"Assistant:"` appended).
            image_position: Image position for texts formatted here; defaults to the processor's.
            **kwargs: Tokenizer options (`padding`, `padding_side`, `max_length`, `pad_to_multiple_of`,
                `return_attention_mask`), image processor options, `return_tensors`.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` (when `text` is given) and `pixel_values` (when
            images are given).
        """
        if images is None and text is None:
            raise ValueError("VisualRWKVProcessor needs `images`, `text` or both.")
        position = check_image_position(image_position or self.image_position)
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        if text_kwargs.pop("truncation", None):
            raise ValueError(
                "VisualRWKVProcessor does not truncate: a cut could split the image span or a turn. Shorten the "
                "conversation instead."
            )
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        texts = None if text is None else [text] if isinstance(text, str) else list(text)
        if texts is not None and not all(isinstance(one_text, str) for one_text in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        sample_images = self._images_per_sample(images, texts)

        data = {}
        given_images = [load_rgb_image(image) for image in sample_images if image is not None]
        if given_images:
            # Only what the model's forward takes (some image processors add sizes or masks).
            data["pixel_values"] = self.image_processor(given_images, **images_kwargs)["pixel_values"]
        if texts is not None:
            prompts = [
                one_text if one_text.startswith(TURN_PREFIXES) else self._format_message(one_text, image, position)
                for one_text, image in zip(texts, sample_images)
            ]
            for index, (prompt, image) in enumerate(zip(prompts, sample_images)):
                markers = prompt.count(IMAGE_TOKEN)
                if markers > 1:
                    raise ValueError(
                        f"Prompt {index} holds {markers} {IMAGE_TOKEN!r} markers; VisualRWKV-6 takes one image per "
                        "prompt."
                    )
                if markers != (image is not None):
                    raise ValueError(
                        f"Prompt {index} has {'no' if image is None else 'an'} image but "
                        f"{'a' if markers else 'no'} {IMAGE_TOKEN!r} marker: give each image a marker (or use "
                        "`apply_chat_template`, which places it) and each marker an image."
                    )
            padded = self.tokenizer.pad(
                {"input_ids": [self._tokenize_prompt(prompt) for prompt in prompts]},
                padding=text_kwargs.get("padding", False),
                max_length=text_kwargs.get("max_length"),
                pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
                padding_side=text_kwargs.get("padding_side"),
                return_attention_mask=text_kwargs.get("return_attention_mask"),
            )
            data.update(padded)
        return BatchFeature(data, tensor_type=return_tensors)

    def _images_per_sample(self, images, texts: list[str] | None) -> list:
        """Each prompt's image or None (or, without text, every image given)."""
        if images is None:
            return [None] * len(texts)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        nested = [isinstance(entry, (list, tuple)) for entry in image_list]
        if texts is None:
            return [image for entry, is_list in zip(image_list, nested) for image in (entry if is_list else [entry])]
        if any(nested):
            if not all(nested) or len(image_list) != len(texts):
                raise ValueError(
                    f"Nested images need one list (of zero or one image) per prompt; got {len(image_list)} entries "
                    f"for {len(texts)} prompts."
                )
            for index, entry in enumerate(image_list):
                if len(entry) > 1:
                    raise ValueError(f"Prompt {index} got {len(entry)} images; VisualRWKV-6 takes one image a prompt.")
            return [entry[0] if entry else None for entry in image_list]
        if len(image_list) == len(texts):
            return image_list
        with_marker = [index for index, one_text in enumerate(texts) if IMAGE_TOKEN in one_text]
        if len(image_list) != len(with_marker):
            raise ValueError(
                f"Got {len(image_list)} images for {len(texts)} prompts, of which {len(with_marker)} hold "
                f"{IMAGE_TOKEN!r}. VisualRWKV-6 takes one image per prompt: give one image per prompt, one per prompt "
                "that holds the marker, or nested lists such as [[image], []]."
            )
        sample_images = [None] * len(texts)
        for index, image in zip(with_marker, image_list):
            sample_images[index] = image
        return sample_images

    def _format_message(self, message: str, image, image_position: str) -> str:
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": message}]
        return self.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, image_position=image_position
        )

    def _tokenize_prompt(self, prompt: str) -> list[int]:
        """Ids of a formatted prompt: each turn, and each side of the image, tokenized on its own."""
        return [token_id for turn_ids in self.tokenize_turns(prompt) for token_id in turn_ids]

    def tokenize_turns(self, prompt: str) -> list[list[int]]:
        """The ids of each turn of a formatted prompt (what `apply_chat_template` makes), in order: every turn ends
        with `"\\n\\n"` except a final empty one (`"Assistant:"`); the image becomes `num_image_tokens` image token
        ids, and each side of it is tokenized on its own. Training collators label the turns from this."""
        turns = prompt.split(TURN_END)
        turns = [turn + TURN_END for turn in turns[:-1]] + ([turns[-1]] if turns[-1] else [])
        image_ids = [self.image_token_id] * self.num_image_tokens
        turn_ids = []
        for turn in turns:
            ids = []
            for index, piece in enumerate(turn.split(IMAGE_TOKEN)):
                if index:
                    ids.extend(image_ids)
                if piece:
                    ids.extend(self.tokenizer.encode(piece, add_special_tokens=False, split_special_tokens=True))
            turn_ids.append(ids)
        return turn_ids

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Decodes generated ids and cuts each answer at its turn end `"\\n\\n"`, stripped.

        Works on the new tokens alone (`" Red\\n\\n"` -> `"Red"`) and on prompt + answer, as the image-text-to-text
        pipeline passes them: then the answer starts after the prompt's last `"Assistant:"`, and the prompt is kept
        with the stripped answer right after it, so that the pipeline, which removes the decoded prompt, returns the
        bare answer.
        """
        decoded = self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return [cut_answer(text) for text in decoded] if isinstance(decoded, list) else cut_answer(decoded)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def cut_answer(text: str) -> str:
    """The answer in `text`, from its last `"Assistant:"` (if any) to the next `"\\n\\n"`, stripped; the prompt
    before it is kept, stripped on the left."""
    prompt, generation_prompt, answer = text.rpartition(GENERATION_PROMPT)
    return (prompt + generation_prompt).lstrip() + answer.split(TURN_END, 1)[0].strip()


__all__ = ["VisualRWKVProcessor", "default_image_processor", "load_rgb_image"]
