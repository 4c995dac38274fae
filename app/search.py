"""Search K: the KL criterion's defaults for the loaded model, the calibration sets, the search and its result.

For each calibration sample the next-token distribution of VTW at every K is compared with the baseline's;
K is the first one whose mean KL is at most eta (Algorithm 1, on the shared model, holding the device).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import Cancelled
from app.media import is_default_model
from app.session import ChatState
from vtw_core.analysis.calibration import load_calibration
from vtw_core.analysis.k_search import CalibrationSample, Progress, check_eta, search_k
from vtw_core.analysis.units import format_kl
from vtw_core.benchmarks.evaluate import train_calibration
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.models.images import load_image


@dataclass(frozen=True)
class SearchSettings:
    """The K search's defaults for the loaded model, and one sentence saying why."""

    calibration: list[tuple[str, str]]  # (label, value) choices; the first is the default
    criterion: str  # "prompt" (the paper) or "reply"
    eta: float
    eta_source: str
    explanation: str


CRITERIA = [
    ("KL at the last prompt position (the paper)", "prompt"),
    ("KL over the reply (teacher-forced)", "reply"),
]


def search_settings(manager: ModelManager) -> SearchSettings:
    """easy-vqa train questions and the shipped criterion for the default model; bundled photos otherwise."""
    from vtw_core.analysis.k_search import default_eta

    turn = ("the current turn", "turn")
    shipped = _shipped_search(manager.info.source)
    if is_default_model(manager) and shipped:
        criterion = shipped.get("kl_over", "prompt")
        eta = float(shipped.get("kl_threshold", default_eta(manager.info.source)[0]))
        reason = (
            "its replies open with a word read off the image (the shape or its colour), so the next token at the "
            "last prompt position depends on the image"
            if criterion == "prompt"
            else "its replies open with words that follow from the question, so the last prompt position barely "
            "depends on the image"
        )
        why = (
            "The embedded default model was trained on easy-vqa, so it is calibrated on 20 easy-vqa train "
            f"questions with the criterion its shipped K = {shipped.get('k')} was chosen by "
            f"({dict((v, k) for k, v in CRITERIA)[criterion]}): {reason}."
        )
        return SearchSettings([("easy-vqa train questions (20)", "easy-vqa"), turn], criterion, eta,
                              "the shipped vtw.json", why)  # fmt: skip
    eta, source = default_eta(manager.info.source)
    why = (
        "A real checkpoint is calibrated on the 20 bundled photos with the paper's criterion, the KL of the next "
        "token at the last prompt position, as the official VTW code does."
    )
    return SearchSettings([("bundled photos (20)", "bundled"), turn], "prompt", eta, source, why)


def _shipped_search(source: str) -> dict[str, Any] | None:
    """The checkpoint's vtw.json (how its K was chosen), if it has a readable one."""
    try:
        return json.loads((Path(source) / "vtw.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def calibration_for(source: str, state: ChatState) -> list[CalibrationSample]:
    """The bundled photos, 20 easy-vqa train questions, or the chat's last question with its images ("turn")."""
    if source == "bundled":
        return load_calibration("default")
    if source == "easy-vqa":
        return train_calibration(20)
    if source != "turn":
        raise InputError(f"calibrate on 'bundled', 'easy-vqa' or 'turn', got {source!r}")
    if not state.turns:
        raise InputError("ask a question first, or search K on the calibration set")
    if state.has_video():
        raise InputError("the K search calibrates on images only; search on the calibration set instead")
    paths = [path for turn in state.turns for path in turn.image_paths]
    return [CalibrationSample(state.turns[-1].text, [load_image(path) for path in paths])]


def search_k_result(
    manager: ModelManager,
    samples: list[CalibrationSample],
    eta: float,
    progress: Progress | None = None,
    over: str = "prompt",
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Algorithm 1 on the shared model, holding the device; plain JSON (k, eta, curve, ...).

    `should_stop` is asked after every sample (the search's progress callback); when it says yes the search
    ends with `Cancelled` and the device is free again.
    """
    eta = check_eta(eta)
    if manager.processor is None:
        raise InputError("this model has no processor; it cannot run the K search")

    def report(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"the K search was stopped after {done} of {total} samples")
        if progress is not None:
            progress(done, total)

    with manager.lock:
        if should_stop is not None and should_stop():
            raise Cancelled("the K search was stopped before it started")
        result = search_k(manager.model, manager.processor, samples, eta=eta, progress=report, over=over)
    return {**result.to_dict(), "over": over}


def describe_search(result: dict[str, Any], source: str) -> str:
    where = {"bundled": "the bundled photos", "easy-vqa": "easy-vqa train questions"}.get(source, "the current turn")
    over = {"prompt": "KL at the last prompt position", "reply": "KL over the reply"}.get(result.get("over"), "KL")
    if result["k"] is None:
        first = result["curve"][0]["k"] if result["curve"] else "-"
        return (
            f"No K from {first} to {result['num_layers'] - 1} keeps the mean {over} under eta = {result['eta']:g} "
            f"on {where} ({result['samples']} sample(s)); the slider is unchanged."
        )
    kl = next(point["kl"] for point in result["curve"] if point["k"] == result["k"])
    return (
        f"**K = {result['k']}** of {result['num_layers']} layers: the first K whose mean {over} ({format_kl(kl)}) "
        f"is at most eta = {result['eta']:g} on {where} ({result['samples']} sample(s)). The slider moved to it."
    )
