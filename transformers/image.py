"""Built-in image step: JPEG or PNG file bytes -> the normalised NCHW pixels an ImageNet-style
classifier takes (resize the shorter side, centre-crop, scale to [0, 1], subtract the mean and
divide by the standard deviation of each channel):

    [[pipeline.preprocess]]
    class = "ember.transformers.image:DecodeImage"
    kwargs = { size = 224, resize = 256 }
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from ember.transformers.step import BadInput, Spec, Tensors

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"

# Only to name what a client sent instead of a JPEG or PNG; none of these is ever parsed.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# What Pillow raises on hostile or broken files is not a closed set: its parsers let
# IndexError, KeyError, struct.error and the like escape from a truncated header, SyntaxError
# means "not this format", OSError a broken or truncated stream, ValueError an oversized chunk.
# All of them are the file's fault, so all are the client's 400, never a 500.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    # A warning only reaches here as an exception when warnings are turned into errors.
    Image.DecompressionBombWarning,
)


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _triple(name: str, value: Sequence[float]) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three numbers, got {value!r}") from None
    if array.shape != (3,) or not np.isfinite(array).all():
        raise ValueError(f"{name} must be three finite numbers (R, G, B), got {value!r}")
    return array


def _format_name(data: bytes) -> str | None:
    for signature, name in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


class DecodeImage:
    """BYTES images [N] (each a JPEG or PNG file) -> FP32 [N, 3, size, size].

    Each image is converted to RGB (palette, grayscale, CMYK and 16-bit images included; an
    alpha channel is dropped, not composited), its shorter side resized to `resize` with
    Pillow's bilinear filter (which antialiases when shrinking), centre-cropped to
    `size` x `size`, scaled to [0, 1] and normalised per channel by `mean` and `std`. The
    defaults are the ImageNet evaluation transform.

    Limits: a file over `max_bytes`, or one whose header declares more than `max_pixels`,
    is refused before any pixel is decoded, so a small file claiming a huge canvas costs
    nothing. These limits replace Pillow's process-wide `Image.MAX_IMAGE_PIXELS` for this
    step: the plugin classes are used directly, which is also what restricts parsing to JPEG
    and PNG (the other formats' parsers never see the data).

    An empty request (no images) is refused with BadInput, as Tokenize refuses one.

    Thread safety: `__call__` keeps no state between calls and every image object it makes is
    its own, so one instance may be called from several threads at once; Pillow releases the
    GIL while it decodes and resizes.
    """

    def __init__(
        self,
        *,
        model_dir: Path | str,
        input: str = "image",
        output: str = "pixels",
        size: int = 224,
        resize: int = 256,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        max_pixels: int = 40_000_000,
        max_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        del model_dir  # nothing to read
        self.input = input
        self.output = output
        self.size = _positive("size", size)
        self.resize = _positive("resize", resize)
        if self.resize < self.size:
            # The crop would not fit inside the resized image's shorter side.
            raise ValueError(f"resize ({self.resize}) must be at least size ({self.size})")
        self.mean = _triple("mean", mean)
        self.std = _triple("std", std)
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {std!r}")
        self.max_pixels = _positive("max_pixels", max_pixels)
        self.max_bytes = _positive("max_bytes", max_bytes)
        self.consumes: Sequence[Spec] = (Spec(input, "BYTES", (-1,)),)
        self.produces: Sequence[Spec] = (Spec(output, "FP32", (-1, 3, self.size, self.size)),)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        array = tensors.get(self.input)
        if array is None:
            raise BadInput(f"input '{self.input}' is missing")
        if array.ndim != 1:
            raise BadInput(
                f"input '{self.input}' must be one image per row, got shape {array.shape}"
            )
        if array.shape[0] == 0:
            raise BadInput(f"input '{self.input}' holds no images: send at least one")
        pixels = np.empty((array.shape[0], 3, self.size, self.size), dtype=np.float32)
        for index, element in enumerate(array.tolist()):
            rgb = self._decode(index, element)
            pixels[index] = self._normalise(rgb)
        return {self.output: pixels}

    def _where(self, index: int) -> str:
        return f"input '{self.input}' element {index}"

    def _decode(self, index: int, element: object) -> Image.Image:
        where = self._where(index)
        if isinstance(element, bytearray | memoryview):
            element = bytes(element)
        if not isinstance(element, bytes):
            raise BadInput(
                f"{where} is {type(element).__name__}, expected the bytes of a JPEG or PNG file"
            )
        if not element:
            raise BadInput(f"{where} is empty, expected the bytes of a JPEG or PNG file")
        if len(element) > self.max_bytes:
            raise BadInput(f"{where}: {len(element)} bytes exceeds the limit of {self.max_bytes}")
        if element.startswith(_PNG_SIGNATURE):
            plugin: type[ImageFile.ImageFile] = PngImagePlugin.PngImageFile
        elif element.startswith(_JPEG_SIGNATURE):
            plugin = JpegImagePlugin.JpegImageFile
        else:
            other = _format_name(element)
            found = f"a {other} file" if other else "not a JPEG or PNG file"
            raise BadInput(f"{where} is {found}, expected JPEG or PNG")
        try:
            # The plugin class reads the header only (IHDR, or the JPEG markers up to the first
            # scan): the size is known here and no pixel buffer exists yet.
            image = plugin(io.BytesIO(element))
        except _DECODE_ERRORS as exc:
            raise BadInput(f"{where} is not a readable JPEG or PNG file: {exc}") from None
        with image:
            width, height = image.size
            if width * height > self.max_pixels:
                raise BadInput(
                    f"{where}: {width}x{height} pixels exceeds the limit of {self.max_pixels}"
                )
            try:
                image.load()
                return self._resized(self._rgb(image))
            except _DECODE_ERRORS as exc:
                raise BadInput(f"{where} is not a readable JPEG or PNG file: {exc}") from None

    @staticmethod
    def _rgb(image: Image.Image) -> Image.Image:
        if image.mode.startswith("I;16"):
            # Pillow's own conversion clips 16-bit values at 255 instead of scaling them, which
            # turns almost every 16-bit grayscale PNG white.
            wide = np.asarray(image, dtype=np.uint16).astype(np.float32)
            eight = np.rint(wide / 257.0).astype(np.uint8)
            image = Image.fromarray(eight)
        if image.mode == "RGB":
            return image
        # The alpha channel is dropped anyway, and a palette's transparency stored as bytes
        # makes Pillow warn on every conversion to RGB.
        image.info.pop("transparency", None)
        return image.convert("RGB")

    def _resized(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        # The longer side is truncated, not rounded, as torchvision's Resize(int) does, so the
        # crop lands where the reference evaluation transform puts it.
        if width <= height:
            resized = (self.resize, self.resize * height // width)
        else:
            resized = (self.resize * width // height, self.resize)
        left = round((resized[0] - self.size) / 2)
        top = round((resized[1] - self.size) / 2)
        scale_x = width / resized[0]
        scale_y = height / resized[1]
        # Only the crop is resampled, from its box in the original: the same sample positions
        # and filter width as resizing the whole image and then cropping (pixels differ by at
        # most one level of 255, from rounding), but the work and memory are those of the crop.
        # Resizing first would let a 1 x 40,000,000 image ask for a 256 x 10^10 canvas.
        box = (
            left * scale_x,
            top * scale_y,
            (left + self.size) * scale_x,
            (top + self.size) * scale_y,
        )
        return image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)

    def _normalise(self, image: Image.Image) -> np.ndarray:
        hwc = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        normalised: np.ndarray = (hwc - self.mean) / self.std
        return normalised.transpose(2, 0, 1)
