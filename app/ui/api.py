"""The page's public API: `/compare` (one image and question, baseline and VTW) and `/search_k` (the K search).

Their inputs are hidden components the page never shows. The "Use via API" page builds its examples from them:
a bundled example image sent with `handle_file` and its question, so the snippets run offline from the
repository's root. `/search_k` searches as the page does for the loaded model (the same calibration set,
criterion and eta by default) and says which it used. A refused call leaves one log line and the caller gets
the reason, whether our checks refuse it or Gradio cannot read its inputs (`unreadable_inputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.errors import log_failure
from app.media import ASSETS, check_upload_path, example_files
from app.search import (
    CALIBRATION_SETS,
    CRITERIA,
    api_search_payload,
    calibration_for,
    check_calibration_set,
    check_criterion,
)
from app.session import ChatState
from app.ui.context import ON_DEVICE, PageContext
from vtw_core.analysis.k_search import check_eta
from vtw_core.errors import InputError

ROOT = ASSETS.parent  # the snippets name the example image relative to the repository's root
# The inputs of each endpoint, in order, for the message when a call sends too few.
API_INPUTS = {"compare": ("image", "question", "k", "max_new_tokens"), "search_k": ("eta", "criterion", "calibration")}
FALLBACK_QUESTION = "What shape is in the image?"


def api_example(context: PageContext) -> tuple[str, str]:
    """The API page's example: a bundled image (a path relative to the repository's root) and its question."""
    examples = example_files(context.default_model)
    if not examples:
        return "assets/examples/easyvqa-0.png", FALLBACK_QUESTION
    path, question = examples[0]
    return path.relative_to(ROOT).as_posix(), question


def file_example(path: str) -> dict[str, Any]:
    """A file example the snippets show as `handle_file('PATH')` (they do so for a file with a "url")."""
    return {"path": path, "url": path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}


def unreadable_inputs(error: BaseException, endpoint: str, received: int) -> gr.Error:
    """The refusal of an API call whose inputs Gradio could not read (before our function ran): one log line.

    Gradio refuses these itself with a traceback in the log and an opaque error for the caller: a file that
    was not uploaded with the request (a path on the server), a URL it cannot download (offline), a value of
    the wrong shape, too few inputs.
    """
    names = API_INPUTS.get(endpoint, ())
    first_line = (str(error).strip().splitlines() or [""])[0]
    upload = "send the file itself: gradio_client's handle_file('photo.png') uploads it with the request"
    if isinstance(error, gr.Error):
        reason = error.message
    elif "didn't receive enough input values" in first_line:
        reason = f"/{endpoint} takes {len(names)} inputs ({', '.join(names)}), got {received}"
    elif type(error).__name__ == "InvalidPathError":
        reason = f"a file input names a path on the server, which is not read; {upload}"
    elif type(error).__name__ == "ValidationError":
        reason = f"a file input is not a file; {upload}"
    elif "hostname" in first_line.lower() or "url" in first_line.lower() or "http" in first_line.lower():
        reason = f"a file's URL could not be downloaded ({first_line}); offline, {upload}"
    else:
        reason = f"the inputs could not be read ({type(error).__name__}: {first_line})"
    message = log_failure(InputError(reason), f"/{endpoint}")
    return gr.Error(message, print_exception=False)


def add_api(context: PageContext) -> None:
    activity = context.activity
    search = context.search
    default_calibration = next((value for _, value in search.calibration if value in CALIBRATION_SETS), "bundled")

    def search_api(eta: float, criterion: str, calibration: str) -> dict[str, Any]:
        try:
            eta = check_eta(eta)  # every input before the calibration set is read
            over = check_criterion(criterion)
            source = check_calibration_set(calibration)
            samples = calibration_for(source, ChatState())
            with activity.running("a K search (API)"):
                result = context.device.search(samples, eta, None, over)
            return api_search_payload(result, source)
        except Exception as error:
            raise gr.Error(log_failure(error, "/search_k"), print_exception=False) from error

    def compare_api(image: str | None, question: str, k: float, max_new_tokens: float) -> dict[str, Any]:
        try:
            if not image:
                raise InputError("an image file is required")
            check_upload_path(image, context.allowed_roots)
            with activity.running("a /compare API call"):
                return context.device.compare(image, question, k, max_new_tokens)
        except Exception as error:  # API callers get the reason, not a bare "error"
            raise gr.Error(log_failure(error, "/compare"), print_exception=False) from error

    image_path, question = api_example(context)
    with gr.Row(visible=False):  # the API's own inputs; the page never shows them
        api_image = gr.File(file_types=["image"], type="filepath", label="image")
        # The snippets take each example from the component: a bundled image, not gr.File's remote PDF.
        api_image.example_payload = lambda: file_example(image_path)  # type: ignore[method-assign]
        api_image.example_value = lambda: image_path  # type: ignore[method-assign]
        api_question = gr.Textbox(label="question")
        api_question.example_payload = lambda: question  # type: ignore[method-assign]
        api_question.example_value = lambda: question  # type: ignore[method-assign]
        # No `precision`: Gradio would round 3.5 to 4 and fail on NaN before our checks could say why.
        api_k = gr.Number(context.default_k, label="k")
        api_tokens = gr.Number(64, label="max_new_tokens")
        api_result = gr.JSON(label="result")
        api_compare = gr.Button("compare")
        api_eta = gr.Number(search.eta, label="eta")
        # Custom values pass through to our checks, whose refusal names the valid ones.
        api_criterion = gr.Dropdown([value for _, value in CRITERIA], value=search.criterion, label="criterion",
                                    allow_custom_value=True)  # fmt: skip
        api_calibration = gr.Dropdown(list(CALIBRATION_SETS), value=default_calibration, label="calibration",
                                      allow_custom_value=True)  # fmt: skip
        api_search_result = gr.JSON(label="search result")
        api_search = gr.Button("search_k")
    api_compare.click(
        compare_api,
        [api_image, api_question, api_k, api_tokens],
        api_result,
        api_name="compare",
        api_description=(
            "Greedy answers of the baseline and of VTW at K for one image and question, with their stats. Send a "
            f"local image with handle_file (the example's {image_path} is bundled with the repository: run it "
            "from the repository's root)."
        ),
        **ON_DEVICE,
    )
    api_search.click(
        search_api,
        [api_eta, api_criterion, api_calibration],
        api_search_result,
        api_name="search_k",
        api_description=(
            "The K search (Algorithm 1: the smallest K from 5 whose mean KL is at most eta). The defaults are the "
            f"page's for this model: calibration {default_calibration!r} ({CALIBRATION_SETS[default_calibration]}), "
            f"criterion {search.criterion!r}, eta {search.eta:g}. Returns k with the calibration, criterion and "
            "eta it used, the samples, and the KL curve."
        ),
        **ON_DEVICE,
    )
