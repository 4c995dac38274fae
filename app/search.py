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
from vtw_core.analysis.k_search import DEFAULT_START, CalibrationSample, Progress, check_eta, search_k
from vtw_core.analysis.units import format_kl
from vtw_core.benchmarks.evaluate import train_calibration
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.models.images import load_image


@dataclass(frozen=True)
class Searched:
    """The K that a session's last K search chose (it moved the slider there), and that search's eta."""

    k: int
    eta: float


@dataclass(frozen=True)
class SearchSettings:
    """The K search's defaults for the loaded model, and one sentence saying why."""

    calibration: list[tuple[str, str]]  # (label, value) choices; the first is the default
    criterion: str  # "prompt" (the paper) or "reply"
    eta: float
    eta_source: str
    explanation: str
    # Where every session's `Searched` starts: the starting K and the eta of the search that chose it (the
    # default model's shipped vtw.json); None when no search chose the starting K.
    starting: Searched | None = None


CRITERIA = [
    ("KL at the last prompt position (the paper)", "prompt"),
    ("KL over the reply (teacher-forced)", "reply"),
]
# The calibration sets a search can run on without a chat (the page adds the current turn), and their names.
CALIBRATION_SETS = {"easy-vqa": "easy-vqa train questions", "bundled": "the bundled photos"}


def searched_eta(k: int, searched: Searched | None) -> float | None:
    """The eta to name with a turn's K: the eta of the session's own search when it chose this K; None for a K
    set by hand (or by nothing this session searched), so that a footer names eta only for a searched K."""
    return searched.eta if searched is not None and searched.k == k else None


def check_criterion(value: Any) -> str:
    """The K search criterion: "prompt" (the paper: KL at the last prompt position) or "reply"."""
    names = [name for _, name in CRITERIA]
    if value not in names:
        raise InputError(f"criterion must be one of {', '.join(names)}; got {value!r}")
    return value


def check_calibration_set(value: Any) -> str:
    """A calibration set an API call can name: the easy-vqa train questions or the bundled photos."""
    if value not in CALIBRATION_SETS:
        raise InputError(f"calibration must be one of {', '.join(CALIBRATION_SETS)}; got {value!r}")
    return value


def search_settings(manager: ModelManager) -> SearchSettings:
    """easy-vqa train questions and the shipped criterion for the default model; bundled photos otherwise."""
    from vtw_core.analysis.k_search import default_eta

    turn = ("the current turn", "turn")
    shipped = _shipped_search(manager.info.source)
    if is_default_model(manager) and shipped:
        criterion = shipped.get("kl_over", "prompt")
        eta = float(shipped.get("kl_threshold", default_eta(manager.info.source)[0]))
        # The starting K is the shipped search's choice at this eta.
        starting = Searched(manager.info.searched_k, eta) if manager.info.searched_k is not None else None
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
                              "the shipped vtw.json", why, starting)  # fmt: skip
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


def api_search_payload(result: dict[str, Any], source: str) -> dict[str, Any]:
    """What `/search_k` returns: K, and the set, criterion and eta that chose it, with the KL curve."""
    return {
        "k": result["k"],
        "eta": result["eta"],
        "criterion": result.get("over", "prompt"),
        "calibration": source,
        "samples": result["samples"],
        "num_layers": result["num_layers"],
        "smallest_k_tried": result["curve"][0]["k"] if result["curve"] else None,
        "curve": result["curve"],
    }


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


def describe_search(result: dict[str, Any], source: str, previous_k: Any = None) -> str:
    """The search's outcome; `previous_k`, the slider's value before it, says whether the slider moved."""
    where = {**CALIBRATION_SETS, "turn": "the current turn"}.get(source, "the current turn")
    over = {"prompt": "KL at the last prompt position", "reply": "KL over the reply"}.get(result.get("over"), "KL")
    first = result["curve"][0]["k"] if result["curve"] else DEFAULT_START
    last = result["num_layers"] - 1
    on = f"on {where} ({result['samples']} sample(s))"
    if result["k"] is None:
        return (
            f"No K from {first} to {last} keeps the mean {over} under eta = {result['eta']:g} {on}; the slider "
            "is unchanged."
        )
    k = result["k"]
    kl = format_kl(next(point["kl"] for point in result["curve"] if point["k"] == k))
    if k == first:  # the search's floor: a smaller K might meet eta too, but it is never tried
        text = (
            f"**K = {k}**, the smallest K the search tries (it tries K = {first} to {last}): its mean {over} ({kl}) "
            f"is at most eta = {result['eta']:g} {on}."
        )
    else:
        text = (
            f"**K = {k}** of {result['num_layers']} layers: the first K whose mean {over} ({kl}) is at most "
            f"eta = {result['eta']:g} {on}."
        )
    return text + _slider_note(previous_k, k)


def _slider_note(previous_k: Any, k: int) -> str:
    """Whether the search moved the K slider: only a changed value is said to have moved."""
    if previous_k is None:
        return ""
    try:
        previous = int(previous_k)
    except (TypeError, ValueError):
        return " The slider moved to it."
    return " The slider was already there." if previous == k else f" The slider moved from {previous} to it."
