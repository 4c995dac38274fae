"""Videos: PyAV frame sampling, the input limits, the frame-based video processors, and videos through the API."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vtw_core.errors import InputError
from vtw_core.models.prompts import build_model_inputs, user_message
from vtw_core.models.videos import LIMITS, Video, check_num_frames, read_video, sample_frame_indices
from vtw_core.testing.tiny import build_tiny_processor

av = pytest.importorskip("av")


def write_video(path: Path, frames: int = 12, width: int = 64, height: int = 48, fps: int = 6) -> Path:
    """An MPEG-4 clip whose frame i has its left (i + 1) / frames filled, so frames are told apart by their fill."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[:, : (index + 1) * width // frames] = (200, 200, 200)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def filled_fraction(frame: Image.Image) -> float:
    column_means = np.asarray(frame.convert("L"), dtype=np.float32).mean(0)
    return float((column_means > 100).mean())


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_frames_are_sampled_evenly_over_the_whole_video(clip_path):
    video = read_video(clip_path, 4)
    assert video.total_frames == 12 and video.fps == pytest.approx(6)
    assert video.frame_indices == sample_frame_indices(12, 4) == [0, 4, 7, 11]
    assert [frame.size for frame in video.frames] == [(64, 48)] * 4
    # The decoded frames really are those frames: frame i fills (i + 1) / 12 of the width.
    fills = [filled_fraction(frame) for frame in video.frames]
    assert fills == pytest.approx([(index + 1) / 12 for index in video.frame_indices], abs=0.05)
    assert video.duration_s == pytest.approx(2.0)


def test_short_video_gives_every_frame_once(tmp_path):
    video = read_video(write_video(tmp_path / "short.mp4", frames=3), 8)
    assert video.frame_indices == [0, 1, 2] and len(video.frames) == 3


@pytest.mark.parametrize("frames", [0, -1, LIMITS.max_frames + 1, 2.5, True, "8"])
def test_bad_frame_counts(frames):
    with pytest.raises(InputError, match="frame count"):
        check_num_frames(frames)


def test_missing_corrupt_and_truncated_videos(tmp_path, clip_path):
    with pytest.raises(InputError, match="no video file"):
        read_video(tmp_path / "nothing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(InputError, match=r"not a readable video|no video stream|no decodable frames"):
        read_video(corrupt)
    truncated = tmp_path / "truncated.mp4"  # the index (moov) is written last: half a file cannot be read
    truncated.write_bytes(clip_path.read_bytes()[: clip_path.stat().st_size // 2])
    with pytest.raises(InputError, match=r"not a readable video|no video stream|no decodable frames"):
        read_video(truncated)
    # FFmpeg reads a still picture as a one-frame video, which is what it is.
    picture = tmp_path / "picture.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    assert len(read_video(picture, 4).frames) == 1


def test_huge_and_overlong_videos_are_refused(clip_path):
    with pytest.raises(InputError, match="MiB"):
        read_video(clip_path, limits=replace(LIMITS, max_file_bytes=100))
    with pytest.raises(InputError, match="minutes"):
        read_video(clip_path, limits=replace(LIMITS, max_duration_s=1.0))
    with pytest.raises(InputError, match="px"):
        read_video(clip_path, limits=replace(LIMITS, max_side_px=32))


def test_qwen_video_of_one_repeated_frame_equals_the_image(sample_images):
    """Qwen's image patches repeat the picture over the temporal patch: a 2-frame still video is the same tensor."""
    processor = build_tiny_processor("qwen2_vl")
    image = sample_images[2]
    pixels = processor.image_processor(images=[image], return_tensors="pt")
    video = processor.video_processor([[image, image]])
    torch.testing.assert_close(video["pixel_values_videos"], pixels["pixel_values"])
    assert video["video_grid_thw"].tolist() == pixels["image_grid_thw"].tolist()
    # An odd frame count repeats the last frame, so 3 frames make 2 temporal patches.
    assert processor.video_processor([[image] * 3])["video_grid_thw"][0, 0] == 2


def test_video_llava_frames_equal_its_image_processor(sample_images):
    processor = build_tiny_processor("video_llava")
    frames = [image.resize((48, 40)) for image in sample_images]
    video = processor.video_processor([frames])["pixel_values_videos"]
    images = processor.image_processor(images=frames, return_tensors="pt")["pixel_values_images"]
    assert video.shape == (1, 3, *images.shape[1:])
    torch.testing.assert_close(video[0], images)


def test_video_slots_must_match_videos(sample_images):
    processor = build_tiny_processor("llava_next_video")
    clip = Video(frames=[sample_images[0]] * 2, fps=1.0, total_frames=2)
    messages = [user_message("What happens?", num_images=0, num_videos=1)]
    with pytest.raises(InputError, match="video slot"):
        build_model_inputs(processor, [messages], [[]], "cpu", torch.float32, videos=[[clip, clip]])
    llava = build_tiny_processor("llava")
    with pytest.raises(InputError, match="takes no video"):
        build_model_inputs(llava, [messages], [[]], "cpu", torch.float32, videos=[[clip]])


@pytest.mark.parametrize("family", ["video_llava", "qwen2_5_vl", "internvl"])
def test_manager_answers_about_a_video_with_frame_stats(tiny_model_path, clip_path, family):
    from vtw_core.generation.manager import ModelManager
    from vtw_core.generation.types import SamplingConfig

    manager = ModelManager.load(str(tiny_model_path(family)), device="cpu")
    video = read_video(clip_path, 4)
    messages = [user_message("What happens in the video?", num_images=0, num_videos=1)]
    sampling = SamplingConfig(max_new_tokens=4)
    baseline = manager.generate(messages, [], videos=[video], sampling=sampling)
    withdrawn = manager.generate(messages, [], videos=[video], k=1, sampling=sampling)
    for result in (baseline, withdrawn):
        stats = result.stats
        assert stats.video_frames == 4
        assert stats.video_tokens == stats.vision_tokens > 0
        assert stats.vision_tokens_per_frame == stats.video_tokens / 4
        assert stats.vision_flops > 0
    assert withdrawn.stats.prefill_flops < baseline.stats.prefill_flops
    events = list(manager.stream(messages, [], videos=[video], sampling=sampling))
    assert events[-1].finished and events[-1].token_ids == baseline.token_ids


def test_cli_generate_with_a_video(capsys, tiny_model_path, clip_path, tmp_path):
    import json

    from vtw_core.cli import main

    model = str(tiny_model_path("llava_next_video"))
    argv = ["generate", "--model", model, "--video", str(clip_path), "--frames", "3", "--prompt", "What happens?"]
    assert main([*argv, "--max-new-tokens", "3", "--k", "1", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]
    # LLaVA-NeXT-Video pools each 4x4 frame grid to 2x2: 4 tokens per frame.
    assert stats["video_frames"] == 3 and stats["vision_tokens_per_frame"] == 4.0 and stats["k"] == 1
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    assert "3 video frames, 4.0 vision tokens per frame" in capsys.readouterr().err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    argv[argv.index(str(clip_path))] = str(broken)
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["video_llava", "llava_next_video", "llava_onevision", "qwen2_vl"])
def test_synthetic_video_prompt_is_what_the_stock_model_takes(family):
    """The bench's synthetic video prompt: as many video tokens as the real processor makes, and stock-valid."""
    from transformers import AutoModelForImageTextToText

    from vtw_core.benchmarks.bench import synthetic_video_inputs
    from vtw_core.generation.generate import generate_tokens
    from vtw_core.generation.types import SamplingConfig
    from vtw_core.testing.tiny import tiny_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_config(family)).eval()
    model.generation_config.eos_token_id = None
    inputs = synthetic_video_inputs(model, frames=4, text_tokens=6)
    video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    if not family.startswith("qwen"):  # Qwen's synthetic frames are 448 px, beyond the tiny processor's pixel cap
        processor = build_tiny_processor(family)
        text = processor.apply_chat_template(
            [user_message("Hi", num_images=0, num_videos=1)], add_generation_prompt=True
        )
        frames = [Image.new("RGB", (40, 40), "blue")] * 4
        real = processor(text=[text], videos=[frames], return_tensors="pt")
        assert video_tokens == int((real["input_ids"] == model.config.video_token_id).sum())
    stock = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    columns = generate_tokens(model, inputs, sampling=SamplingConfig(max_new_tokens=4))
    assert torch.stack(list(columns), 1).tolist() == stock.tolist()


def test_bench_cli_runs_a_synthetic_video_row(capsys, tiny_model_path):
    from vtw_core.cli import main

    model = str(tiny_model_path("video_llava"))
    argv = ["bench", "--model", model, "--random-weights", "--video-frames", "3", "--k", "1", "--new-tokens", "2"]
    assert main([*argv, "--repeats", "1", "--text-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "51 vision" in out  # 3 frames x (16 patches + CLS)


def test_app_video_upload_handler(clip_path, tmp_path):
    from app.media import format_video_stats, read_video_upload

    video = read_video_upload(clip_path, 5, [clip_path.parent])
    assert len(video.frames) == 5
    with pytest.raises(InputError, match="uploads"):
        read_video_upload(clip_path, 5, [tmp_path])
    with pytest.raises(InputError, match="frame count"):
        read_video_upload(clip_path, 0, [clip_path.parent])
    line = format_video_stats({"video_frames": 5, "video_tokens": 85, "vision_tokens_per_frame": 17.0})
    assert "5 frames" in line and "17.0 per frame" in line
    assert format_video_stats({"video_frames": 0}) == ""


def test_video_families_are_those_whose_processor_takes_video(sample_images):
    """families.VIDEO_FAMILIES names exactly the tiny families whose processor turns frames into video tokens."""
    from vtw_core.models.families import VIDEO_FAMILIES
    from vtw_core.testing.tiny import SUPPORTED_TINY_FAMILIES

    clip = Video(frames=[sample_images[0].resize((48, 40))] * 2, fps=1.0, total_frames=2)
    messages = [user_message("What happens?", num_images=0, num_videos=1)]
    takes_video = set()
    for family in SUPPORTED_TINY_FAMILIES:
        processor = build_tiny_processor(family)
        try:
            inputs = build_model_inputs(processor, [messages], [[]], "cpu", torch.float32, videos=[[clip]])
        except InputError:
            continue
        # InternVL's processor merges the frames into its tiles (pixel_values), one tile per frame.
        assert "pixel_values_videos" in inputs or inputs["pixel_values"].shape[0] == 2
        takes_video.add(family)
    assert takes_video == set(VIDEO_FAMILIES)


@pytest.mark.parametrize("family", ["llava_next_video", "video_llava", "llava_onevision"])
def test_frames_follow_the_image_processor_without_saved_video_settings(tiny_model_path, tmp_path, family):
    """A checkpoint without video settings (older hub layout): frames get its image processor's geometry."""
    import json
    import shutil

    from vtw_core.models.processors import load_processor

    folder = tmp_path / family
    shutil.copytree(tiny_model_path(family), folder)
    config = json.loads((folder / "processor_config.json").read_text())
    config.pop("video_processor")
    (folder / "processor_config.json").write_text(json.dumps(config))
    frames = [Image.new("RGB", (48, 40), "green")] * 2
    bare = load_processor(folder).video_processor([frames])["pixel_values_videos"]
    saved = load_processor(tiny_model_path(family)).video_processor([frames])["pixel_values_videos"]
    torch.testing.assert_close(bare, saved)


def test_video_llava_7b_bench_prompt_has_the_real_video_length():
    """The bench row's prompt on the real Video-LLaVA-7B config: 8 frames of 257 tokens, the config's 2,056."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vtw_core.benchmarks.bench import synthetic_video_inputs
    from vtw_core.models.configs import shipped_config_path

    config = AutoConfig.from_pretrained(shipped_config_path("video-llava-7b"))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    inputs = synthetic_video_inputs(model, frames=8, text_tokens=62)
    assert inputs["input_ids"].shape[1] == config.video_seq_length + 62 == 2056 + 62
    assert inputs["pixel_values_videos"].shape == (1, 8, 3, 224, 224)
