"""The model used when the user names none."""

from __future__ import annotations

from vtw_core.errors import VTWError

# The embedded default model (a small LLaVA trained on easy-vqa) is not shipped yet.
DEFAULT_MODEL: str | None = None


def require_model(model: str | None) -> str:
    """The model the user named, else the embedded default, else a message saying what to pass."""
    if model:
        return model
    if DEFAULT_MODEL is not None:
        return DEFAULT_MODEL
    raise VTWError(
        "no --model given and no embedded default model is installed yet; pass a hub id such as "
        "llava-hf/llava-1.5-7b-hf or a local model folder"
    )
