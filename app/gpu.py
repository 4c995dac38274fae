"""Hugging Face ZeroGPU support: GPU work runs under `spaces.GPU` when the `spaces` package is present."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TypeVar

Function = TypeVar("Function", bound=Callable)
GPU_SECONDS = 120  # per call: one answer on each side, or one K search


def on_gpu(function: Function) -> Function:
    """`spaces.GPU(function)` on a ZeroGPU Space, else the function itself (regular GPU Space, local runs)."""
    if importlib.util.find_spec("spaces") is None:
        return function
    import spaces

    return spaces.GPU(duration=GPU_SECONDS)(function)
