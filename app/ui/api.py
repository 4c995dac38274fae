"""The page's public API: `/compare` (one image and question, baseline and VTW) and `/search_k` (the K search).

Their inputs are hidden components the page never shows; API callers get the reason when a call fails.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from gradio_client import handle_file

from app.errors import log_failure
from app.media import check_upload_path
from app.search import calibration_for
from app.session import ChatState
from app.ui.context import ON_DEVICE, PageContext
from vtw_core.analysis.k_search import check_eta
from vtw_core.errors import InputError

# Gradio's own example image for the API page: /compare takes an image, not the PDF a plain gr.File shows.
API_EXAMPLE_IMAGE = "https://raw.githubusercontent.com/gradio-app/gradio/main/test/test_files/bus.png"


def add_api(context: PageContext) -> None:
    activity = context.activity

    def search_api(eta: float) -> dict[str, Any]:
        try:
            eta = check_eta(eta)  # before the calibration set is read
            with activity.running("a K search (API)"):
                result = context.device.search(calibration_for("bundled", ChatState()), eta)
            return {"k": result["k"], "eta": result["eta"], "curve": result["curve"]}
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

    with gr.Row(visible=False):  # the API's own inputs; the page never shows them
        api_image = gr.File(file_types=["image"], type="filepath", label="image")
        # The API page builds its example from the component's example value: an image, not gr.File's PDF.
        api_image.example_payload = lambda: handle_file(API_EXAMPLE_IMAGE)  # type: ignore[method-assign]
        api_image.example_value = lambda: API_EXAMPLE_IMAGE  # type: ignore[method-assign]
        api_question = gr.Textbox(label="question")
        # No `precision`: Gradio would round 3.5 to 4 and fail on NaN before our checks could say why.
        api_k = gr.Number(context.default_k, label="k")
        api_tokens = gr.Number(64, label="max_new_tokens")
        api_result = gr.JSON(label="result")
        api_compare = gr.Button("compare")
        api_eta = gr.Number(context.search.eta, label="eta")
        api_search_result = gr.JSON(label="search result")
        api_search = gr.Button("search_k")
    api_compare.click(
        compare_api,
        [api_image, api_question, api_k, api_tokens],
        api_result,
        api_name="compare",
        api_description="Greedy answers of the baseline and of VTW at K for one image and question, with stats.",
        **ON_DEVICE,
    )
    api_search.click(
        search_api,
        [api_eta],
        api_search_result,
        api_name="search_k",
        api_description="The K search (KL criterion) on the bundled calibration set: {k, eta, curve}.",
        **ON_DEVICE,
    )
