"""The limits of one request to the server, and the body limit that follows from them (no heavy imports: the
command line builds its options from these defaults).

docs/serving.md shows the arithmetic of the body limit and of the server's memory.
"""

from __future__ import annotations

from dataclasses import dataclass

# The app's per-image limit (vtw_core.models.images.MAX_IMAGE_PIXELS; a test keeps the two equal).
MAX_IMAGE_PIXELS = 40_000_000
# The app takes at most 4 images per turn (app.media.MAX_IMAGES_PER_TURN; a test keeps the two equal). The server
# counts them per request: a request may replay many turns, and each image costs memory and compute alike.
MAX_IMAGES_PER_REQUEST = 4
MAX_IMAGES_PER_MESSAGE = MAX_IMAGES_PER_REQUEST  # the former name of the limit (it was per message)
# Per image, encoded (the app and the CLI take 50 MB files; a server refuses bigger uploads sooner).
SERVER_MAX_IMAGE_BYTES = 10 * 2**20
# Decoded pixels per request, summed over its images, read from the headers before any pixel is decoded:
# four 12-megapixel photos (144 MB as RGB). Each image also obeys the app's 40 megapixels.
MAX_PIXELS_PER_REQUEST = 48_000_000
# A processor that resizes the shortest side to a fixed size turns a 1-pixel strip into gigapixels: the longest
# side may be at most 50 times the shortest (a 1:20 phone screenshot passes).
MAX_ASPECT_RATIO = 50
# Containers PIL reads without outside programs (EPS would run Ghostscript, for one).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DECODED_BYTES_PER_PIXEL = 3  # RGB, as the model reads it

# How long a batch may wait for requests the recent load says are coming (vtw_core.serve.batching): a closed-loop
# client's turnaround (reply read, next request sent and decoded) takes a few ms.
DEFAULT_BATCH_FILL_MS = 10.0
MAX_BATCH_FILL_MS = 1000.0

MAX_MESSAGES = 64  # far more turns than any context holds; refuses absurd bodies before any work
MAX_PARTS_PER_MESSAGE = 64
MAX_SCHEDULE_LAYERS = 1_024
MAX_SCHEDULE_NAME_CHARS = 100
# The body limit is the largest legal request, from these parts (docs/serving.md shows the arithmetic):
# - an image part: its bytes in base64 (4/3, rounded up to 4-character groups) plus 1 KiB for the data URL's
#   prefix and the part's JSON;
# - a message: its text (4,000 characters and 12,000 UTF-8 bytes) is at most 40,000 bytes of JSON, with every
#   character escaped as \uXXXX (12 bytes for a character beyond the BMP); 48 KiB covers that and its parts;
# - 512 KiB for the rest: 4 stop sequences (4,000 characters each: 48,000 bytes as escapes), an inline
#   schedule (1,024 shares), sampling fields, indentation.
IMAGE_PART_JSON_BYTES = 1_024
MESSAGE_JSON_BYTES = 48 * 1_024
BODY_OVERHEAD_BYTES = 512 * 1_024


def base64_length(size: int) -> int:
    """Characters of `size` bytes in base64: 4 for every 3 bytes, the last group padded."""
    return 4 * ((size + 2) // 3)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may hold: images, their encoded bytes and decoded pixels; the body limit follows."""

    max_images: int = MAX_IMAGES_PER_REQUEST
    max_image_bytes: int = SERVER_MAX_IMAGE_BYTES
    max_pixels: int = MAX_PIXELS_PER_REQUEST
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.max_images < 0 or min(self.max_image_bytes, self.max_pixels, self.max_image_pixels) < 1:
            raise ValueError("max_images must be >= 0; the byte and pixel limits >= 1")

    @property
    def image_pixels(self) -> int:
        """Pixels one image may have: the per-image limit, within the request's."""
        return min(self.max_image_pixels, self.max_pixels)

    @property
    def max_request_bytes(self) -> int:
        """The largest legal body: every image at its byte limit in base64, every message at its text limit."""
        images = self.max_images * (base64_length(self.max_image_bytes) + IMAGE_PART_JSON_BYTES)
        return images + MAX_MESSAGES * MESSAGE_JSON_BYTES + BODY_OVERHEAD_BYTES

    @property
    def max_image_memory(self) -> int:
        """What the images of one request may hold at most: their encoded bytes and their decoded RGB pixels."""
        return self.max_images * self.max_image_bytes + DECODED_BYTES_PER_PIXEL * self.max_pixels


DEFAULT_LIMITS = RequestLimits()
MAX_REQUEST_BYTES = DEFAULT_LIMITS.max_request_bytes
