"""Image decoding for VisualRWKV: any image a user may pass -> one 8-bit RGB PIL image for the image processor.

Images are read as transformers' `load_image` reads them, from a file path, a URL (fetched with the same client), a
`data:image/...;base64,` URL, base64 text or the file's bytes, and a file's EXIF orientation is applied (a phone photo
comes out upright), also for a PIL image opened from such a file. Then they are converted to 8-bit RGB before the
image processor: transparency is composited onto white (what a viewer shows, and what transformers' `convert_to_rgb`
does; the original's `convert("RGB")` dropped alpha, but its training images were JPEGs), 16-bit samples are scaled
by 255 / 65535, float samples (float16 and bfloat16 included) are read as [0, 1] (or [0, 255] when any value exceeds
1), palette, 1-bit, grayscale and CMYK go through Pillow's conversion. An array or tensor whose shape does not say
where its channels are (`(3, 10, 3)`) needs `input_data_format`; NaN or infinite samples are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from huggingface_hub.utils import httpx  # the HTTP client transformers' `load_image` uses
from transformers.image_utils import ChannelDimension
from transformers.utils import is_torch_tensor

EXIF_ORIENTATION = 0x0112


def _fetch_url(url: str) -> bytes:
    """The bytes at an http(s) URL, fetched as transformers' `load_image` fetches them (httpx, redirects followed)."""
    try:
        response = httpx.get(url, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPStatusError as error:
        raise ConnectionError(
            f"Could not fetch the image at {url}: the server answered HTTP {error.response.status_code}."
        ) from None
    except httpx.HTTPError as error:
        raise ConnectionError(
            f"Could not fetch the image at {url} ({type(error).__name__}: {error}). Check the address and the "
            "network, or pass the image as a file path, bytes or a PIL image."
        ) from None
    return response.content


def _base64_image(text: str) -> bytes | None:
    """The bytes `text` encodes when it is base64 of an image Pillow recognises, else None."""
    try:
        data = base64.b64decode(text, validate=True)
        PIL.Image.open(io.BytesIO(data)).close()
    except (binascii.Error, ValueError, OSError):
        return None
    return data


def _open_image(source: str | os.PathLike | bytes) -> PIL.Image.Image:
    """Opens and fully decodes an image: a file path, a URL (`http(s)://`, `data:image/...;base64,`), base64 text or
    encoded bytes, so that an unreadable one fails here with what it is and why."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        source, described = _fetch_url(source), f"the image at {source}"
    elif isinstance(source, str) and source.startswith("data:image/"):
        described = "the image data URL"
        try:  # leniently, as `load_image` does: line breaks in the base64 are skipped
            source = base64.b64decode(source.partition(",")[2])
        except (binascii.Error, ValueError):
            raise ValueError(f"Cannot read {described}: it is not valid base64.") from None
    elif isinstance(source, bytes):
        described = "the image bytes"
    elif (
        isinstance(source, str) and not os.path.exists(source) and (data := _base64_image(source)) is not None
    ):  # transformers' `load_image` also takes base64 text (a chat part's "base64" key holds it)
        source, described = data, "the base64 image data"
    else:
        described = f"image file {os.fspath(source)!r}"
        if os.path.isdir(source):
            raise IsADirectoryError(f"Cannot read {described}: it is a directory, not an image file.")
    try:
        with PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"Cannot read {described}: it does not exist.") from None
    except PermissionError:
        raise PermissionError(f"Cannot read {described}: permission denied.") from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"Cannot read {described}: it is not an image format Pillow recognises.") from None
    except OSError as error:
        if error.errno is not None:  # the file system's error (name too long, I/O error, ...), not Pillow's
            raise OSError(error.errno, f"Cannot read {described}: {error.strerror}.") from None
        raise ValueError(f"Cannot read {described}: it is corrupt or truncated ({error}).") from error
    except (SyntaxError, ValueError) as error:
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
        # float16 arithmetic would round k / 255 * 255 to a neighbouring level; float32 does not.
        samples = samples.astype(np.float32) if size < 4 else samples
        if not np.isfinite(samples).all():
            raise ValueError("The image holds NaN or infinite values; image samples must be finite.")
        low, high = (samples.min(), samples.max()) if samples.size else (0.0, 0.0)
        if low < 0 or high > 255:
            raise ValueError(f"Float image samples must lie in [0, 1] or [0, 255]; got values in [{low}, {high}].")
        scale = 255.0 if high <= 1 else 1.0
        return np.rint(samples * scale).astype(np.uint8)
    raise ValueError(f"Unsupported image sample type {samples.dtype}.")


def _array_to_image(array: np.ndarray, input_data_format: str | ChannelDimension | None = None) -> PIL.Image.Image:
    """A PIL image from an (H, W), (H, W, C) or (C, H, W) array; C = 1 (gray), 2 (gray + alpha, last only), 3, 4.

    Without `input_data_format`, the channel axis is the one whose size is a channel count; a shape where both ends
    are (`(3, 10, 3)`, `(1, 10, 3)`) is refused rather than guessed (transformers guesses channels first, with a
    warning).
    """
    if array.ndim == 3:
        channels_first, channels_last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if input_data_format is not None:
            if input_data_format not in (ChannelDimension.FIRST, ChannelDimension.LAST):  # the enum compares as str
                raise ValueError(
                    f"`input_data_format` must be 'channels_first' or 'channels_last', got {input_data_format!r}."
                )
            channels_first = input_data_format == ChannelDimension.FIRST
        elif channels_first and channels_last:
            raise ValueError(
                f"An image array of shape {tuple(array.shape)} could hold its channels first or last; pass "
                "`input_data_format='channels_first'` (C, H, W) or `'channels_last'` (H, W, C), to the processor "
                "or to `load_rgb_image`."
            )
        if channels_first:
            array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 2, 3, 4)) or 0 in array.shape:
        raise ValueError(
            f"An image array must be (height, width) or have 1-4 channels first or last; got shape {array.shape}. "
            "Pass a batch as a list of images."
        )
    samples = _samples_to_uint8(array)
    mode = {2: "L", 3: {2: "LA", 3: "RGB", 4: "RGBA"}.get(array.shape[-1])}[array.ndim]
    return PIL.Image.fromarray(np.ascontiguousarray(samples), mode=mode)


def load_rgb_image(image: Any, input_data_format: str | ChannelDimension | None = None) -> PIL.Image.Image:
    """An 8-bit RGB PIL image from a PIL image, a numpy array, a torch tensor, a file path, a URL, base64 text or
    encoded bytes.

    A file's EXIF orientation is applied, as transformers' `load_image` does (a phone photo comes out upright).
    `input_data_format` (`"channels_first"` or `"channels_last"`) says where an array's channels are when its shape
    cannot tell. See the module docstring for how transparency, 16-bit, float, palette, 1-bit, grayscale and CMYK
    images convert. Anything unreadable raises a `ValueError`, a `TypeError` or an `OSError` (`FileNotFoundError`,
    `IsADirectoryError`, `PermissionError`, `ConnectionError` for a URL that could not be fetched) naming the problem.
    """
    if isinstance(image, (str, os.PathLike, bytes)):
        image = _open_image(image)
    elif is_torch_tensor(image):
        image = image.detach().cpu()
        # numpy has no bfloat16; float32 holds bfloat16 and float16 values exactly.
        image = image.float() if image.is_floating_point() and image.element_size() < 4 else image
        image = _array_to_image(image.numpy(), input_data_format)
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, input_data_format)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(
            f"Cannot use a {type(image).__name__} as an image: pass a PIL image, a numpy array, a torch tensor, "
            "a file path, a URL or the file's bytes."
        )
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # checked first: `exif_transpose` copies even when upright
        image = PIL.ImageOps.exif_transpose(image)
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


__all__ = ["load_rgb_image"]
