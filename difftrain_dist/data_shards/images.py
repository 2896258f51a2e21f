"""Image preparation for shards: decode, orient, convert to 8-bit RGB, fit to a bucket, encode.

Pure PIL/numpy; no torch. Every function raises (never returns a half-made image); the caller
decides to skip the input.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
JPEG_QUALITY = 95
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_UNSUPPORTED_MODES = frozenset({"F", "LAB", "HSV"})

# Errors PIL raises on undecodable, truncated or hostile files.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    Image.DecompressionBombError,
)


def open_oriented(data: bytes) -> Image.Image:
    """Decode image bytes fully and apply the EXIF orientation tag.

    Returns:
        The image as displayed (size is (width, height) after rotation), any PIL mode.

    Raises:
        ValueError: for zero bytes. Any of `DECODE_ERRORS` for undecodable or truncated data.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any supported PIL mode to 8-bit "RGB".

    - alpha (RGBA, LA, PA) and palette/grey images with a transparent colour: composited on white;
    - 16/32-bit integer grey ("I;16*", "I"): scaled to 8 bits (value / 257; "I" images whose
      maximum is <= 255 are taken as already 8-bit) — PIL's own conversion clips instead;
    - L, 1, P, CMYK, YCbCr, RGBX: PIL's conversion.

    Raises:
        ValueError: for modes with no meaningful 8-bit RGB reading ("F", "LAB", "HSV").
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _UNSUPPORTED_MODES:
        raise ValueError(f"unsupported image mode {mode}")
    if mode in _INT_MODES:
        values = np.asarray(img).astype(np.float64)
        scale = 1.0 if mode == "I" and values.max(initial=0.0) <= 255 else 257.0
        grey = np.clip(np.rint(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale `img` to cover `bucket` = (width, height) px and centre-crop to it (LANCZOS)."""
    return ImageOps.fit(img, bucket, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an "RGB" image at `quality` (1-95)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
