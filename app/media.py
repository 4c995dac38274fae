"""What a turn may carry: upload checks for images and videos, the video limits, and the bundled examples.

Images and videos are only read from the upload folder and the bundled assets; a video is decoded once when
the turn is asked, so a corrupt, huge or overlong file gets a clear message before any model work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.session import ChatState
from vtw_core.analysis.units import format_per_frame
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import default_model
from vtw_core.models.families import SUPPORTED_FAMILIES, VIDEO_FAMILIES
from vtw_core.models.images import load_image
from vtw_core.models.videos import Video, check_num_frames, read_video

MAX_IMAGES_PER_TURN = 4
MAX_VIDEOS_PER_TURN = 1  # one upload box; a video is already hundreds to thousands of vision tokens
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = ASSETS / "examples"
EXAMPLE_QUESTIONS = {
    "easyvqa-0": "what is the red shape?",
    "easyvqa-1": "what is the color of the rectangle?",
    "easyvqa-2": "is there a rectangle?",
    "astronaut": "Who or what is in this picture?",
    "coffee": "What is on the table?",
    "chelsea": "What animal is this, and what colour is it?",
    "rocket": "What is happening in this photo?",
}


def check_upload_path(path: str | Path, allowed_roots: list[Path], kind: str = "images") -> Path:
    """The path, resolved, if it lies under one of the allowed folders (uploads, assets); else InputError."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in allowed_roots):
        raise InputError(f"{kind} can only come from uploads or the bundled examples")
    return resolved


def checked_images(image_paths: list[str], allowed_roots: list[Path]) -> list[str]:
    """A turn's image paths, resolved, once each is an allowed, readable image within the per-turn limit."""
    if len(image_paths) > MAX_IMAGES_PER_TURN:
        raise InputError(f"at most {MAX_IMAGES_PER_TURN} images per turn")
    paths = [str(check_upload_path(path, allowed_roots)) for path in image_paths]
    for path in paths:
        load_image(path)  # a clear message now for non-images, corrupt files and decompression bombs
    return paths


class VideoRefused(InputError):
    """The turn's video was refused (unreadable, too big or long, or the model takes none): the page drops it."""


def video_families_text() -> str:
    return ", ".join(f"{SUPPORTED_FAMILIES[family]} (`{family}`)" for family in sorted(VIDEO_FAMILIES))


def takes_video(manager: Any) -> bool:
    """Whether the loaded model answers about videos: its family's processor takes them, and it runs here
    (the server API behind `--backend-url` carries images only)."""
    return manager.info.family in VIDEO_FAMILIES and getattr(manager, "takes_video", True)


def check_takes_video(family: str) -> None:
    """Refuse a video for a family whose processor takes none, naming the families that do."""
    if family not in VIDEO_FAMILIES:
        name = SUPPORTED_FAMILIES.get(family, family)
        raise VideoRefused(f"this model ({name}) takes images only; videos work with {video_families_text()}")


def checked_videos(video_paths: list[str], num_frames: int, allowed_roots: list[Path], family: str | None) -> list[str]:
    """The turn's video paths, resolved, once each decodes within the limits; VideoRefused says why not."""
    if not video_paths:
        return []
    if family is None:
        raise InputError("a video turn needs the model's family, to check that it takes video")
    check_takes_video(family)
    if len(video_paths) > MAX_VIDEOS_PER_TURN:
        raise VideoRefused(f"at most {MAX_VIDEOS_PER_TURN} video per turn")
    for path in video_paths:
        try:
            read_video_upload(path, num_frames, allowed_roots)
        except InputError as error:
            raise VideoRefused(str(error)) from error
    return [str(Path(path).resolve()) for path in video_paths]


def read_video_upload(path: str | Path, num_frames: Any, allowed_roots: list[Path]) -> Video:
    """A video upload's sampled frames, if the file lies under an allowed folder and passes every video limit.

    `num_frames` comes from the frame-count control; limits and messages are those of vtw_core.models.videos,
    the same as the CLI's.
    """
    frames = check_num_frames(num_frames)
    return read_video(check_upload_path(path, allowed_roots, kind="videos"), frames)


def chat_videos(manager: ModelManager, state: ChatState) -> list[Video]:
    """The chat's videos for the model, after checking that the model takes video (before any model work)."""
    if not state.has_video():
        return []
    if not takes_video(manager):
        check_takes_video(manager.info.family)
        raise VideoRefused("this model is served through an API that takes images only")
    return state.videos()


def format_video_stats(stats: dict[str, Any] | None) -> str:
    """The video counters of one side as a Markdown line ('' when the request had no video)."""
    if not stats or not stats.get("video_frames"):
        return ""
    return (
        f"- video: {stats['video_frames']} frames, {stats['video_tokens']} video tokens "
        f"({format_per_frame(stats['vision_tokens_per_frame'])} per frame)"
    )


def is_default_model(manager: ModelManager) -> bool:
    return manager.info.source == default_model()


def example_label(path: Path, question: str) -> str:
    """A short button text for an example: the question, after the picture's name for the photos."""
    return question if path.stem.startswith("easyvqa-") else f"{path.stem.capitalize()}: {question}"


def example_files(default: bool) -> list[tuple[Path, str]]:
    """Examples that fit the model: easy-vqa pictures for the embedded default model, photos for real ones.

    The default model was trained only on coloured shapes; on photos its answers are nonsense.
    """
    pattern = "easyvqa-*.png" if default else "*.jpg"
    return [
        (path, EXAMPLE_QUESTIONS.get(path.stem, "What is in this picture?")) for path in sorted(EXAMPLES.glob(pattern))
    ]
