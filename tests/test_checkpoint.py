"""The embedded default model is stored in the hub's LLaVA layout, which transformers and vLLM both load."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from vtw_core.models.checkpoint import HUB_TOWER, hub_layout, save_in_hub_layout
from vtw_core.models.defaults import DEFAULT_MODEL_DIR

# The top-level names of llava-hf/llava-1.5-7b-hf's weights: what vLLM's LLaVA loader maps.
HUB_PREFIXES = ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.", HUB_TOWER)


def test_the_shipped_weights_use_the_hub_names():
    with safe_open(DEFAULT_MODEL_DIR / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(key.startswith(HUB_PREFIXES) for key in keys), [
        k for k in keys if not k.startswith(HUB_PREFIXES)
    ]


def test_transformers_loads_them_with_nothing_missing():
    _, info = AutoModelForImageTextToText.from_pretrained(DEFAULT_MODEL_DIR, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_hub_layout_renames_only_the_vision_tower(tmp_path):
    tensors = {"vision_tower.embeddings.x": torch.ones(1), "vision_tower.vision_model.y": torch.ones(1),
               "language_model.model.norm.weight": torch.ones(1)}  # fmt: skip
    assert sorted(hub_layout(tensors)) == ["language_model.model.norm.weight", "vision_tower.vision_model.embeddings.x",
                                           "vision_tower.vision_model.y"]  # fmt: skip
    save_file(tensors, tmp_path / "model.safetensors")
    save_in_hub_layout(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == set(hub_layout(tensors))
