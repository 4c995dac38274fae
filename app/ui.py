"""The Gradio page: one question, two panes streaming the baseline and the VTW answer, live counters.

Layout and wiring only; what happens on each event lives in `app.handlers` as plain functions.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from app import handlers
from app.gpu import on_gpu
from app.handlers import ChatState
from vtw_core.errors import InputError
from vtw_core.generate import SamplingConfig
from vtw_core.manager import ModelManager
from vtw_core.plots import attention_figure, kl_curve_figure
from vtw_core.search import check_eta, default_eta
from vtw_core.validation import check_float, check_k

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = ASSETS / "examples"
CSS = """
.counters { font-size: 0.88em; }
.counters ul { margin: 0; }
#summary { min-height: 3em; }
"""
EXAMPLE_QUESTIONS = {
    "easyvqa-0": "what is the red shape?",
    "easyvqa-1": "what is the color of the rectangle?",
    "easyvqa-2": "is there a rectangle?",
    "astronaut": "Who or what is in this picture?",
    "coffee": "What is on the table?",
    "chelsea": "What animal is this, and what colour is it?",
    "rocket": "What is happening in this photo?",
}


def method_choices() -> list[tuple[str, str]]:
    """VTW, FastV, and every schedule JSON under assets/schedules (e.g. from `schedule-search --out`)."""
    choices = [("VTW (K from the slider)", "vtw"), ("FastV (from layer K, cut R)", "fastv")]
    for path in sorted((ASSETS / "schedules").glob("*.json")):
        choices.append((f"schedule: {path.stem}", f"schedule:{path.stem}"))  # by name: no server paths on the page
    return choices


def example_inputs() -> list[dict[str, Any]]:
    """Examples for the question box: every image under assets/examples with a question."""
    examples = []
    # easy-vqa first: the embedded default model was trained on that kind of picture and question.
    for path in sorted(EXAMPLES.glob("*.png")) + sorted(EXAMPLES.glob("*.jpg")):
        question = EXAMPLE_QUESTIONS.get(path.stem, "What is in this picture?")
        examples.append({"text": question, "files": [str(path)]})
    return examples


class StopEvents:
    """One stop flag per browser session, so Stop ends only that session's answer."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
            return event

    def stop(self, session: str) -> None:
        with self._lock:
            if session in self._events:
                self._events[session].set()


def build_demo(manager: ModelManager, banner: str = "") -> gr.Blocks:
    info = manager.info
    default_k = info.searched_k or max(1, info.num_layers // 2)
    eta_default, eta_source = default_eta(info.source)
    allowed_roots = [Path(gr.utils.get_upload_folder()), ASSETS]
    stop_events = StopEvents()

    @on_gpu
    def stream_answers(state: ChatState, k: int, params: SamplingConfig, mode: str, session: str, method: str):
        # Only plain values cross this boundary (ZeroGPU runs it in another process).
        yield from handlers.answer_last_turn(manager, state, k, params, mode, stop_events.fresh(session), method)

    @on_gpu
    def compare_on_device(image: str, question: str, k: int, max_new_tokens: int) -> dict[str, Any]:
        return handlers.compare_once(manager, image, question, k, max_new_tokens)

    @on_gpu
    def search_on_device(samples: list, eta: float, progress: Any = None) -> dict[str, Any]:
        return handlers.search_k_result(manager, samples, eta, progress)

    @on_gpu
    def attention_on_device(chat: ChatState, side: str, k: int) -> dict[str, Any]:
        return handlers.attention_report(manager, chat, side, k)

    def search_api(eta: float) -> dict[str, Any]:
        try:
            eta = check_eta(eta)  # before the calibration set is read
            result = search_on_device(handlers.calibration_for("bundled", ChatState()), eta)
            return {"k": result["k"], "eta": result["eta"], "curve": result["curve"]}
        except Exception as error:
            raise gr.Error(handlers.log_failure(error, "/search_k"), print_exception=False) from error

    def compare_api(image: str | None, question: str, k: float, max_new_tokens: float) -> dict[str, Any]:
        try:
            if not image:
                raise InputError("an image file is required")
            handlers.check_image_path(image, allowed_roots)
            return compare_on_device(image, question, k, max_new_tokens)
        except Exception as error:  # API callers get the reason, not a bare "error"
            raise gr.Error(handlers.log_failure(error, "/compare"), print_exception=False) from error

    with gr.Blocks(title="VTW Chat") as demo:
        gr.Markdown(
            "# VTW Chat · Visual Tokens Withdrawal, side by side\n"
            "The first **K** decoder layers see the image; then every vision token is withdrawn and the deeper "
            "layers see only text. Same weights, same question: the baseline on the left, VTW on the right.\n\n"
            f"{handlers.header(manager)}" + (f"\n\n{banner}" if banner else "")
        )
        state = gr.State(ChatState())
        with gr.Row(equal_height=True):
            with gr.Column():
                baseline_chat = gr.Chatbot(label="Baseline", height=420, elem_id="baseline-chat")
                baseline_counters = gr.Markdown(handlers.NO_ANSWER, elem_classes="counters", elem_id="baseline-stats")
            with gr.Column():
                vtw_chat = gr.Chatbot(label=f"VTW (K = {default_k})", height=420, elem_id="vtw-chat")
                vtw_counters = gr.Markdown(handlers.NO_ANSWER, elem_classes="counters", elem_id="vtw-stats")
        summary = gr.Markdown(handlers.format_summary({}), elem_id="summary")
        question = gr.MultimodalTextbox(
            placeholder="Upload or paste an image, then ask about it",
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            label="Your question",
            elem_id="question",
        )
        with gr.Row():
            k = gr.Slider(
                0,
                info.num_layers,
                value=default_k,
                step=1,
                label="K: decoder layers that still see the image",
                info=f"{info.num_layers} = the unchanged model",
                elem_id="k-slider",
            )
            method = gr.Dropdown(
                method_choices(),
                value="vtw",
                label="Accelerated side",
                info="FastV cuts from layer K (the slider) with ratio R; schedules come from assets/schedules",
                elem_id="method",
            )
            fastv_ratio = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="FastV R (share of vision tokens cut)")
            mode = gr.Radio(
                [("one after the other (honest timings)", "sequential"), ("race (concurrent, contended)", "race")],
                value="sequential",
                label="How the two sides run",
            )
        with gr.Row():
            stop = gr.Button("Stop", variant="stop", elem_id="stop")
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Parameters", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="max new tokens")
                do_sample = gr.Checkbox(False, label="sample (greedy when off: answers comparable token for token)")
            with gr.Row():
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
                seed = gr.Number(0, label="seed (both sides)", minimum=0)
        with gr.Accordion("Search K (the paper's KL criterion)", open=False):
            gr.Markdown(
                "For each calibration sample, the next-token distribution of VTW at every K from 5 to N-1 is "
                "compared with the baseline's (KL divergence at the last prompt position); K is the first one "
                "whose mean KL is under eta."
            )
            with gr.Row():
                search_source = gr.Radio(
                    [("bundled calibration set (20 photos)", "bundled"), ("the current turn", "turn")],
                    value="bundled",
                    label="calibrate on",
                )
                eta = gr.Number(eta_default, label="eta", info=f"default: {eta_source}", minimum=0)
                search_button = gr.Button("Search K", variant="primary", elem_id="search-k")
            search_text = gr.Markdown(elem_id="search-result")
            search_plot = gr.Plot(label="KL vs K", elem_id="search-plot")
        with gr.Accordion("Attention per layer (paper Fig. 4)", open=False):
            with gr.Row():
                attention_side = gr.Radio(
                    [("baseline", "baseline"), ("VTW at the slider's K", "vtw")], value="baseline", label="model"
                )
                attention_button = gr.Button("Analyse the current turn", elem_id="attention")
            attention_text = gr.Markdown()
            with gr.Row():
                attention_prompt_plot = gr.Plot(label="last prompt token")
                attention_output_plot = gr.Plot(label="generated tokens")
        gr.Examples(example_inputs(), inputs=[question], label="Examples")

        chat_outputs = [state, baseline_chat, vtw_chat, baseline_counters, vtw_counters, summary]

        def render(chat: ChatState, shown: dict[str, str]) -> tuple:
            return (
                chat,
                chat.display("baseline"),
                chat.display("vtw"),
                shown["baseline"],
                shown["vtw"],
                shown["summary"],
            )

        def method_of(choice: str, ratio: float) -> str:
            return f"fastv:{check_float(ratio, 'FastV R', 0, 1):g}" if choice == "fastv" else choice

        def run_turn(chat, k_value, mode_value, params, request: gr.Request, method_value="vtw"):
            shown = handlers.counters({"baseline": None, "vtw": None}, mode_value)
            latest = chat
            try:
                answers = stream_answers(chat, k_value, params, mode_value, request.session_hash, method_value)
                for latest, shown in answers:
                    yield render(latest, shown)
            except Exception as error:  # the page keeps serving: say why, keep the chat consistent
                message = handlers.log_failure(error, "answer")
                gr.Warning(message)
                handlers.undo_last_turn(latest)
                yield render(latest, {**shown, "summary": f"⚠️ {message}"})

        def on_submit(
            message, chat, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio,
            request: gr.Request,
        ):  # fmt: skip
            message = message or {}
            try:
                check_k(k_value, info.num_layers)  # every parameter first: nothing changes if one is bad
                params = handlers.sampling_config(tokens, sample, temp, nucleus, seed_value)
                method_value = method_of(choice, ratio)
                handlers.add_turn(chat, message.get("text"), list(message.get("files", [])), allowed_roots)
            except Exception as error:
                reason = handlers.log_failure(error, "question")
                gr.Warning(reason)
                shown = {**handlers.counters(chat.results), "summary": f"⚠️ {reason}"}
                # Keep the typed question, drop the files: a rejected image would only be rejected again.
                kept = {"text": message.get("text") or "", "files": []}
                yield (*render(chat, shown), gr.MultimodalTextbox(value=kept))
                return
            for rendered in run_turn(chat, k_value, mode_value, params, request, method_value):
                yield (*rendered, gr.MultimodalTextbox(value=None))

        def on_regenerate(
            chat, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio, request: gr.Request
        ):
            try:
                check_k(k_value, info.num_layers)
                params = handlers.sampling_config(tokens, sample, temp, nucleus, seed_value)
                method_value = method_of(choice, ratio)
                handlers.drop_last_answers(chat)
            except Exception as error:
                gr.Warning(handlers.log_failure(error, "regenerate"))
                yield render(chat, handlers.counters(chat.results))
                return
            yield from run_turn(chat, k_value, mode_value, params, request, method_value)

        parameters = [k, mode, max_new_tokens, do_sample, temperature, top_p, seed, method, fastv_ratio]
        question.submit(
            on_submit,
            [question, state, *parameters],
            [*chat_outputs, question],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )
        regenerate.click(
            on_regenerate,
            [state, *parameters],
            chat_outputs,
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )

        def on_stop(request: gr.Request) -> None:
            stop_events.stop(request.session_hash)

        stop.click(on_stop, None, None, queue=False, api_visibility="private")

        def on_clear():
            fresh = ChatState()
            return render(fresh, handlers.counters(fresh.results))

        clear.click(on_clear, None, chat_outputs, queue=False, api_visibility="private")

        def pane_title(k_value, choice, ratio):
            try:
                k_value, ratio = check_k(k_value, info.num_layers), check_float(ratio, "FastV R", 0, 1)
            except InputError:
                return gr.Chatbot()  # a bad value is refused when the question is sent; keep the title
            if choice == "vtw":
                return gr.Chatbot(label=f"VTW (K = {int(k_value)})")
            if choice == "fastv":
                return gr.Chatbot(label=f"FastV (K = {int(k_value)}, R = {float(ratio):g})")
            return gr.Chatbot(label=f"Schedule {Path(choice.split(':', 1)[1]).stem}")

        for control in (k, method, fastv_ratio):
            control.change(pane_title, [k, method, fastv_ratio], vtw_chat, api_visibility="private")

        def on_search(source, eta_value, chat, k_value, progress=gr.Progress()):
            try:
                progress(0, desc="K search")
                eta_checked = check_eta(eta_value)
                samples = handlers.calibration_for(source, chat)
                result = search_on_device(samples, eta_checked, lambda done, total: progress((done, total)))
            except Exception as error:
                message = handlers.log_failure(error, "Search K")
                gr.Warning(message)
                return gr.Slider(value=k_value), f"⚠️ {message}", None
            new_k = result["k"] if result["k"] is not None else k_value
            return gr.Slider(value=new_k), handlers.describe_search(result, source), kl_curve_figure(result)

        search_button.click(
            on_search,
            [search_source, eta, state, k],
            [k, search_text, search_plot],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )

        def on_attention(chat, side, k_value):
            try:
                report = attention_on_device(chat, side, k_value)
            except Exception as error:
                message = handlers.log_failure(error, "attention")
                gr.Warning(message)
                return f"⚠️ {message}", None, None
            output_plot = attention_figure(report, "generated") if report["generated"] else None
            return handlers.describe_attention(report), attention_figure(report, "prompt"), output_plot

        attention_button.click(
            on_attention,
            [state, attention_side, k],
            [attention_text, attention_prompt_plot, attention_output_plot],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )

        with gr.Row(visible=False):  # the API's own inputs; the page never shows them
            api_image = gr.File(file_types=["image"], type="filepath", label="image")
            api_question = gr.Textbox(label="question")
            # No `precision`: Gradio would round 3.5 to 4 and fail on NaN before our checks could say why.
            api_k = gr.Number(default_k, label="k")
            api_tokens = gr.Number(64, label="max_new_tokens")
            api_result = gr.JSON(label="result")
            api_compare = gr.Button("compare")
            api_eta = gr.Number(eta_default, label="eta")
            api_search_result = gr.JSON(label="search result")
            api_search = gr.Button("search_k")
        api_compare.click(
            compare_api,
            [api_image, api_question, api_k, api_tokens],
            api_result,
            api_name="compare",
            api_description="Greedy answers of the baseline and of VTW at K for one image and question, with stats.",
            concurrency_limit=1,
            concurrency_id="device",
        )
        api_search.click(
            search_api,
            [api_eta],
            api_search_result,
            api_name="search_k",
            api_description="The K search (KL criterion) on the bundled calibration set: {k, eta, curve}.",
            concurrency_limit=1,
            concurrency_id="device",
        )
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch_options() -> dict[str, Any]:
    """Options for `demo.launch`: theme and CSS (Gradio 6 takes them there), upload limits."""
    return {"css": CSS, "theme": gr.themes.Soft(), "max_file_size": "20mb", "allowed_paths": [str(EXAMPLES)]}
