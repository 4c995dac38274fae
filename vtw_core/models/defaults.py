"""The model used when the user names none: the small LLaVA trained on easy-vqa, shipped in assets/."""

from __future__ import annotations

from vtw_core.assets import ASSETS_DIR
from vtw_core.errors import VTWError

DEFAULT_MODEL_DIR = ASSETS_DIR / "default-model"


def default_model() -> str | None:
    """The embedded default model's folder, if this checkout has it."""
    return str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def require_model(model: str | None) -> str:
    """The model the user named, else the embedded default, else a message saying what to pass."""
    if model:
        return model
    fallback = default_model()
    if fallback is not None:
        return fallback
    raise VTWError(
        f"no --model given and the embedded default model is missing ({DEFAULT_MODEL_DIR}); pass a hub id such "
        "as llava-hf/llava-1.5-7b-hf or a local model folder"
    )
