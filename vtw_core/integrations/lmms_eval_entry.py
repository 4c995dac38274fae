"""The entry point lmms-eval reads (group `lmms_eval.models`): it names the `vtw` model without importing it.

lmms-eval loads every registered entry point at start, whatever model is asked for, so this module stays
light; the model class is imported only when `--model vtw` is used.
"""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtw", simple_class_path="vtw_core.integrations.lmms_eval.VTW")
