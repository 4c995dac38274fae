"""Saving a LLaVA checkpoint in the hub's layout, the one both transformers and vLLM load.

transformers 5 saves LLaVA's vision tower as `vision_tower.embeddings...`, while the llava-hf checkpoints on the
hub, and vLLM's loader with them, name it `vision_tower.vision_model.embeddings...`. transformers reads both
(its key mapping strips `vision_model.`), vLLM only the second: `There is no module or parameter named
'vision_tower.embeddings'`. So the embedded default model is stored with the hub's names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOWER = "vision_tower."
HUB_TOWER = "vision_tower.vision_model."


def hub_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under the hub's names: the vision tower's keys gain `vision_model.`."""
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith(TOWER) and not key.startswith(HUB_TOWER):
            key = HUB_TOWER + key[len(TOWER) :]
        renamed[key] = tensor
    return renamed


def save_in_hub_layout(folder: str | Path) -> None:
    """Rewrite `folder/model.safetensors` (a single-file checkpoint saved by save_pretrained) with the hub's names."""
    path = Path(folder) / "model.safetensors"
    save_file(hub_layout(load_file(path)), path, metadata={"format": "pt"})
