"""DecodeImage: JPEG/PNG bytes -> normalised NCHW pixels, and every way a file can be refused."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from ember.transformers.image import DecodeImage
from ember.transformers.step import BadInput, Spec

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _jpeg(width: int = 320, height: int = 240, seed: int = 0) -> bytes:
    return _encode(_noise(width, height, seed), "JPEG", quality=90)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, followed by a few bytes of pixel
    data: anything that decodes it before checking the size would allocate the full canvas."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _request(*images: bytes | object) -> dict[str, np.ndarray]:
    array = np.empty(len(images), dtype=object)
    array[:] = list(images)
    return {"image": array}


@pytest.fixture
def step(tmp_path: Path) -> DecodeImage:
    return DecodeImage(model_dir=tmp_path)


def _expected_solid(rgb: tuple[int, int, int], size: int = 224) -> np.ndarray:
    channel = (np.array(rgb, dtype=np.float64) / 255.0 - MEAN) / STD
    return np.broadcast_to(channel[:, None, None], (3, size, size))


# --- what it declares and produces -----------------------------------------------------------


def test_declares_bytes_in_and_nchw_fp32_out(tmp_path: Path) -> None:
    step = DecodeImage(model_dir=tmp_path, input="photo", output="x", size=128, resize=160)
    assert list(step.consumes) == [Spec("photo", "BYTES", (-1,))]
    assert list(step.produces) == [Spec("x", "FP32", (-1, 3, 128, 128))]
    out = step({"photo": _request(_jpeg())["image"]})
    assert set(out) == {"x"}
    assert out["x"].shape == (1, 3, 128, 128) and out["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("width", "height"), [(320, 240), (240, 320), (224, 224), (1000, 60), (60, 1000), (225, 999)]
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_any_size_gives_the_model_shape(
    step: DecodeImage, fmt: str, width: int, height: int
) -> None:
    out = step(_request(_encode(_noise(width, height), fmt)))["pixels"]
    assert out.shape == (1, 3, 224, 224)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.isfinite(out).all()


def test_smaller_than_the_crop_is_upscaled(step: DecodeImage) -> None:
    out = step(_request(_encode(_noise(17, 9), "PNG")))["pixels"]
    assert out.shape == (1, 3, 224, 224)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_solid_colour_is_normalised_per_channel(step: DecodeImage, fmt: str) -> None:
    colour = (10, 200, 30)
    options = {"quality": 100} if fmt == "JPEG" else {}
    data = _encode(Image.new("RGB", (300, 200), colour), fmt, **options)
    out = step(_request(data))["pixels"][0]
    # PNG is lossless; JPEG's colour conversion may move a channel by a level or two.
    tolerance = 1e-5 if fmt == "PNG" else 2.5 / 255 / STD.min()
    assert np.abs(out - _expected_solid(colour)).max() <= tolerance


def _rgba(colour: tuple[int, int, int]) -> Image.Image:
    # Alpha is dropped, not composited: the colour under a half-transparent pixel is kept.
    return Image.new("RGBA", (250, 260), (*colour, 128))


def _palette(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (270, 230), 3)
    image.putpalette([0, 0, 0] * 3 + list(colour) + [255, 255, 255] * 252)
    # Transparency stored as bytes: Pillow warns when such an image goes to RGB directly.
    image.info["transparency"] = bytes([255] * 3 + [0] + [255] * 252)
    return image


def _gray(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("L", (240, 330), colour[0])


def _gray_alpha(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("LA", (240, 330), (colour[0], 7))


def _gray16(colour: tuple[int, int, int]) -> Image.Image:
    # Full-range 16-bit: Pillow's own conversion would clip this to 255 (white).
    return Image.fromarray(np.full((230, 250), colour[0] * 257, dtype=np.uint16))


def _bilevel(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("1", (300, 300), 1 if colour[0] else 0)


@pytest.mark.parametrize(
    ("make", "colour"),
    [
        (_rgba, (10, 200, 30)),
        (_palette, (250, 5, 128)),
        (_gray, (77, 77, 77)),
        (_gray_alpha, (140, 140, 140)),
        (_gray16, (100, 100, 100)),
        (_bilevel, (255, 255, 255)),
    ],
    ids=["RGBA", "palette", "grayscale", "grayscale+alpha", "16-bit grayscale", "1-bit"],
)
def test_png_modes_become_rgb(
    step: DecodeImage,
    make: Callable[[tuple[int, int, int]], Image.Image],
    colour: tuple[int, int, int],
) -> None:
    data = _encode(make(colour), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = step(_request(data))["pixels"][0]
    assert np.abs(out - _expected_solid(colour)).max() <= 1e-5


def test_jpeg_grayscale_and_cmyk(step: DecodeImage) -> None:
    gray = _encode(Image.new("L", (200, 300), 90), "JPEG", quality=100)
    out = step(_request(gray))["pixels"][0]
    assert np.abs(out - _expected_solid((90, 90, 90))).max() <= 1.5 / 255 / STD.min()
    # Pure cyan ink: Pillow's naive CMYK -> RGB gives (0, 255, 255).
    cmyk = _encode(Image.new("CMYK", (300, 200), (255, 0, 0, 0)), "JPEG", quality=100)
    out = step(_request(cmyk))["pixels"][0]
    assert np.abs(out - _expected_solid((0, 255, 255))).max() <= 3.5 / 255 / STD.min()


def test_custom_normalisation_and_sizes(tmp_path: Path) -> None:
    step = DecodeImage(
        model_dir=tmp_path, size=16, resize=20, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    )
    out = step(_request(_encode(Image.new("RGB", (50, 40), (51, 102, 255)), "PNG")))["pixels"]
    assert out.shape == (1, 3, 16, 16)
    assert np.allclose(out[0, :, 0, 0], [0.2, 0.4, 1.0], atol=1e-6)


def test_the_crop_is_the_centre_of_the_resized_image(step: DecodeImage) -> None:
    # 512 x 256 is already 256 on its shorter side: the crop is columns 144..367, so the
    # left half (red) and right half (blue) each fill exactly 112 columns.
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[:, :256] = (255, 0, 0)
    pixels[:, 256:] = (0, 0, 255)
    out = step(_request(_encode(Image.fromarray(pixels), "PNG")))["pixels"][0]
    red = (1.0 - MEAN[0]) / STD[0]
    assert np.allclose(out[0, :, :112], red, atol=1e-5)
    assert np.allclose(out[0, :, 112:], -MEAN[0] / STD[0], atol=1e-5)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (333, 1000), (257, 256)])
def test_matches_resizing_the_whole_image_then_cropping(
    step: DecodeImage, width: int, height: int
) -> None:
    """The reference evaluation transform, computed the slow way with Pillow: resize the
    shorter side to 256 (the longer one truncated), crop the centre 224, normalise."""
    image = _noise(width, height, seed=width)
    short = min(width, height)
    resized = (256 * width // short, 256 * height // short)
    full = image.resize(resized, Image.Resampling.BILINEAR)
    left = round((resized[0] - 224) / 2)
    top = round((resized[1] - 224) / 2)
    crop = np.asarray(full.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    expected = ((crop / 255.0 - MEAN) / STD).transpose(2, 0, 1)
    out = step(_request(_encode(image, "PNG")))["pixels"][0]
    # Resampling only the crop's box rounds a few pixels differently, by one level at most.
    difference = np.abs(out - expected)
    assert difference.max() <= 1.01 / 255 / STD.min()
    assert (difference > 1e-5).mean() < 0.01


@pytest.mark.parametrize(("width", "height"), [(1, 200_000), (200_000, 1)])
def test_an_extreme_aspect_ratio_costs_only_the_crop(
    step: DecodeImage, width: int, height: int
) -> None:
    # Resized whole, 1 x 200000 would become 256 x 51,200,000 (39 GB of RGB) before the crop.
    data = _encode(_noise(width, height), "PNG")
    started = time.perf_counter()
    out = step(_request(data))["pixels"]
    assert time.perf_counter() - started < 1.0
    assert out.shape == (1, 3, 224, 224) and np.isfinite(out).all()


def test_several_images_in_one_request(step: DecodeImage) -> None:
    images = [_jpeg(320, 240, seed=1), _encode(_rgba((1, 2, 3)), "PNG"), _jpeg(100, 700, seed=2)]
    together = step(_request(*images))["pixels"]
    assert together.shape == (3, 3, 224, 224)
    for index, image in enumerate(images):
        alone = step(_request(image))["pixels"][0]
        assert np.array_equal(together[index], alone)


def test_one_instance_serves_several_threads(step: DecodeImage) -> None:
    images = [_jpeg(300 + 10 * i, 260, seed=i) for i in range(8)]
    expected = [step(_request(image))["pixels"] for image in images]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda image: step(_request(image))["pixels"], images * 3))
    for index, pixels in enumerate(got):
        assert np.array_equal(pixels, expected[index % len(images)])


def test_bytes_like_elements_are_accepted(step: DecodeImage) -> None:
    data = _jpeg()
    expected = step(_request(data))["pixels"]
    assert np.array_equal(step(_request(bytearray(data)))["pixels"], expected)
    assert np.array_equal(step(_request(np.bytes_(data)))["pixels"], expected)


# --- the pixel limit, checked from the header ------------------------------------------------


def test_a_huge_canvas_is_refused_from_its_header(
    step: DecodeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _huge_png_header(20000, 20000)
    assert len(data) < 200
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy(image: ImageFile.ImageFile) -> Any:
        loads.append(image)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(BadInput) as caught:
            step(_request(data))
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value) == (
        "input 'image' element 0: 20000x20000 pixels exceeds the limit of 40000000"
    )
    # Refused before decoding: Pillow was never asked for the pixels (the canvas, 1.6 GB of
    # memory, is only allocated by load()), and nothing large was allocated from Python.
    assert loads == []
    assert peak < 2 * 1024 * 1024
    assert elapsed < 1.0


def test_the_pixel_limit_is_inclusive_and_configurable(tmp_path: Path) -> None:
    image = _encode(_noise(100, 50), "PNG")
    assert DecodeImage(model_dir=tmp_path, max_pixels=5000)(_request(image))["pixels"].shape[0] == 1
    with pytest.raises(BadInput, match=r"element 0: 100x50 pixels exceeds the limit of 4999$"):
        DecodeImage(model_dir=tmp_path, max_pixels=4999)(_request(image))


def test_a_huge_jpeg_header_is_refused_too(step: DecodeImage) -> None:
    # A real 8x8 JPEG with its frame header (SOF0) rewritten to claim 30000 x 30000.
    data = bytearray(_jpeg(8, 8))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    with pytest.raises(BadInput, match="element 0: 30000x30000 pixels exceeds the limit"):
        step(_request(bytes(data)))


def test_pillows_own_bomb_limit_does_not_apply(
    step: DecodeImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's max_pixels replaces Pillow's process-wide limit, whose warning would
    otherwise reach clients as a 500 wherever warnings are errors."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert step(_request(_jpeg(320, 240)))["pixels"].shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    "error",
    [Image.DecompressionBombError("too big"), Image.DecompressionBombWarning("too big")],
    ids=["error", "warning as error"],
)
def test_a_decompression_bomb_from_pillow_is_a_bad_input(
    step: DecodeImage, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def explode(image: ImageFile.ImageFile) -> None:
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", explode)
    with pytest.raises(BadInput, match=r"input 'image' element 0 .*too big"):
        step(_request(_jpeg()))


# --- files that are refused ------------------------------------------------------------------


def _truncated_jpeg() -> bytes:
    data = _jpeg(640, 480)
    return data[: len(data) // 2]


def _corrupt_png() -> bytes:
    data = bytearray(_encode(_noise(64, 64), "PNG"))
    data[40:60] = b"\x00" * 20  # inside IHDR/IDAT: the CRC or the zlib stream breaks
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "is empty"),
        (b"not an image at all", "not a JPEG or PNG file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable JPEG or PNG file"),
        (b"\xff\xd8\xff" + b"\x00" * 40, "not a readable JPEG or PNG file"),
        (_jpeg()[:200], "not a readable JPEG or PNG file"),
        (_truncated_jpeg(), "not a readable JPEG or PNG file"),
        (_corrupt_png(), "not a readable JPEG or PNG file"),
        (_encode(_noise(40, 40), "GIF"), "is a GIF file, expected JPEG or PNG"),
        (_encode(_noise(40, 40), "BMP"), "is a BMP file, expected JPEG or PNG"),
        (_encode(_noise(40, 40), "TIFF"), "is a TIFF file, expected JPEG or PNG"),
        (_encode(_noise(40, 40), "WEBP"), "is a WebP file, expected JPEG or PNG"),
    ],
    ids=[
        "empty",
        "text",
        "png-signature-only",
        "jpeg-signature-only",
        "first-200-bytes-of-a-jpeg",
        "half-a-jpeg",
        "corrupt-png",
        "gif",
        "bmp",
        "tiff",
        "webp",
    ],
)
def test_bad_files_are_refused_naming_the_element(
    step: DecodeImage, data: bytes, fragment: str
) -> None:
    good = _jpeg(seed=9)
    with pytest.raises(BadInput) as caught:
        step(_request(good, good, data))
    message = str(caught.value)
    assert message.startswith("input 'image' element 2"), message
    assert fragment in message


def test_a_file_over_max_bytes_is_refused_before_parsing(tmp_path: Path) -> None:
    step = DecodeImage(model_dir=tmp_path, max_bytes=1000)
    data = _jpeg()
    with pytest.raises(BadInput, match=f"element 0: {len(data)} bytes exceeds the limit of 1000"):
        step(_request(data))


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({}, "input 'image' is missing"),
        ({"image": np.empty(0, dtype=object)}, "holds no images"),
        ({"image": np.array([[b"x"]], dtype=object)}, "one image per row"),
        (_request("a string"), "element 0 is str, expected the bytes"),
        (_request(None), "element 0 is NoneType"),
    ],
)
def test_bad_requests(step: DecodeImage, tensors: dict[str, np.ndarray], fragment: str) -> None:
    with pytest.raises(BadInput, match=fragment):
        step(tensors)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"size": 0}, "size must be a positive integer"),
        ({"size": 224, "resize": 200}, r"resize \(200\) must be at least size \(224\)"),
        ({"mean": (0.5, 0.5)}, "mean must be three finite numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"std": "abc"}, "std must be three"),
        ({"max_pixels": True}, "max_pixels must be a positive integer"),
    ],
)
def test_bad_settings_fail_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        DecodeImage(model_dir=tmp_path, **kwargs)
