"""The VisualRWKV processor: images -> `pixel_values`, chats -> the prompt format VisualRWKV was trained with.

Prompt format (the original's `VisualRWKV-v6/v6.0/src/dataset.py`, and `VisualRWKV-v7/v7.00/src/dataset.py`). A human turn is `"User: " + text + "\\n\\n"`, an
assistant turn `"Assistant: " + text + "\\n\\n"`, an empty turn just `"User:"` / `"Assistant:"` (that is how the
generation prompt `"Assistant:"` is made); no system prompt, no BOS. Turn text is stripped and runs of blank lines
inside it collapse to one `"\\n"`, because `"\\n\\n"` (id 261) ends a turn. The user turn that holds the image (an
`{"type": "image"}` part) gets `"<image>"` placed by `image_position`:

* `"first"`: `"<image>\\n" + text`; with several images (VisualRWKV-7's format, the only position that takes more
  than one), a user turn holding k image parts starts with k lines `"<image>"`, then `"\\n"` + text;
* `"middle"` (the sandwich; the released models): every human turn of the conversation joined by `"\\n"` (in the image
  turn the LLaVA suffix `"Answer the question using a single word or phrase."` is removed), then `"\\n<image>\\n"`,
  then the image turn's own text (suffix kept);
* `"last"`: `text + "\\n<image>"`.

One deliberate difference: the original copies the OTHER human turns into the sandwich only stripped, so a blank line
inside one of them put a turn terminator in the middle of the image turn; here they are collapsed like every turn
text (in the original's training data those turns essentially never hold blank lines, so nothing learnt depends on it).

Rules for what the original never saw:

* `"<image>"` marks the image only where an image comes with it. In chat messages the image is an image part, and
  `"<image>"` written in a message's text is text. In a prompt given to the processor, `"<image>"` is the image's
  place only when that prompt has an image; without one it is text (`"What does <image> do in HTML?"` is a question).
  A prompt with an image therefore cannot also hold the text `"<image>"` (refused, naming the prompt).
* A `"system"` message (many clients send one by default) may come first: the model was trained without a system
  prompt, so its text opens the first user message, followed by `"\\n"`, and follows that message's rules from there
  (in the sandwich it is repeated with the question after the image). Anything else the model cannot take (other
  roles, a system message later on, more than one image with `"middle"` / `"last"`, an image outside a user message,
  video or audio parts, an empty conversation) is refused by the chat template with a message saying so. Folders saved with this package's
  earlier chat templates get the current one when loaded; a template of one's own is kept.

Tokenization is per segment, as the original does it: each turn on its own, and in the image turn the text on either
side of the image on its own (tokenizing the joined prompt could merge tokens across those boundaries). The image
becomes `num_image_tokens` copies of the processor's `image_token_id` (the `"<image>"` token's id unless given; 65535
for VisualRWKV-7, as its original), which the model replaces by the image features.

VisualRWKV-7's original inference also left-pads every prompt with id 261 (`"\\n\\n"`) to a multiple of 16 tokens
before the model sees it. Its training never did, so it is off by default; `prompt_pad_multiple=16` reproduces it
(the pad is part of the prompt: real tokens, attention 1).

Images are decoded by `load_rgb_image` (`image_loading.py`): any file, URL, array or tensor becomes 8-bit RGB.
"""

from __future__ import annotations

import hashlib

import jinja2
from transformers import AutoImageProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PaddingStrategy

from .configuration_sam_dino_siglip import SamDinoSiglipVisionConfig
from .configuration_visualrwkv import IMAGE_POSITIONS, VisualRWKVConfig
from .image_loading import load_rgb_image
from .image_processing_sam_dino_siglip import SamDinoSiglipImageProcessor
from .tokenization_rwkv_world import TURN_END_TOKEN_ID

# A saved processor names its image processor class; AutoImageProcessor finds the three-encoder backbone's by it.
AutoImageProcessor.register(
    SamDinoSiglipVisionConfig, image_processor_classes={"pil": SamDinoSiglipImageProcessor}, exist_ok=True
)

# What the model's forward takes of the image processor's output (some image processors add sizes or masks):
# `high_res_pixel_values` is the three-encoder backbone's SAM input.
PIXEL_INPUTS = ("pixel_values", "high_res_pixel_values")

IMAGE_TOKEN = "<image>"
TURN_END = "\n\n"
GENERATION_PROMPT = "Assistant:"
TURN_PREFIXES = ("User:", "Assistant:")
# Tokenizer options the per-segment tokenization here cannot honour; refused rather than silently ignored.
UNSUPPORTED_TEXT_OPTIONS = (
    "return_offsets_mapping",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "return_length",
    "return_token_type_ids",
    "return_mm_token_type_ids",
    "return_text_replacement_offsets",
    "is_split_into_words",
    "stride",
    "text_pair",
)

# Built from the rules in the module docstring. Jinja has no regular expressions: a stripped text's blank-line runs
# collapse exactly when its whitespace-only lines are dropped (its first and last lines are never whitespace-only).
CHAT_TEMPLATE = r"""{#- VisualRWKV prompts; image_position: 'first' (any number of images), 'middle' (the sandwich,
    default) or 'last'. -#}
{%- set position = image_position | default('middle') -%}
{%- if position not in ['first', 'middle', 'last'] -%}
    {{- raise_exception("image_position must be 'first', 'middle' or 'last', not '" ~ position ~ "'") -}}
{%- endif -%}
{%- macro collapse_blank_lines(text) -%}
    {%- for line in text.split('\n') if line.strip() -%}
        {{- line -}}{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro message_text(message) -%}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\n') -}}
    {%- endif -%}
{%- endmacro -%}
{%- if not messages -%}
    {{- raise_exception("The conversation is empty: give at least one user message.") -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set where = " (message " ~ loop.index0 ~ ")." -%}
    {%- if message['role'] is not defined -%}
        {{- raise_exception("A message needs a 'role'" ~ where) -}}
    {%- elif message['content'] is not defined or message['content'] is mapping
        or not (message['content'] is string or message['content'] is sequence) -%}
        {{- raise_exception("A message needs a 'content': a text or a list of parts" ~ where) -}}
    {%- endif -%}
    {%- for part in message['content'] if message['content'] is not string -%}
        {%- if part is not mapping or part['type'] not in ['text', 'image'] -%}
            {{- raise_exception("VisualRWKV takes text and image parts, not " ~ ("a '" ~ part['type'] ~ "' part"
                if part is mapping and part['type'] is defined else "'" ~ part ~ "'") ~ where) -}}
        {%- elif part['type'] == 'text' and part['text'] is not string -%}
            {{- raise_exception("A text part needs a 'text' string" ~ where) -}}
        {%- endif -%}
    {%- endfor -%}
{%- endfor -%}
{#- The model was trained without a system prompt: a system message's text opens the first user turn instead. -#}
{%- set system = namespace(text='', messages=0) -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is not string and messages[0]['content'] | rejectattr('type', 'equalto', 'text')
        | list -%}
        {{- raise_exception("A system message holds text only; put the image in a user message.") -}}
    {%- endif -%}
    {%- set system.text = message_text(messages[0]).strip() -%}
    {%- set system.messages = 1 -%}
    {%- set messages = messages[1:] -%}
    {%- if not messages | selectattr('role', 'equalto', 'user') | list -%}
        {{- raise_exception("A system message is folded into the first user message, and this conversation has "
            ~ "none.") -}}
    {%- endif -%}
{%- endif -%}
{%- set turns = namespace(texts=[], images_per_turn=[], human_texts=[], images=0, system_folded=false) -%}
{%- for message in messages -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{- raise_exception("VisualRWKV knows 'user' and 'assistant' messages and one 'system' message first, "
            ~ "not a '" ~ message['role'] ~ "' message at position " ~ (loop.index0 + system.messages) ~ ".") -}}
    {%- endif -%}
    {#- An image is an image part; "<image>" written in text is text. -#}
    {%- set image_parts = 0 if message['content'] is string
        else message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}
    {%- set turns.images = turns.images + image_parts -%}
    {%- if image_parts and message['role'] != 'user' -%}
        {{- raise_exception("An image goes in a user message, not in a '" ~ message['role'] ~ "' message"
            ~ where) -}}
    {%- elif turns.images > 1 and position != 'first' -%}
        {{- raise_exception("With image_position '" ~ position ~ "', VisualRWKV takes one image per conversation; "
            ~ "several images go first in their turn (image_position 'first', as VisualRWKV-7).") -}}
    {%- endif -%}
    {%- set text = message_text(message) -%}
    {%- if message['role'] == 'user' and not turns.system_folded -%}
        {%- set text = (system.text ~ '\n' ~ text) if system.text else text -%}
        {%- set turns.system_folded = true -%}
    {%- endif -%}
    {%- set text = text.strip() -%}
    {%- set turns.texts = turns.texts + [text] -%}
    {%- set turns.images_per_turn = turns.images_per_turn + [image_parts] -%}
    {%- if message['role'] == 'user' -%}
        {%- set human_text = text.replace('Answer the question using a single word or phrase.', '').strip()
            if image_parts else text -%}
        {%- set turns.human_texts = turns.human_texts + [collapse_blank_lines(human_text)] -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set text = collapse_blank_lines(turns.texts[loop.index0]) -%}
    {%- set image_parts = turns.images_per_turn[loop.index0] -%}
    {%- if image_parts -%}
        {%- if position == 'first' -%}
            {#- VisualRWKV-7's format: one line per image, then the text -#}
            {%- set text = (['<image>'] * image_parts) | join('\n') ~ '\n' ~ text -%}
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

# sha256 of the chat templates earlier versions of this package saved (chat_template.jinja): a folder that holds one
# gets the current template, so its system messages and "<image>" text follow the current rules.
EARLIER_CHAT_TEMPLATES_SHA256 = frozenset(
    {
        "e06582f6e4ddea94d0530877ad6f8b825982fca57802e4897d828d7184087023",
        "26f89fd5e4cf35da565b0e0f7c31d16c2bb2e55409a76a92b7a0bd3d778a52bc",
        "d990df527b6eb039e245463b76f124a1931261c338fe44058ef9364ff96c4e2d",
    }
)


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


def check_image_position(image_position: str) -> str:
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"`image_position` must be one of {IMAGE_POSITIONS}, got {image_position!r}.")
    return image_position


class VisualRWKVProcessor(ProcessorMixin):
    r"""
    Processor for VisualRWKV: an image processor (CLIP ViT-L/14-336's by default) and the RWKV World tokenizer, with
    the chat template and the per-segment tokenization the original was trained with (see the module docstring).

    Args:
        image_processor: Any transformers image processor; `None` builds `default_image_processor()`.
        tokenizer: An `RwkvWorldTokenizer`; `"<image>"` is added to it as a special token when missing (id 65530 in
            the World vocabulary, inside the model's 65536 rows).
        chat_template: Jinja chat template; defaults to `CHAT_TEMPLATE`.
        image_position: Where the image goes in its turn by default: `"first"` (VisualRWKV-7; the only position
            that takes several images), `"middle"` (the sandwich prompt of the released VisualRWKV-6 models,
            `VisualRWKVConfig`'s default) or `"last"`. `apply_chat_template` and `__call__` take it per call too.
        num_image_tokens: Feature vectors per image, the model config's `num_image_tokens`; `None` takes the default
            `VisualRWKVConfig`'s (577 for CLIP-L/14-336 with the cls token). One `"<image>"` expands to this many
            image token ids.
        image_token_id: The id each image's placeholders get, the model config's `image_token_id`; `None` takes the
            tokenizer's `"<image>"` token (65530 in the World vocabulary). VisualRWKV-7 uses 65535, as its original.
        prompt_pad_multiple: 0 (the default) or m >= 1: prepend (m - length % m) % m copies of id 261 (`"\\n\\n"`)
            to each prompt, as real tokens, so that its length is a multiple of m. VisualRWKV-7's original inference
            pads to 16; its training never did, so it is off by default (see docs/checkpoints.md for its measured
            effect).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_position: str = VisualRWKVConfig.image_position,
        num_image_tokens: int | None = None,
        image_token_id: int | None = None,
        prompt_pad_multiple: int = 0,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("VisualRWKVProcessor needs a tokenizer (an RwkvWorldTokenizer).")
        if num_image_tokens is None:
            num_image_tokens = VisualRWKVConfig().num_image_tokens
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"`num_image_tokens` must be a positive integer, got {num_image_tokens!r}.")
        if not isinstance(prompt_pad_multiple, int) or prompt_pad_multiple < 0:
            raise ValueError(
                f"`prompt_pad_multiple` must be 0 (no padding) or a positive integer, got {prompt_pad_multiple!r}."
            )
        self.image_position = check_image_position(image_position)
        self.num_image_tokens = num_image_tokens
        self.prompt_pad_multiple = prompt_pad_multiple
        # Generation appends after the last column, so batches must be padded on the left (the model zeroes padding
        # before every recurrence); a tokenizer made without an explicit side gets left, also in the pipeline.
        if "padding_side" not in tokenizer.init_kwargs:
            tokenizer.padding_side = "left"
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
        self.image_token = IMAGE_TOKEN
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if not isinstance(image_token_id, int) or image_token_id < 0:
            raise ValueError(f"`image_token_id` must be a non-negative token id, got {image_token_id!r}.")
        self.image_token_id = image_token_id
        if chat_template is None or hashlib.sha256(chat_template.encode()).hexdigest() in EARLIER_CHAT_TEMPLATES_SHA256:
            chat_template = CHAT_TEMPLATE
        super().__init__(
            image_processor if image_processor is not None else default_image_processor(),
            tokenizer,
            chat_template=chat_template,
            **kwargs,
        )

    def apply_chat_template(self, conversation, chat_template=None, image_position: str | None = None, **kwargs):
        """`ProcessorMixin.apply_chat_template` with `image_position` (default: the processor's) for the template.

        Messages are `{"role": "user" | "assistant", "content": text or parts}`; an image is an `{"type": "image"}`
        part in a user message (one per conversation, or any number with `image_position="first"`), and `"<image>"`
        written in a text is kept as text. A
        `"system"` message may come first: the model was trained without one, so its text opens the first user
        message (followed by a line break) and then follows that message's rules (in the sandwich it is repeated
        with the question after the image).
        """
        if isinstance(conversation, (list, tuple)) and not conversation:
            raise ValueError("The conversation is empty: give at least one user message.")
        image_position = check_image_position(image_position or self.image_position)
        try:
            return super().apply_chat_template(conversation, chat_template, image_position=image_position, **kwargs)
        except jinja2.TemplateError as error:
            # The template's refusals are the caller's mistake: a ValueError, which servers such as
            # `transformers serve` answer with HTTP 400 and this message (an HTTP 500 for a jinja2 error).
            raise ValueError(str(error)) from None

    def __call__(self, images=None, text=None, image_position: str | None = None, **kwargs):
        r"""
        Args:
            images: One image per prompt at most, or several with `image_position="first"` (VisualRWKV-7): a flat
                list with one image per prompt, or one per `"<image>"` marker of the prompts, or (one prompt) all of
                that prompt's images, or nested lists (`[[image], [], [image, image]]`). Each is a PIL image, numpy
                array, torch tensor, path, URL, base64 text or file bytes; see `load_rgb_image`.
            text: A prompt or a list of prompts. A text that starts with `"User:"` or `"Assistant:"` is a formatted
                prompt (what `apply_chat_template` makes) and is tokenized as it is; any other text is one user
                message, formatted with the chat template (image placed by `image_position`, generation prompt
                `"Assistant:"` appended).
            image_position: Image position for texts formatted here; defaults to the processor's.
            **kwargs: Tokenizer options (`padding`, `padding_side`, `max_length`, `pad_to_multiple_of`,
                `return_attention_mask`), image processor options (`input_data_format` says where the channels of
                an array or tensor image are), `return_tensors`.

        `"<image>"` in a prompt marks an image only when that prompt comes with images; in a prompt without one it
        is plain text. A formatted prompt with k images holds exactly k `"<image>"`; a plain text with k images
        holds at most k, which are removed (the images go where `image_position` puts them). So a prompt that has
        images cannot also hold the words `"<image>"`. With `prompt_pad_multiple`, every prompt is left-padded with
        id 261 to a multiple of it (before any batch padding).

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` (when `text` is given) and `pixel_values` (when
            images are given: every image of the batch, prompt by prompt).
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
        unsupported = [option for option in UNSUPPORTED_TEXT_OPTIONS if text_kwargs.get(option)]
        if unsupported:
            raise ValueError(
                f"VisualRWKVProcessor does not support {', '.join(f'`{option}`' for option in unsupported)}; for "
                "plain text, call the tokenizer (`processor.tokenizer`), which returns offsets too."
            )
        return_tensors = text_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)
        input_data_format = images_kwargs.pop("input_data_format", None)  # applied here, the processor gets RGB

        texts = None if text is None else [text] if isinstance(text, str) else list(text)
        if texts is not None and not all(isinstance(one_text, str) for one_text in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        if texts == []:
            raise ValueError("`text` is an empty list: give at least one prompt.")
        sample_images = self._images_per_sample(images, texts)

        data = {}
        given_images = [load_rgb_image(image, input_data_format) for images in sample_images for image in images]
        if texts is None and not given_images:
            raise ValueError("`images` is empty: give at least one image (or a text).")
        if given_images:
            pixels = self.image_processor(given_images, **images_kwargs)
            data.update({name: pixels[name] for name in PIXEL_INPUTS if name in pixels})
        if texts is not None:
            prompts = []
            for index, (one_text, images_here) in enumerate(zip(texts, sample_images)):
                num_images = len(images_here)
                markers = one_text.count(IMAGE_TOKEN) if num_images else 0
                formatted = one_text.startswith(TURN_PREFIXES)
                if num_images > 1 and position != "first":
                    raise ValueError(
                        f"Prompt {index} got {num_images} images, but with image_position {position!r} VisualRWKV "
                        "takes one image a prompt: give one image per prompt, or put several first "
                        "(image_position='first', as VisualRWKV-7)."
                    )
                if markers > num_images:
                    raise ValueError(
                        f"Prompt {index} has {describe_images(num_images)} and holds {markers} {IMAGE_TOKEN!r} markers; "
                        f"a prompt with images cannot also hold the text {IMAGE_TOKEN!r}."
                    )
                if formatted and markers < num_images:
                    raise ValueError(
                        f"Prompt {index} has {describe_images(num_images)} but {markers or 'no'} {IMAGE_TOKEN!r} "
                        f"marker(s): a formatted prompt holds one {IMAGE_TOKEN!r} where each image goes "
                        "(`apply_chat_template` places them for image parts)."
                    )
                if not formatted:
                    if not num_images and not one_text.strip():
                        raise ValueError(f"Prompt {index} is empty: give a question (or an image).")
                    if markers:  # in plain text they only say which prompt the images belong to
                        one_text = one_text.replace(IMAGE_TOKEN, "")
                    one_text = self._format_message(one_text, num_images, position)
                prompts.append(one_text)
            rows = [self._tokenize_prompt(prompt, bool(images)) for prompt, images in zip(prompts, sample_images)]
            padding = text_kwargs.get("padding", False)
            max_length = text_kwargs.get("max_length")
            if padding in ("max_length", PaddingStrategy.MAX_LENGTH) and max_length is not None:
                for index, row in enumerate(rows):
                    if len(row) > max_length:
                        raise ValueError(
                            f"Prompt {index} has {len(row)} tokens, more than max_length={max_length}, so "
                            "`padding='max_length'` cannot make the rows one length, and VisualRWKVProcessor does "
                            "not truncate (a cut could split the image span or a turn). Raise `max_length`."
                        )
            padded = self.tokenizer.pad(
                {"input_ids": rows},
                padding=padding,
                max_length=max_length,
                pad_to_multiple_of=text_kwargs.get("pad_to_multiple_of"),
                padding_side=text_kwargs.get("padding_side"),
                return_attention_mask=text_kwargs.get("return_attention_mask"),
            )
            data.update(padded)
        return BatchFeature(data, tensor_type=return_tensors)

    def _images_per_sample(self, images, texts: list[str] | None) -> list[list]:
        """Each prompt's images, in order (or, without text, one list of every image given)."""
        if images is None:
            return [[] for _ in texts]
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        nested = [isinstance(entry, (list, tuple)) for entry in image_list]
        if texts is None:
            return [[image for entry, is_list in zip(image_list, nested) for image in (entry if is_list else [entry])]]
        if any(nested):
            if not all(nested) or len(image_list) != len(texts):
                raise ValueError(
                    f"Nested images need one list (of the prompt's images, maybe none) per prompt; got "
                    f"{len(image_list)} entries for {len(texts)} prompts."
                )
            return [list(entry) for entry in image_list]
        if len(texts) == 1:
            return [image_list]
        markers = [one_text.count(IMAGE_TOKEN) for one_text in texts]
        if sum(markers) == len(image_list):  # one image per marker
            starts = [sum(markers[:index]) for index in range(len(texts))]
            return [image_list[start : start + count] for start, count in zip(starts, markers)]
        if len(image_list) == len(texts):
            return [[image] for image in image_list]
        raise ValueError(
            f"Got {len(image_list)} images for {len(texts)} prompts, which hold {sum(markers)} {IMAGE_TOKEN!r} "
            "markers: give one image per prompt, one per marker, or nested lists such as [[image], []] (several "
            "images in one prompt need image_position='first')."
        )

    def _format_message(self, message: str, num_images: int, image_position: str) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": message}]
        return self.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, image_position=image_position
        )

    def _tokenize_prompt(self, prompt: str, has_image: bool) -> list[int]:
        """Ids of a formatted prompt: each turn, and each side of each image, tokenized on its own; then the
        `prompt_pad_multiple` padding in front."""
        ids = [token_id for turn_ids in self.tokenize_turns(prompt, has_image) for token_id in turn_ids]
        multiple = self.prompt_pad_multiple
        # "\n\n" (261), as VisualRWKV-7's original inference pads
        return [TURN_END_TOKEN_ID] * ((multiple - len(ids) % multiple) % multiple if multiple else 0) + ids

    def tokenize_turns(self, prompt: str, has_image: bool = True) -> list[list[int]]:
        """The ids of each turn of a formatted prompt (what `apply_chat_template` makes), in order: every turn ends
        with `"\\n\\n"` except a final empty one (`"Assistant:"`); when the prompt comes with images (`has_image`),
        each `"<image>"` becomes `num_image_tokens` copies of `image_token_id`, and the text between them is tokenized
        piece by piece; without one, `"<image>"` is text. Training collators label the turns from this
        (`prompt_pad_multiple` does not apply: training never padded)."""
        turns = prompt.split(TURN_END)
        turns = [turn + TURN_END for turn in turns[:-1]] + ([turns[-1]] if turns[-1] else [])
        image_ids = [self.image_token_id] * self.num_image_tokens
        turn_ids = []
        for turn in turns:
            ids = []
            for index, piece in enumerate(turn.split(IMAGE_TOKEN) if has_image else [turn]):
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
        # the image processor's: `pixel_values`, and `high_res_pixel_values` for the three-encoder backbone
        return ["input_ids", "attention_mask", *(name for name in PIXEL_INPUTS
                                                 if name in self.image_processor.model_input_names)]


def describe_images(count: int) -> str:
    return "an image" if count == 1 else f"{count} images"


def cut_answer(text: str) -> str:
    """The answer in `text`, from its last `"Assistant:"` (if any) to the next `"\\n\\n"`, stripped; the prompt
    before it is kept, stripped on the left."""
    prompt, generation_prompt, answer = text.rpartition(GENERATION_PROMPT)
    return (prompt + generation_prompt).lstrip() + answer.split(TURN_END, 1)[0].strip()


__all__ = ["VisualRWKVProcessor", "default_image_processor"]
