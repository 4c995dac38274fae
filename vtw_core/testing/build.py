"""`build_tiny_model`: a tiny random-weight checkpoint folder (config, weights, generation config, processor)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from vtw_core.testing.configs import generation_config, tiny_config
from vtw_core.testing.processors import build_tiny_processor, save_tiny_processor
from vtw_core.testing.sizes import check_family


def build_tiny_model(family: str, folder: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Build and save a tiny random-weight checkpoint (config, weights, generation config, processor) to folder.

    The same (family, num_layers, seed) always gives bit-identical weights, and the global torch RNG is left
    untouched.
    """
    check_family(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, num_layers=num_layers)
    with torch.random.fork_rng(devices=[]):  # seed the init only; callers' random streams stay as they were
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config(family)
    model.save_pretrained(folder)
    save_tiny_processor(family, build_tiny_processor(family), folder)
    return folder
