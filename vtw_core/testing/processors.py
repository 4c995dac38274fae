"""The tiny families' processors: tokenizer + PIL image processor (+ frame-based video processor), sized so that
the image placeholders expand to exactly the number of features the tiny model produces, and their saving.

Image processors are the PIL-backed ones (AutoImageProcessor picks them when torchvision is missing). Every family
whose stock processor lists a video processor (`vtw_core.models.processors.PROCESSOR_CLASSES`) is built with the
frame-based video processor of vtw_core.models.videos, even where torchvision exists, so the same processor runs
on every machine; the saved folder names the family's stock video processor.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Idefics3Processor, LlavaNextProcessor, LlavaProcessor, ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

from vtw_core.models.processors import PROCESSOR_CLASSES, processor_without_torchvision
from vtw_core.models.videos import frame_video_processor
from vtw_core.testing.sizes import (
    IDEFICS3_IMAGE_SEQ_LEN,
    IDEFICS3_TILE,
    INTERNVL_IMAGE_SEQ_LENGTH,
    INTERNVL_MAX_TILES,
    INTERNVL_TILE,
    LLAVA_IMAGE_SIZE,
    LLAVA_NEXT_PATCH,
    LLAVA_NEXT_PINPOINTS,
    LLAVA_NEXT_TILE,
    LLAVA_PATCH,
    ONEVISION_PATCH,
    ONEVISION_PINPOINTS,
    ONEVISION_TILE,
    QWEN3_MAX_PIXELS,
    QWEN3_MIN_PIXELS,
    QWEN3_PATCH,
    QWEN_MAX_PIXELS,
    QWEN_MERGE,
    QWEN_MIN_PIXELS,
    QWEN_PATCH,
    QWEN_TEMPORAL_PATCH,
    QWEN_VL_FAMILIES,
    VIDEO_LLAVA_IMAGE_SIZE,
    VIDEO_LLAVA_PATCH,
)
from vtw_core.testing.templates import CHAT_TEMPLATES
from vtw_core.testing.tokenizers import build_tiny_tokenizer

# The families whose stock processor has no video part: AutoProcessor saves and loads them anywhere.
IMAGE_ONLY_PROCESSOR_CLASSES: dict[str, type[ProcessorMixin]] = {
    "llava": LlavaProcessor,
    "llava_next": LlavaNextProcessor,
    "idefics3": Idefics3Processor,
}


def _resize_and_crop(side: int) -> dict:
    """CLIP-style preprocessing: shortest edge resized to `side`, then a centre crop of side x side."""
    return {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}


def _clip_options(patch_size: int) -> dict:
    """The processor options of the CLIP-tower families: CLIP's CLS token is counted (num_additional_image_tokens=1)
    and the "default" feature strategy drops it again."""
    return {"patch_size": patch_size, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}


def _qwen_image_processor(family: str = "qwen2_vl") -> Qwen2VLImageProcessorPil:
    qwen3 = family == "qwen3_vl"
    # Qwen3-VL normalises with mean = std = 0.5 (its hub preprocessor config); Qwen2(.5)-VL with CLIP's.
    normalisation = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if qwen3 else {}
    return Qwen2VLImageProcessorPil(
        **normalisation,
        patch_size=QWEN3_PATCH if qwen3 else QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH,
        min_pixels=QWEN3_MIN_PIXELS if qwen3 else QWEN_MIN_PIXELS,
        max_pixels=QWEN3_MAX_PIXELS if qwen3 else QWEN_MAX_PIXELS,
    )


def _image_processor_and_options(family: str) -> tuple[object, dict]:
    """The family's PIL image processor and its processor's own options (token counts, feature strategy)."""
    if family == "llava":
        return CLIPImageProcessorPil(**_resize_and_crop(LLAVA_IMAGE_SIZE)), _clip_options(LLAVA_PATCH)
    if family in ("llava_next", "llava_next_video"):
        image_processor = LlavaNextImageProcessorPil(
            **_resize_and_crop(LLAVA_NEXT_TILE), image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
        )
        return image_processor, _clip_options(LLAVA_NEXT_PATCH)
    if family == "video_llava":
        return VideoLlavaImageProcessor(**_resize_and_crop(VIDEO_LLAVA_IMAGE_SIZE)), _clip_options(VIDEO_LLAVA_PATCH)
    if family in ("idefics3", "smolvlm"):
        image_processor_class = Idefics3ImageProcessorPil if family == "idefics3" else SmolVLMImageProcessorPil
        image_processor = image_processor_class(
            size={"longest_edge": 2 * IDEFICS3_TILE}, max_image_size={"longest_edge": IDEFICS3_TILE}
        )
        return image_processor, {"image_seq_len": IDEFICS3_IMAGE_SEQ_LEN}
    if family in QWEN_VL_FAMILIES:
        return _qwen_image_processor(family), {}
    if family == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": ONEVISION_TILE, "width": ONEVISION_TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS
        )
        options = {
            "num_image_tokens": (ONEVISION_TILE // ONEVISION_PATCH) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        }
        return image_processor, options
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True, max_patches=INTERNVL_MAX_TILES
    )
    return image_processor, {"image_seq_length": INTERNVL_IMAGE_SEQ_LENGTH}


def _video_processor_dict(family: str) -> dict:
    # Saved so that, where torchvision is installed, stock AutoProcessor builds the family's video processor with
    # the tiny geometry instead of the real model's. It cannot be instantiated here without torchvision, hence a
    # plain dict of the video processor's init kwargs.
    if family == "qwen3_vl":
        return {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "patch_size": QWEN3_PATCH,
            "merge_size": QWEN_MERGE,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            # Qwen3-VL's video budget covers all frames: room for 8 frames at the image cap.
            "size": {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": 8 * QWEN3_MAX_PIXELS},
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
    if family in QWEN_VL_FAMILIES:
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "patch_size": QWEN_PATCH,
            "merge_size": QWEN_MERGE,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        }
    if family == "llava_next_video":
        return {"video_processor_type": "LlavaNextVideoVideoProcessor", **_resize_and_crop(LLAVA_NEXT_TILE)}
    if family == "video_llava":
        return {"video_processor_type": "VideoLlavaVideoProcessor", **_resize_and_crop(VIDEO_LLAVA_IMAGE_SIZE)}
    if family == "llava_onevision":
        return {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": ONEVISION_TILE, "width": ONEVISION_TILE},
        }
    return {"video_processor_type": "InternVLVideoProcessor", "size": {"height": INTERNVL_TILE, "width": INTERNVL_TILE}}


def build_tiny_processor(family: str) -> ProcessorMixin:
    """Tokenizer + PIL image processor + processor, sized so placeholders expand to the model's feature count."""
    tokenizer = build_tiny_tokenizer(family)
    image_processor, options = _image_processor_and_options(family)
    parts = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": CHAT_TEMPLATES[family]}
    if family in IMAGE_ONLY_PROCESSOR_CLASSES:
        return IMAGE_ONLY_PROCESSOR_CLASSES[family](**parts, **options)
    video_processor = frame_video_processor(family, _video_processor_dict(family), image_processor)
    return processor_without_torchvision(PROCESSOR_CLASSES[family], video_processor=video_processor, **parts, **options)


def save_tiny_processor(family: str, processor: ProcessorMixin, folder: Path) -> None:
    """Save `build_tiny_processor(family)` into a checkpoint folder, loadable by `load_processor`."""
    if family not in PROCESSOR_CLASSES:
        processor.save_pretrained(folder)
        return
    # ProcessorMixin.save_pretrained cannot save a processor without its video part, so write the same v5 layout
    # by hand: tokenizer files, chat_template.jinja, and processor_config.json with the nested sub-processors and
    # the processor's own options.
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    options = {
        key: value
        for key, value in processor.to_dict().items()
        if key not in ("image_processor", "tokenizer", "video_processor", "chat_template", "processor_class")
        and isinstance(value, (int, float, str, bool, list))
    }
    processor_config = {
        "processor_class": type(processor).__name__,
        **options,
        "image_processor": processor.image_processor.to_dict(),
        "video_processor": _video_processor_dict(family),
    }
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")
