"""Calibration sets for the K search: JSONL files of {"image": path, "question": text}, or the bundled one."""

from __future__ import annotations

import json
from pathlib import Path

from vtw_core.analysis.k_search import CalibrationSample
from vtw_core.assets import ASSETS_DIR
from vtw_core.errors import InputError
from vtw_core.models.images import load_image

BUNDLED = ASSETS_DIR / "calibration" / "default.jsonl"


def load_calibration(source: str | Path = "default", limit: int | None = None) -> list[CalibrationSample]:
    """Samples from a JSONL file (image paths relative to the file), or the bundled set for "default"."""
    path = BUNDLED if str(source) == "default" else Path(source)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question = row["image"], row["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f'{path.name}, line {number}: expected {{"image": ..., "question": ...}}') from error
        images = [image] if isinstance(image, str) else list(image)
        samples.append(CalibrationSample(question, [load_image(path.parent / name) for name in images]))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise InputError(f"{path} holds no samples")
    return samples
