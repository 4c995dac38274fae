"""Loading user images safely: clear errors for missing, non-image, corrupt and oversized files."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

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
        return image.convert("RGB")
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
        raise InputError(f"{name} is not an image PIL can read") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{name} is corrupt or truncated ({error})") from error
    return image.convert("RGB")


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(f"{name} is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted")
