"""Loading user images safely: clear errors for missing, non-image, corrupt and oversized files.

The model must see the image the user sees: EXIF orientation is applied (as browsers do), 16-bit and float
pixels are scaled to 8 bits instead of clipped, and transparency is composited onto white (what
transformers' `convert_to_rgb` does for the processors we load).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vtw_core.errors import InputError

# 40 megapixels: far above any model's input resolution, far below a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 50 * 1024 * 1024

ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a path, raw bytes or a PIL image; InputError with a readable reason otherwise."""
    if isinstance(source, Image.Image):
        image = source
        _check_size(image.size, max_pixels, "image")
        return to_rgb(image)
    if isinstance(source, bytes):
        name, data = "uploaded image", source
    else:
        path = Path(source)
        name = path.name
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise InputError(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
        data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, max_pixels, name)  # before decoding a single pixel
            image.load()
    except InputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise InputError(f"{name} is too large to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        raise InputError(f"{name} is not an image (PNG, JPEG, WebP, ...)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{name} is corrupt or truncated ({error})") from error
    return to_rgb(image)


def image_header_size(
    data: bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    *,
    name: str = "uploaded image",
    formats: tuple[str, ...] | None = None,
    max_aspect_ratio: float | None = None,
) -> tuple[int, int]:
    """(width, height) of encoded image bytes, read from the header only: no pixel is decoded.

    The same checks as `load_image` runs before decoding (an image PIL can read, at most `max_pixels`), plus
    optional ones for servers: the container `formats` accepted (PIL's names, e.g. "PNG") and the longest side
    at most `max_aspect_ratio` times the shortest (a processor that resizes the shortest side to a fixed size
    would otherwise blow a 1-pixel-high strip up to gigapixels). InputError with a readable reason otherwise.
    """
    if formats is not None:
        Image.init()  # every plugin registered: PIL looks the named formats up
        formats = tuple(kind for kind in formats if kind in Image.OPEN)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as image:
                size = image.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise InputError(f"{name} is too large to decode safely ({error})") from error
    except UnidentifiedImageError as error:
        if formats:
            kinds = " or ".join([", ".join(formats[:-1]), formats[-1]] if len(formats) > 1 else formats)
            raise InputError(f"{name} is not a {kinds} image") from error
        raise InputError(f"{name} is not an image (PNG, JPEG, WebP, ...)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{name} is corrupt or truncated ({error})") from error
    _check_size(size, max_pixels, name)
    width, height = size
    if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
        raise InputError(f"{name} is {width}x{height} pixels; its sides may differ by at most {max_aspect_ratio:g}x")
    return size


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as displayed: EXIF-oriented, high bit depths scaled, transparency over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG, TIFF); Pillow's own conversion clips at 255 instead of scaling.
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        # Float images: [0, 1] when they fit in it (the usual convention), else 0..255.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(pixels, initial=0.0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.round(np.nan_to_num(pixels) * scale), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"{name} is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted")
