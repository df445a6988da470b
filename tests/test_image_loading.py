"""load_rgb_image: every image source (PIL, arrays, tensors, paths, bytes, URLs, base64) to 8-bit RGB, EXIF
orientation as transformers' `load_image` applies it, and unreadable images refused with their reason."""

from __future__ import annotations

import base64
import http.server
import io
import os
import re
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import ChannelDimension, load_image

from visualrwkv_hf.image_loading import load_rgb_image
from visualrwkv_hf.processing_visualrwkv import VisualRWKVProcessor
from visualrwkv_hf.tokenization_rwkv_world import RwkvWorldTokenizer

QUESTION = "What color is the bus?\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))


# ---------------------------------------------------------------- conversion to RGB


def rgb_pixels(image) -> np.ndarray:
    return np.asarray(load_rgb_image(image))


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # transparent
    rgba[1, 0] = (0, 0, 255, 128)  # half blue
    pixels = rgb_pixels(Image.fromarray(rgba, "RGBA"))
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[0, 1].tolist() == [255, 255, 255]
    assert pixels[1, 0].tolist() == [127, 127, 255]
    assert rgb_pixels(Image.fromarray(np.array([[[0, 0], [90, 255]]], np.uint8), "LA")).tolist() == [
        [[255, 255, 255], [90, 90, 90]]
    ]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert rgb_pixels(palette).tolist() == [[[255, 255, 255], [40, 50, 60]]]
    assert rgb_pixels(rgba).tolist() == pixels.tolist()  # an RGBA array converts the same way


def test_high_bit_depth_and_other_modes_convert_to_rgb():
    sixteen = np.array([[0, 257 * 100, 65535]], np.uint16)
    expected = [[[0] * 3, [100] * 3, [255] * 3]]
    assert Image.fromarray(sixteen).mode == "I;16"
    assert rgb_pixels(Image.fromarray(sixteen)).tolist() == expected
    assert rgb_pixels(Image.fromarray(sixteen.astype(np.int32), "I")).tolist() == expected
    assert rgb_pixels(sixteen).tolist() == expected
    buffer = io.BytesIO()
    Image.fromarray(sixteen).save(buffer, format="PNG")
    assert rgb_pixels(buffer.getvalue()).tolist() == expected  # a real 16-bit PNG

    assert rgb_pixels(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")).tolist() == [
        [[0] * 3, [128] * 3, [255] * 3]
    ]
    assert rgb_pixels(Image.new("1", (2, 1), 1)).tolist() == [[[255] * 3] * 2]
    assert rgb_pixels(Image.new("L", (1, 1), 77)).tolist() == [[[77] * 3]]
    assert rgb_pixels(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).tolist() == [[[255, 0, 0]]]
    for mode in ("1", "L", "P", "LA", "PA", "RGBA", "RGBa", "CMYK", "YCbCr", "I;16", "I;16B", "I", "F", "RGBX"):
        assert load_rgb_image(Image.new(mode, (3, 2))).mode == "RGB", mode
    with pytest.raises(ValueError, match="mode 'La'"):  # Pillow itself cannot convert premultiplied gray + alpha
        load_rgb_image(Image.new("La", (3, 2)))


def test_arrays_and_tensors():
    hwc = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert rgb_pixels(hwc).tolist() == hwc.tolist()
    assert rgb_pixels(hwc.transpose(2, 0, 1)).tolist() == hwc.tolist()  # channels first
    assert rgb_pixels(torch.from_numpy(hwc.transpose(2, 0, 1).copy()) / 255.0).tolist() == hwc.tolist()
    assert rgb_pixels(hwc.astype(np.int64)).tolist() == hwc.tolist()
    assert rgb_pixels(hwc.astype(np.float64)).tolist() == hwc.tolist()  # floats above 1 read as 0..255
    assert rgb_pixels(np.ones((2, 2), bool)).tolist() == [[[255] * 3] * 2] * 2
    assert rgb_pixels(hwc[..., :1]).tolist() == np.repeat(hwc[..., :1], 3, axis=-1).tolist()


def test_paths_and_bytes(tmp_path, image):
    path = tmp_path / "bus.png"
    image.save(path)
    expected = np.asarray(image).tolist()
    for source in (path, str(path), path.read_bytes()):
        assert rgb_pixels(source).tolist() == expected
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=4)
    from_path = processor(images=str(path), text=QUESTION, return_tensors="pt")
    from_image = processor(images=image, text=QUESTION, return_tensors="pt")
    torch.testing.assert_close(from_path["pixel_values"], from_image["pixel_values"], rtol=0, atol=0)


# ---------------------------------------------------------------- errors


def test_unreadable_images_fail_with_their_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rgb_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="not an image format"):
        load_rgb_image(tmp_path / "notes.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:80])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_rgb_image(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="not an image format"):
        load_rgb_image(b"\x00\x01 definitely not an image")
    with pytest.raises(TypeError, match="PIL image"):
        load_rgb_image({"image": 1})
    for bad_array, message in [
        (np.zeros((2, 3, 4, 5)), "shape"),
        (np.zeros((2, 2, 7)), "shape"),
        (np.full((2, 2), 300), "0..255"),
        (np.full((2, 2), -1.0), r"\[0, 1\]"),
        (np.full((2, 2), np.nan), "NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_rgb_image(bad_array)


# ---------------------------------------------------------------- image sources: EXIF, URLs, base64, errors


def oriented_photo(tmp_path, orientation: int, image_format: str) -> tuple[bytes, np.ndarray]:
    """A file written by Pillow whose EXIF says `orientation`, and the pixels it stores (before turning)."""
    stored = Image.fromarray(np.random.default_rng(orientation).integers(0, 256, (20, 36, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format=image_format, exif=exif, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue(), np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


# What each EXIF orientation asks of the stored pixels (the TIFF/EXIF specification), as numpy operations.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_load_image_does(tmp_path, orientation, image_format):
    data, stored = oriented_photo(tmp_path, orientation, image_format)
    path = tmp_path / f"photo.{image_format.lower()}"
    path.write_bytes(data)
    data_url = f"data:image/{image_format.lower()};base64," + base64.b64encode(data).decode()
    expected = np.asarray(load_image(data_url))  # transformers' loader, as it reads URLs
    assert expected.tolist() == np.ascontiguousarray(UPRIGHT[orientation](stored)).tolist()
    assert expected.shape[:2] == ((36, 20) if orientation >= 5 else (20, 36))
    wrapped_data_url = data_url[:40] + "\n" + data_url[40:]  # base64 broken into lines, as some encoders write it
    sources = (path, str(path), data, data_url, wrapped_data_url, base64.b64encode(data).decode(), Image.open(path))
    for source in sources:
        assert rgb_pixels(source).tolist() == expected.tolist()
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=4)
    torch.testing.assert_close(
        processor(images=str(path), text=QUESTION, return_tensors="pt")["pixel_values"],
        processor(images=Image.fromarray(expected), text=QUESTION, return_tensors="pt")["pixel_values"],
        rtol=0, atol=0,
    )


class ImageServer:
    """A local HTTP server (no network needed): `/NAME` serves `files[NAME]`, anything else is a 404."""

    def __init__(self, files: dict[str, bytes]):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the standard library's name)
                body = files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body if body is not None else b"not found")

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_urls_load_like_files_and_fail_clearly(tmp_path):
    photo, _ = oriented_photo(tmp_path, 6, "JPEG")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, :, 3] = 200, 255  # top half opaque red, bottom half transparent
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    with ImageServer({"photo.jpg": photo, "clear.png": buffer.getvalue(), "page.html": b"<html></html>"}) as server:
        # The same upright image as transformers' loader gives for the URL, and as the file gives.
        photo_url = f"{server.url}/photo.jpg"
        assert rgb_pixels(photo_url).tolist() == np.asarray(load_image(photo_url)).tolist()
        assert rgb_pixels(photo_url).tolist() == rgb_pixels(photo).tolist()
        # Transparency on white, as for a file (transformers' loader drops the alpha channel: black).
        assert rgb_pixels(f"{server.url}/clear.png").tolist() == rgb_pixels(buffer.getvalue()).tolist()
        assert rgb_pixels(f"{server.url}/clear.png")[3, 0].tolist() == [255, 255, 255]
        with pytest.raises(ConnectionError, match=r"Could not fetch the image at .*/missing.png: .*HTTP 404"):
            load_rgb_image(f"{server.url}/missing.png")
        with pytest.raises(ValueError, match="the image at .*/page.html: it is not an image format"):
            load_rgb_image(f"{server.url}/page.html")
    url = f"http://127.0.0.1:{closed_port()}/x.png"
    with pytest.raises(ConnectionError, match=re.escape(f"Could not fetch the image at {url} (ConnectError")):
        load_rgb_image(url)
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=4)
    with pytest.raises(ConnectionError, match="Could not fetch"):
        processor(images=url, text=QUESTION)
    with pytest.raises(ValueError, match="not valid base64"):
        load_rgb_image("data:image/png;base64,abcde")


def test_directories_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(f"image file {str(tmp_path)!r}: it is a directory")):
        load_rgb_image(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer())(images=str(tmp_path), text=QUESTION)
    with pytest.raises(FileNotFoundError, match="'abcd': it does not exist"):  # valid base64, but not an image
        load_rgb_image("abcd")
    with pytest.raises(OSError, match="A'. File name too long"):
        load_rgb_image("A" * 400)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission_is_named(tmp_path, image):
    path = tmp_path / "locked.png"
    image.save(path)
    path.chmod(0)
    with pytest.raises(PermissionError, match="locked.png'. permission denied"):
        load_rgb_image(path)


# ---------------------------------------------------------------- tensors: precision, channels, NaN


def test_half_precision_tensors_give_the_float32_result():
    chw = torch.from_numpy(np.random.default_rng(2).random((3, 9, 11), dtype=np.float32))
    exact = rgb_pixels(chw).astype(int)
    for dtype in (torch.bfloat16, torch.float16):
        low = chw.to(dtype)
        assert rgb_pixels(low).tolist() == rgb_pixels(low.float()).tolist()  # the values it holds, exactly
        assert np.abs(rgb_pixels(low).astype(int) - exact).max() <= 1  # its rounding only
        assert rgb_pixels(low.numpy() if dtype == torch.float16 else low.float().numpy()).tolist() == rgb_pixels(
            low
        ).tolist()
    levels = torch.arange(256, dtype=torch.float32).reshape(1, 16, 16) / 255  # every 8-bit level survives
    assert rgb_pixels(levels.to(torch.bfloat16))[..., 0].flatten().tolist() == list(range(256))
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=4)
    torch.testing.assert_close(
        processor(images=chw.to(torch.bfloat16), return_tensors="pt")["pixel_values"],
        processor(images=chw.to(torch.bfloat16).float(), return_tensors="pt")["pixel_values"],
        rtol=0, atol=0,
    )


def test_ambiguous_channel_axis_is_refused_unless_named():
    hwc = np.random.default_rng(3).integers(0, 256, (3, 10, 3), dtype=np.uint8)  # 3 rows, 10 columns, RGB
    with pytest.raises(ValueError, match=re.escape("shape (3, 10, 3) could hold its channels first or last")):
        load_rgb_image(hwc)
    with pytest.raises(ValueError, match="input_data_format='channels_first'"):
        load_rgb_image(torch.from_numpy(hwc))
    assert rgb_pixels_as(hwc, "channels_last").tolist() == hwc.tolist()
    assert rgb_pixels_as(hwc, ChannelDimension.FIRST).tolist() == hwc.transpose(1, 2, 0).tolist()
    gray_column = np.arange(10, dtype=np.uint8).reshape(1, 10, 1)  # one row of 10 gray pixels, or 10 x 1
    assert rgb_pixels_as(gray_column, "channels_last").shape == (1, 10, 3)
    assert rgb_pixels_as(gray_column, "channels_first").shape == (10, 1, 3)
    with pytest.raises(ValueError, match="'channels_first' or 'channels_last'"):
        load_rgb_image(hwc, input_data_format="sideways")
    # Through the processor: `input_data_format` reaches the conversion.
    processor = VisualRWKVProcessor(tokenizer=RwkvWorldTokenizer(), num_image_tokens=4)
    with pytest.raises(ValueError, match="could hold its channels first or last"):
        processor(images=hwc, text=QUESTION)
    torch.testing.assert_close(
        processor(images=hwc, text=QUESTION, input_data_format="channels_last", return_tensors="pt")["pixel_values"],
        processor(images=Image.fromarray(hwc), text=QUESTION, return_tensors="pt")["pixel_values"],
        rtol=0, atol=0,
    )
    chw = torch.from_numpy(hwc.transpose(2, 0, 1).copy())
    torch.testing.assert_close(
        processor(images=chw, text=QUESTION, input_data_format="channels_first", return_tensors="pt")["pixel_values"],
        processor(images=Image.fromarray(hwc), text=QUESTION, return_tensors="pt")["pixel_values"],
        rtol=0, atol=0,
    )


def rgb_pixels_as(image, input_data_format) -> np.ndarray:
    return np.asarray(load_rgb_image(image, input_data_format=input_data_format))
