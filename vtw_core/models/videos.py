"""Videos: frames sampled with PyAV, and frame-based video processors for families whose processor takes video.

Reading: `read_video(path, num_frames)` decodes the container with PyAV (FFmpeg) and keeps `num_frames` frames
spread evenly over the whole video, as the stock video processors sample them (`np.linspace` over the frame
indices). Every limit on what a user may upload lives in `VideoLimits`, so the CLI, the Python API and the app
refuse the same files with the same `InputError` messages.

Processing: in transformers 5.x every stock video processor is torchvision-backed. Where torchvision is missing,
`frame_video_processor` gives the family's processor a stand-in that turns the sampled frames into exactly the
tensors the stock video processor returns (`pixel_values_videos`, and `video_grid_thw` for Qwen), using the same
resizing and normalisation as the family's image processor. The stock processor class still expands the video
placeholders, so the token bookkeeping is the model's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.video_utils import VideoMetadata

from vtw_core.errors import InputError


@dataclass(frozen=True)
class VideoLimits:
    """What a video upload may be: one place for every entry point (CLI, Python API, app)."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_duration_s: float = 30 * 60.0
    max_side_px: int = 4096
    min_frames: int = 1
    max_frames: int = 64
    default_frames: int = 8


LIMITS = VideoLimits()


@dataclass
class Video:
    """The sampled frames of one video (RGB, in time order) and where they came from."""

    frames: list[Image.Image]
    fps: float
    total_frames: int
    frame_indices: list[int] = field(default_factory=list)  # empty: the frames are the video's first ones

    def __post_init__(self) -> None:
        if not self.frames:
            raise InputError("a video needs at least one frame")
        if not self.fps > 0:
            raise InputError(f"a video's frame rate must be positive, got {self.fps}")
        if not self.frame_indices:
            self.frame_indices = list(range(len(self.frames)))
        self.total_frames = max(self.total_frames, len(self.frames))

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps if self.fps else 0.0

    def metadata(self) -> VideoMetadata:
        """The stock metadata record (the Qwen processors read the sampled frame rate from it)."""
        width, height = self.frames[0].size
        return VideoMetadata(
            total_num_frames=self.total_frames,
            fps=self.fps,
            width=width,
            height=height,
            duration=self.duration_s,
            video_backend="pyav",
            frames_indices=list(self.frame_indices),
        )

    def as_array(self) -> np.ndarray:
        """(frames, height, width, 3) uint8: the layout stock processors accept as one video."""
        return np.stack([np.asarray(frame.convert("RGB")) for frame in self.frames])


def check_num_frames(num_frames: Any, limits: VideoLimits = LIMITS) -> int:
    """The frame count as a whole number within the limits, else a clear InputError."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise InputError(f"the frame count must be a whole number, got {num_frames!r}")
    if not limits.min_frames <= int(num_frames) <= limits.max_frames:
        raise InputError(f"the frame count must be from {limits.min_frames} to {limits.max_frames}, got {num_frames}")
    return int(num_frames)


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly from the first to the last frame (fewer frames: every frame once)."""
    if total_frames <= num_frames:
        return list(range(total_frames))
    return [round(float(index)) for index in np.linspace(0, total_frames - 1, num_frames)]


def read_video(path: str | os.PathLike, num_frames: int = LIMITS.default_frames, limits: VideoLimits = LIMITS) -> Video:
    """Decode a video file with PyAV and keep `num_frames` evenly spaced RGB frames.

    Refuses, with an InputError that says why: a missing or oversized file, something that is not a video,
    a video longer than `limits.max_duration_s`, frames larger than `limits.max_side_px`, and broken streams.
    """
    num_frames = check_num_frames(num_frames, limits)
    file = Path(path)
    if not file.is_file():
        raise InputError(f"no video file at {file.name!r}")
    size = file.stat().st_size
    if size > limits.max_file_bytes:
        raise InputError(f"the video is {size / 2**20:.0f} MiB; the limit is {limits.max_file_bytes / 2**20:.0f} MiB")
    try:
        import av
    except ImportError as error:  # a hard dependency, but say what is missing rather than fail obscurely
        raise InputError("reading videos needs PyAV: pip install av") from error

    try:
        with av.open(str(file)) as container:
            stream = _video_stream(container, limits)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
            # The header's frame count is missing or wrong for some containers: then count the packets (no decoding).
            total = int(stream.frames or 0) or sum(1 for packet in container.demux(stream) if packet.size)
        indices = sample_frame_indices(total, num_frames)
        images, decoded = _decode_frames(file, indices, fps, limits)
        if len(images) < len(indices) and decoded:  # the stream ended early: sample again from what is there
            indices = sample_frame_indices(decoded, num_frames)
            images, decoded = _decode_frames(file, indices, fps, limits)
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as error:
        raise InputError(f"the file is not a readable video ({type(error).__name__})") from error
    if not images:
        raise InputError("the video has no decodable frames")
    kept = sorted(images)
    return Video(
        frames=[images[index] for index in kept], fps=fps, total_frames=max(total, decoded), frame_indices=kept
    )


def _video_stream(container: Any, limits: VideoLimits) -> Any:
    """The first video stream, if its header is within the limits."""
    if not container.streams.video:
        raise InputError("the file has no video stream")
    stream = container.streams.video[0]
    duration = _duration_s(container, stream)
    if duration is not None and duration > limits.max_duration_s:
        limit = limits.max_duration_s / 60
        raise InputError(f"the video is {duration / 60:.1f} minutes long; the limit is {limit:.0f} minutes")
    if max(stream.codec_context.width or 0, stream.codec_context.height or 0) > limits.max_side_px:
        raise InputError(f"video frames larger than {limits.max_side_px} px on a side are not accepted")
    return stream


def _decode_frames(
    file: Path, indices: list[int], fps: float, limits: VideoLimits
) -> tuple[dict[int, Image.Image], int]:
    """Decode from the start, keeping only the frames at `indices` as RGB images: memory stays at the sampled frames
    whatever the video's length. Stops after the last wanted frame, and at the duration limit whatever the header
    said. Returns the kept frames by index and how many frames were decoded."""
    import av

    wanted, last = set(indices), max(indices, default=-1)
    images: dict[int, Image.Image] = {}
    decoded = 0
    with av.open(str(file)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            decoded = index + 1
            if decoded / fps > limits.max_duration_s:
                raise InputError(f"the video is longer than the limit of {limits.max_duration_s / 60:.0f} minutes")
            if index in wanted:
                images[index] = frame.to_image().convert("RGB")
            if index >= last:
                break
    return images, decoded


def _duration_s(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # microseconds (av.time_base)
    return None


# --- Frame-based video processors ------------------------------------------------------------------------------


def _frames_of(video: Any) -> list[Image.Image]:
    """One video as PIL frames, from a Video, a list of PIL images or a (T, H, W, 3) array."""
    if isinstance(video, Video):
        return video.frames
    if isinstance(video, (np.ndarray, torch.Tensor)):
        array = np.asarray(video)
        if array.ndim != 4 or array.shape[-1] != 3:
            raise InputError(f"a video array must be (frames, height, width, 3), got {tuple(array.shape)}")
        return [Image.fromarray(frame.astype(np.uint8)) for frame in array]
    if isinstance(video, (list, tuple)) and video and all(isinstance(frame, Image.Image) for frame in video):
        return [frame.convert("RGB") for frame in video]
    raise InputError("a video must be a list of PIL frames, a (frames, height, width, 3) array or a Video")


def _videos_of(videos: Any) -> list[list[Image.Image]]:
    if isinstance(videos, (Video, np.ndarray, torch.Tensor)):
        return [_frames_of(videos)]
    if isinstance(videos, (list, tuple)) and videos and isinstance(videos[0], Image.Image):
        return [_frames_of(videos)]  # one video given as its frames
    return [_frames_of(video) for video in videos]


def _metadata(videos: list[list[Image.Image]], given: Any) -> list[VideoMetadata]:
    if given is not None:
        given = given if isinstance(given, (list, tuple)) else [given]
        return [item if isinstance(item, VideoMetadata) else VideoMetadata(**item) for item in given]
    # Without metadata the frames are taken as 1 fps, each frame an original one (what callers passing bare frames
    # mean); the Qwen processors only use the rate for their temporal position scale.
    return [
        VideoMetadata(total_num_frames=len(frames), fps=1.0, frames_indices=list(range(len(frames))))
        for frames in videos
    ]


class ClipFrameVideoProcessor:
    """LLaVA-NeXT-Video / Video-LLaVA / LLaVA-OneVision / InternVL: every frame resized (and cropped) like an image.

    Returns `pixel_values_videos` of shape (videos, frames, 3, height, width), as the stock video processors do.
    """

    def __init__(self, frame_processor: CLIPImageProcessorPil):
        self.frame_processor = frame_processor

    def __call__(self, videos: Any, video_metadata: Any = None, return_tensors: Any = None, **_: Any) -> BatchFeature:
        clips = _videos_of(videos)
        pixels = [self.frame_processor(frames, return_tensors="pt")["pixel_values"] for frames in clips]
        if len({tuple(clip.shape) for clip in pixels}) > 1:
            raise InputError("videos in one request must have the same number of frames")
        return BatchFeature(
            {"pixel_values_videos": torch.stack(pixels), "video_metadata": _metadata(clips, video_metadata)}
        )


# The stock Qwen video processors' pixel budgets, for checkpoints that save none.
QWEN_VIDEO_SIZES = {
    "qwen2_vl": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "qwen2_5_vl": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "qwen3_vl": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
}


class QwenFrameVideoProcessor:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: frames resized to a multiple of patch x merge, then cut into (t, h, w) patches.

    Two consecutive frames form one temporal patch (a last odd frame is repeated), as in the stock video processors:
    `pixel_values_videos` (patches, 3 * temporal * patch * patch) and `video_grid_thw`. The pixel budget is the
    video processor's own (`settings["size"]`): per frame for Qwen2(.5)-VL, over all frames for Qwen3-VL.
    """

    def __init__(self, family: str, image_processor: Any, settings: dict[str, Any] | None = None):
        settings = settings or {}
        self.family = family
        self.patch_size = settings.get("patch_size") or image_processor.patch_size
        self.merge_size = settings.get("merge_size") or image_processor.merge_size
        self.temporal_patch_size = settings.get("temporal_patch_size") or image_processor.temporal_patch_size
        self.size = settings.get("size") or QWEN_VIDEO_SIZES[family]
        self.image_mean = settings.get("image_mean") or image_processor.image_mean
        self.image_std = settings.get("image_std") or image_processor.image_std

    def _resized_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        low, high = self.size["shortest_edge"], self.size["longest_edge"]
        if self.family == "qwen3_vl":  # the budget covers the whole clip (t x h x w)
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_resize

            frames = max(frames, self.temporal_patch_size)
            return clip_resize(frames, height, width, self.temporal_patch_size, factor, low, high)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)

    def _patches(self, frames: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        width, height = frames[0].size
        new_height, new_width = self._resized_size(len(frames), height, width)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        clip = np.stack(
            [
                (np.asarray(frame.resize((new_width, new_height), Image.Resampling.BICUBIC), dtype=np.float32)
                 .transpose(2, 0, 1) / 255.0 - mean) / std
                for frame in frames
            ]
        )  # fmt: skip
        temporal, patch, merge = self.temporal_patch_size, self.patch_size, self.merge_size
        if len(clip) % temporal:  # repeat the last frame to fill the last temporal patch
            clip = np.concatenate([clip, np.repeat(clip[-1:], temporal - len(clip) % temporal, axis=0)])
        grid_t, grid_h, grid_w = len(clip) // temporal, new_height // patch, new_width // patch
        channels = clip.shape[1]
        # (t, temporal, C, h/merge, merge, patch, w/merge, merge, patch): merged 2x2 groups stay contiguous, and
        # each patch flattens as (C, temporal, patch, patch), the Conv3d patch embedding's input layout.
        patches = clip.reshape(
            grid_t, temporal, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch
        ).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_t * grid_h * grid_w, channels * temporal * patch * patch)
        return torch.from_numpy(np.ascontiguousarray(flat)), [grid_t, grid_h, grid_w]

    def __call__(self, videos: Any, video_metadata: Any = None, return_tensors: Any = None, **_: Any) -> BatchFeature:
        clips = _videos_of(videos)
        results = [self._patches(frames) for frames in clips]
        return BatchFeature(
            {
                "pixel_values_videos": torch.cat([patches for patches, _ in results]),
                "video_grid_thw": torch.tensor([grid for _, grid in results]),
                "video_metadata": _metadata(clips, video_metadata),
            }
        )


class NoVideoProcessor:
    """SmolVLM: its processor's chat template reads the video processor's default sampling options even for image
    prompts; this stand-in has them (SmolVLMVideoProcessor's defaults) and refuses videos with a clear message."""

    num_frames = 64
    fps = 1

    def __call__(self, videos: Any, **_: Any) -> BatchFeature:
        raise InputError("video input is not supported for this model family yet")


def frame_video_processor(family: str, settings: dict[str, Any], image_processor: Any) -> Any:
    """The stand-in video processor of a family (None where the family's processor takes no video).

    `settings` is the saved `video_processor` entry of the checkpoint's processor_config.json (sizes, mean, std).
    """
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return QwenFrameVideoProcessor(family, image_processor, settings)
    if family == "smolvlm":
        return NoVideoProcessor()
    if family in ("llava_next_video", "video_llava", "llava_onevision", "internvl"):
        from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        # Without saved video settings, frames are processed like the checkpoint's images: its image processor's
        # size, crop and normalisation (the stock video processors of these families share them).
        # LLaVA-OneVision and InternVL resize frames to a square without cropping (InternVL: one tile per frame).
        square = family in ("llava_onevision", "internvl")
        size = settings.get("size") or _as_dict(getattr(image_processor, "size", None)) or {"shortest_edge": 224}
        crop = None if square else settings.get("crop_size") or _as_dict(getattr(image_processor, "crop_size", None))
        onevision = family == "llava_onevision"
        default_mean, default_std = ([0.5] * 3, [0.5] * 3) if onevision else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        frame_processor = CLIPImageProcessorPil(
            size=size,
            crop_size=crop or size,
            do_center_crop=crop is not None,
            image_mean=settings.get("image_mean") or getattr(image_processor, "image_mean", None) or list(default_mean),
            image_std=settings.get("image_std") or getattr(image_processor, "image_std", None) or list(default_std),
        )
        return ClipFrameVideoProcessor(frame_processor)
    return None


def _as_dict(size: Any) -> dict[str, int] | None:
    """A processor's size / crop_size (a dict or a SizeDict) as a plain dict without empty entries."""
    if size is None:
        return None
    items = size.items() if isinstance(size, dict) else vars(size).items()
    return {key: value for key, value in items if value is not None} or None
