"""Reading http(s) image URLs, for servers started with --allow-remote-images (off by default).

The server then makes requests to whatever address a client names, so only trusted deployments should
allow it; the size and time limits keep one URL from holding a worker.
"""

from __future__ import annotations

import httpx

from vtw_core.models.images import MAX_IMAGE_BYTES
from vtw_core.serve.errors import bad_request

TIMEOUT_S = 10.0


def fetch_image(url: str) -> bytes:
    """The bytes at `url` (at most MAX_IMAGE_BYTES), or a 400 saying why they could not be read."""
    try:
        with (
            httpx.Client(timeout=TIMEOUT_S, follow_redirects=True, max_redirects=3) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise bad_request(f"the image URL answered HTTP {response.status_code}", code="invalid_image")
            data = bytearray()
            for chunk in response.iter_bytes():
                data.extend(chunk)
                if len(data) > MAX_IMAGE_BYTES:
                    raise bad_request(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MB", code="invalid_image")
            return bytes(data)
    except httpx.HTTPError as error:
        raise bad_request(f"cannot read the image URL ({type(error).__name__})", code="invalid_image") from None
