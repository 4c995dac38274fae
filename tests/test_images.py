"""Image loading: every kind of bad file gives an InputError that says what is wrong."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vtw_core.errors import InputError
from vtw_core.models.images import load_image


def png_bytes(size=(8, 6), mode="RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 255) if mode == "RGBA" else 128).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: decoding it would need width*height*3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def test_loads_paths_bytes_and_pil_images_as_rgb(tmp_path):
    path = tmp_path / "shape.png"
    path.write_bytes(png_bytes())
    for source in (path, str(path), png_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (8, 6)
    assert load_image(png_bytes(mode="L")).getpixel((0, 0)) == (128, 128, 128)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not pixels")
    with pytest.raises(InputError, match="not an image"):
        load_image(path)


def test_truncated_image(tmp_path):
    path = tmp_path / "cut.png"
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(path)


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(png_header_only(100_000, 100_000))
    # Under PIL's own bomb threshold but over ours: refused from the header alone (the data is 16 bytes).
    with pytest.raises(InputError, match="10000x5000 pixels; at most 40,000,000"):
        load_image(png_header_only(10_000, 5_000))


def test_pixel_limit_is_an_argument():
    with pytest.raises(InputError, match="at most 40 pixels"):
        load_image(png_bytes(), max_pixels=40)
    assert load_image(png_bytes(), max_pixels=48).size == (8, 6)


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    level = round(0.46 * 65535)
    image = Image.fromarray(np.full((4, 5), level, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    for source in (image, _png(image)):
        assert load_image(source).getpixel((0, 0)) == (round(level / 257),) * 3  # 117, not 255


def test_float_images_are_scaled_from_unit_range():
    image = Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32))
    assert load_image(image).getpixel((1, 1)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (100, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 20))  # a blue band at the top as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phone cameras write it
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    loaded = load_image(buffer.getvalue())
    assert loaded.size == (200, 100)  # what a browser shows
    red, _green, blue = loaded.getpixel((190, 50))  # the band now sits on the right
    assert blue > 200 and red < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white(mode):
    image = Image.new("RGBA", (6, 6), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = image.getpixel((5, 5))
    loaded = load_image(_png(image, transparency=image.info["transparency"]) if mode == "P" else _png(image))
    assert loaded.getpixel((5, 5)) == (255, 255, 255)  # transparent black shows as the page's white
    assert loaded.getpixel((0, 0)) == ((255, 0, 0) if mode != "LA" else (76, 76, 76))
