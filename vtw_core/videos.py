"""Videos: frames sampled with PyAV, and frame-based video processors for processors that need torchvision."""

from __future__ import annotations

from typing import Any


def frame_video_processor(family: str, settings: dict[str, Any], image_processor: Any) -> Any:
    return None
