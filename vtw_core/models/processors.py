"""Loading a checkpoint's processor, with or without torchvision.

In transformers 5.x the processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video, Video-LLaVA,
LLaVA-OneVision, InternVL and SmolVLM list a video processor among their parts, and every stock video processor
needs torchvision; without it, `AutoProcessor.from_pretrained` fails for these families (hub checkpoints too).
`load_processor` tries AutoProcessor first and only then builds the same stock processor with the frame-based
video processor of vtw_core.models.videos (or none).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    InternVLProcessor,
    LlavaNextVideoProcessor,
    LlavaOnevisionProcessor,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    SmolVLMProcessor,
    VideoLlavaProcessor,
)
from transformers.utils import is_torchvision_available

from vtw_core.models.videos import frame_video_processor

# Processors whose stock class lists a (torchvision-backed) video processor among its parts.
PROCESSOR_CLASSES: dict[str, type[ProcessorMixin]] = {
    "qwen2_vl": Qwen2VLProcessor,
    "qwen2_5_vl": Qwen2_5_VLProcessor,
    "qwen3_vl": Qwen3VLProcessor,
    "smolvlm": SmolVLMProcessor,
    "llava_next_video": LlavaNextVideoProcessor,
    "video_llava": VideoLlavaProcessor,
    "llava_onevision": LlavaOnevisionProcessor,
    "internvl": InternVLProcessor,
}


def processor_without_torchvision(
    processor_class: type[ProcessorMixin], *, video_processor=None, **parts
) -> ProcessorMixin:
    """A genuine stock processor (Qwen2VLProcessor, LlavaNextVideoProcessor, ...) built without torchvision.

    In transformers 5.x these processors list a video processor among their parts, and every stock video processor
    is torchvision-backed, so without torchvision neither the constructor nor AutoProcessor can build one. Images
    never touch the video processor, so the only obstacle is the constructor's type check of that one part; it is
    relaxed on this instance alone (no global patching), then removed again. `video_processor` is None (images
    only) or a frame-based stand-in (vtw_core.models.videos) that returns what the stock one returns.
    """
    processor = processor_class.__new__(processor_class)

    def check_argument(argument_name: str, argument):
        if argument_name == "video_processor" and argument is video_processor:
            return None
        return processor_class.check_argument_for_proper_class(processor, argument_name, argument)

    processor.check_argument_for_proper_class = check_argument
    try:
        processor_class.__init__(processor, video_processor=video_processor, **parts)
    finally:
        del processor.check_argument_for_proper_class
    return processor


def image_only_qwen_processor(
    processor_class: type[ProcessorMixin], image_processor, tokenizer, chat_template: str | None
) -> ProcessorMixin:
    """A genuine Qwen2VLProcessor / Qwen2_5_VLProcessor whose video_processor is None."""
    return processor_without_torchvision(
        processor_class, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template
    )


def _video_preprocessor_config(source: str | Path, kwargs: dict) -> dict:
    """A checkpoint's separate video_preprocessor_config.json (hub layout before nested processor configs), or {}."""
    from transformers.utils import cached_file

    options = {key: kwargs[key] for key in ("cache_dir", "revision", "token", "local_files_only") if key in kwargs}
    try:
        path = cached_file(
            source, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **options
        )
    except OSError:
        return {}
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else {}


def load_processor(source: str | Path, **kwargs) -> ProcessorMixin:
    """`AutoProcessor.from_pretrained(source, **kwargs)`, with a fallback for processors that need torchvision.

    Works for these tiny folders and for real hub checkpoints alike. The fallback is used only when torchvision is
    missing (stock transformers then cannot load any processor that has a video part); it assembles the same
    tokenizer, PIL image processor, processor options and chat template, with the frame-based video processor of
    vtw_core.models.videos where the family takes video, else without a video part.
    """
    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except (ImportError, OSError):  # no torchvision; or, for some checkpoints, no video processor config to find
        if is_torchvision_available():
            raise
        config_kwargs = {key: value for key, value in kwargs.items() if key not in ("use_fast", "backend")}
        family = AutoConfig.from_pretrained(source, **config_kwargs).model_type
        if family not in PROCESSOR_CLASSES:
            raise
    processor_class = PROCESSOR_CLASSES[family]
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    processor_dict, _ = processor_class.get_processor_dict(source, **kwargs)
    accepted = inspect.signature(processor_class.__init__).parameters
    options = {
        key: value
        for key, value in processor_dict.items()
        if key in accepted and key not in ("self", "image_processor", "tokenizer", "video_processor", "chat_template")
    }
    video_settings = processor_dict.get("video_processor") or _video_preprocessor_config(source, kwargs)
    return processor_without_torchvision(
        processor_class,
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=frame_video_processor(family, video_settings, image_processor),
        chat_template=processor_dict.get("chat_template") or tokenizer.chat_template,
        **options,
    )
