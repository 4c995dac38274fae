"""The Gradio page: one shared question, two panes streaming the baseline and the accelerated answer, a metrics table.

Layout and wiring only; what happens on each event lives in `app.handlers` as plain functions. Long actions
(a chat turn, a benchmark, a K search) take a ticket when the user acts, in a step outside the queue, and do
the work in a second, queued step: Stop cancels a ticket whether its work runs or still waits in the queue.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio_client import handle_file

from app import handlers
from app.gpu import on_gpu
from app.handlers import ChatState
from vtw_core.analysis.k_search import check_eta
from vtw_core.analysis.plots import attention_figure, kl_curve_figure
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.models.videos import LIMITS
from vtw_core.validation import check_float, check_k

ASSETS = handlers.ASSETS
EXAMPLES = handlers.EXAMPLES
# Gradio's own example image for the API page: /compare takes an image, not the PDF a plain gr.File shows.
API_EXAMPLE_IMAGE = "https://raw.githubusercontent.com/gradio-app/gradio/main/test/test_files/bus.png"
CSS = """
.gradio-container { max-width: 1400px !important; }
#title h1 { font-size: 1.35em; margin: 0; }
#title p { margin: 0.2em 0; font-size: 0.9em; }
#status { font-size: 0.9em; }
#status p { margin: 0; }
#metrics table { font-size: 0.85em; margin: 0; }
#metrics td, #metrics th { padding: 2px 8px; }
#timing-note { font-size: 0.8em; opacity: 0.8; }
#pane-toggle { display: none; }
/* Phones: the panes stack, so a toggle shows one answer at a time instead of a long scroll. */
@media (max-width: 767px) {
  #pane-toggle { display: block; }
  #panes:not([data-pane="vtw"]) #vtw-column { display: none !important; }
  #panes[data-pane="vtw"] #baseline-column { display: none !important; }
}
"""
SHOW_PANE_JS = "(pane) => { document.querySelector('#panes').dataset.pane = pane; return pane; }"


def method_choices() -> list[tuple[str, str]]:
    """VTW, FastV, and every schedule JSON under assets/schedules (e.g. from `schedule-search --out`)."""
    choices = [("VTW", "vtw"), ("FastV", "fastv")]
    for path in sorted((ASSETS / "schedules").glob("*.json")):
        choices.append((f"schedule: {path.stem}", f"schedule:{path.stem}"))  # by name: no server paths on the page
    return choices


def example_inputs(default_model: bool = True) -> list[dict[str, Any]]:
    """Examples for the question box that fit the model (see `handlers.example_files`)."""
    return [{"text": question, "files": [str(path)]} for path, question in handlers.example_files(default_model)]


def method_of(choice: str, ratio: Any) -> str:
    """The method control's value as the handlers name it: "vtw", "fastv:R" or "schedule:NAME"."""
    return f"fastv:{check_float(ratio, 'FastV R', 0, 1):g}" if choice == "fastv" else choice


@on_gpu
def warm_up_on_device(manager: ModelManager, k: int, image: Path) -> None:
    """The untimed first pass of each path; a failure only costs the first turn's timings, never the page."""
    try:
        handlers.warm_up(manager, k, image)
    except Exception as error:
        handlers.logger.warning("warm-up skipped: %s", handlers.error_message(error))


def build_demo(manager: ModelManager, banner: str = "") -> gr.Blocks:
    info = manager.info
    default_k = info.searched_k or max(1, info.num_layers // 2)
    default_model = handlers.is_default_model(manager)
    search = handlers.search_settings(manager)
    allowed_roots = [Path(gr.utils.get_upload_folder()), ASSETS]
    sessions = handlers.Sessions()
    activity = handlers.DeviceActivity()
    examples = handlers.example_files(default_model)
    with_video = handlers.takes_video(manager)  # the video input exists only where the model answers about videos
    if examples:
        warm_up_on_device(manager, default_k, examples[0][0])

    @on_gpu
    def stream_answers(chat: ChatState, k: int, params: Any, mode: str, stop: Any, method: str, eta: Any):
        # Only plain values cross this boundary (ZeroGPU runs it in another process).
        yield from handlers.answer_last_turn(manager, chat, k, params, mode, stop, method, eta)

    @on_gpu
    def compare_on_device(image: str, question: str, k: int, max_new_tokens: int) -> dict[str, Any]:
        return handlers.compare_once(manager, image, question, k, max_new_tokens)

    @on_gpu
    def search_on_device(samples: list, eta: float, progress: Any = None, over: str = "prompt", stop: Any = None):
        return handlers.search_k_result(manager, samples, eta, progress, over, stop)

    @on_gpu
    def benchmark_on_device(chat: ChatState, k: int, method: str, repeats: Any, tokens: Any, stop: Any):
        return handlers.benchmark_turn(manager, chat, k, method, repeats, tokens, stop)

    @on_gpu
    def attention_on_device(chat: ChatState, side: str, k: int) -> dict[str, Any]:
        return handlers.attention_report(manager, chat, side, k)

    def search_api(eta: float) -> dict[str, Any]:
        try:
            eta = check_eta(eta)  # before the calibration set is read
            with activity.running("a K search (API)"):
                result = search_on_device(handlers.calibration_for("bundled", ChatState()), eta)
            return {"k": result["k"], "eta": result["eta"], "curve": result["curve"]}
        except Exception as error:
            raise gr.Error(handlers.log_failure(error, "/search_k"), print_exception=False) from error

    def compare_api(image: str | None, question: str, k: float, max_new_tokens: float) -> dict[str, Any]:
        try:
            if not image:
                raise InputError("an image file is required")
            handlers.check_upload_path(image, allowed_roots)
            with activity.running("a /compare API call"):
                return compare_on_device(image, question, k, max_new_tokens)
        except Exception as error:  # API callers get the reason, not a bare "error"
            raise gr.Error(handlers.log_failure(error, "/compare"), print_exception=False) from error

    with gr.Blocks(title="VTW Chat") as demo:
        gr.Markdown(
            "# VTW Chat · Visual Tokens Withdrawal, side by side\n"
            "The first **K** decoder layers see the image, then every vision token is withdrawn. Same weights, "
            f"same question, two answers: the unchanged model and the accelerated one. {handlers.header(manager)}"
            + (f"\n\n{banner}" if banner else ""),
            elem_id="title",
        )
        state = gr.State(ChatState())
        ticket = gr.State(None)  # the current turn's ticket, issued when the question is sent
        job_ticket = gr.State(None)  # the same for a K search or a benchmark
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                question = gr.MultimodalTextbox(
                    placeholder=(
                        "Upload an image (or a video below), then ask about it (Enter sends)"
                        if with_video
                        else "Upload or paste an image, then ask about it (Enter sends)"
                    ),
                    file_types=["image"],
                    file_count="multiple",
                    sources=["upload"],
                    show_label=False,
                    elem_id="question",
                )
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", size="sm", min_width=60)
                    regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm", min_width=60)
                    clear = gr.Button("Clear", elem_id="clear", size="sm", min_width=60)
                # Below the question, and short: the question box must stay on screen at 1280x800.
                with gr.Row(visible=with_video, elem_id="video-row", equal_height=True):
                    video = gr.Video(
                        sources=["upload"],
                        label="Video (sent with the next question)",
                        height=150,
                        # Uploads keep their audio track: without this Gradio re-encodes each upload with ffmpeg.
                        include_audio=True,
                        elem_id="video",
                        scale=3,
                        min_width=200,
                    )
                    frames = gr.Slider(
                        LIMITS.min_frames,
                        LIMITS.max_frames,
                        value=LIMITS.default_frames,
                        step=1,
                        precision=0,
                        label="frames sampled from the video",
                        elem_id="frames",
                        scale=1,
                        min_width=140,
                    )
            with gr.Column(scale=2, min_width=260):
                with gr.Row():
                    method = gr.Dropdown(
                        method_choices(),
                        value="vtw",
                        label="Accelerated side",
                        elem_id="method",
                        min_width=110,
                        scale=1,
                    )
                    k = gr.Slider(
                        0,
                        info.num_layers,
                        value=default_k,
                        step=1,
                        label=f"K: layers that see the image ({info.num_layers} = unchanged)",
                        elem_id="k-slider",
                        min_width=180,
                        scale=2,
                    )
                fastv_ratio = gr.Slider(
                    0.05, 1.0, value=0.5, step=0.05, label="FastV R (share of vision tokens cut)", visible=False,
                    elem_id="fastv-r",
                )  # fmt: skip
        status = gr.Markdown("", elem_id="status")
        pane = gr.Radio(
            [("Baseline", "baseline"), ("Accelerated", "vtw")],
            value="baseline",
            show_label=False,
            elem_id="pane-toggle",
        )
        with gr.Row(equal_height=True, elem_id="panes"):
            with gr.Column(elem_id="baseline-column", min_width=300):
                baseline_chat = gr.Chatbot(
                    label=f"Baseline (all {info.num_layers} layers)",
                    height="auto",
                    min_height=140,
                    max_height=520,
                    elem_id="baseline-chat",
                )
            with gr.Column(elem_id="vtw-column", min_width=300):
                vtw_chat = gr.Chatbot(
                    label=handlers.pane_label("vtw", default_k, 0.5, info.num_layers),
                    height="auto",
                    min_height=140,
                    max_height=520,
                    elem_id="vtw-chat",
                )
        metrics = gr.Markdown(handlers.metrics_table({}), elem_id="metrics")
        summary = gr.Markdown(handlers.format_summary({}), elem_id="summary")
        gr.Markdown(handlers.TIMING_NOTE, elem_id="timing-note")
        with gr.Accordion("Parameters", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(1, 1024, value=128, step=1, label="max new tokens")
                mode = gr.Radio(
                    [("one after the other (honest timings)", "sequential"), ("race (concurrent, contended)", "race")],
                    value="sequential",
                    label="How the two sides run",
                )
                do_sample = gr.Checkbox(False, label="sample (off: greedy, answers comparable token for token)")
            with gr.Row(visible=False) as sampling_row:
                temperature = gr.Slider(0.05, 2.0, value=0.7, step=0.05, label="temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
                seed = gr.Number(0, label="seed (both sides)", minimum=0)
        with gr.Accordion("Timing: chart and benchmark", open=False):
            timing_plot = gr.LinePlot(
                pd.DataFrame({"turn": [], "seconds": [], "series": []}),
                x="turn",
                y="seconds",
                color="series",
                title="TTFT and total time per turn",
                elem_id="timing-plot",
            )
            with gr.Row():
                repeats = gr.Number(5, label="runs per side", minimum=1, maximum=50, precision=0)
                benchmark = gr.Button("Benchmark this turn", elem_id="benchmark")
            benchmark_text = gr.Markdown(elem_id="benchmark-result")
        with gr.Accordion("Search K (the KL criterion)", open=False):
            gr.Markdown(
                "For each calibration sample, the next-token distribution of VTW at every K from 5 to N-1 is "
                "compared with the baseline's (KL divergence); K is the first one whose mean KL is at most eta. "
                + search.explanation,
                elem_id="search-explanation",
            )
            with gr.Row():
                search_source = gr.Radio(search.calibration, value=search.calibration[0][1], label="calibrate on")
                criterion = gr.Radio(handlers.CRITERIA, value=search.criterion, label="criterion")
                eta = gr.Number(search.eta, label="eta", info=f"default: {search.eta_source}", minimum=0)
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
        gr.Examples(example_inputs(default_model), inputs=[question], label="Examples")

        panes = [state, baseline_chat, vtw_chat, metrics, summary, status]

        def render(chat: ChatState, shown: dict[str, str], note: str) -> tuple:
            return chat, chat.display("baseline"), chat.display("vtw"), shown["metrics"], shown["summary"], note

        def shown_for(chat: ChatState, mode_value: str = "sequential") -> dict[str, str]:
            label = chat.settings.label() if chat.settings else "accelerated"
            return handlers.counters(chat.results, mode_value, label, chat.first)

        def on_submit(message, chat, video_path, frame_count, request: gr.Request):
            """Outside the queue: check the question, show it at once, and take a ticket (or refuse, keeping it)."""
            message = message or {}
            session = request.session_hash
            if sessions.busy(session):
                sessions.refuse(session)
                note = (
                    "⏳ A turn is still running: your question stays in the box. Send it when the answers end, "
                    "or press Stop."
                )
                return *render(chat, shown_for(chat), note), gr.skip(), gr.skip(), None
            try:
                handlers.add_turn(
                    chat,
                    message.get("text"),
                    list(message.get("files", [])),
                    allowed_roots,
                    video_paths=[video_path] if video_path else [],
                    num_frames=frame_count,
                    family=info.family,
                )
            except Exception as error:
                reason = handlers.log_failure(error, "question")
                # Keep the typed question, drop the files: a rejected image would only be rejected again. The
                # video goes only when it was the reason (re-uploading a long video because of a typo would hurt).
                kept = {"text": message.get("text") or "", "files": []}
                dropped = gr.Video(value=None) if isinstance(error, handlers.VideoRefused) else gr.skip()
                return *render(chat, shown_for(chat), f"⚠️ {reason}"), gr.MultimodalTextbox(value=kept), dropped, None
            handlers.show_waiting(chat)
            number = sessions.issue(session, turn=True)
            note = f"Queued: waiting for the device ({activity.describe()})."
            return *render(chat, handlers.counters({}), note), gr.MultimodalTextbox(value=None), None, number

        def on_regenerate_request(chat, request: gr.Request):
            session = request.session_hash
            if sessions.busy(session):
                return *render(chat, shown_for(chat), "⏳ A turn is still running; press Stop first."), None
            try:
                handlers.drop_last_answers(chat)
            except Exception as error:
                return *render(chat, shown_for(chat), f"⚠️ {handlers.log_failure(error, 'regenerate')}"), None
            handlers.show_waiting(chat)
            number = sessions.issue(session, turn=True)
            return *render(
                chat, handlers.counters({}), f"Queued: waiting for the device ({activity.describe()})."
            ), number

        def run_turn(
            chat, number, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio, eta_value,
            request: gr.Request,
        ):  # fmt: skip
            """In the queue: answer the turn behind `number`, unless Stop or Clear came first."""
            session = request.session_hash
            if number is None:  # refused in the first step: nothing to run
                # One update that changes nothing: a generator that yields nothing makes Gradio blank every
                # output, and the refusal's message in the status line would vanish at once.
                yield (gr.skip(),) * (len(panes) + 1)
                return
            try:
                if sessions.stopped(session, number):
                    if not sessions.cleared(session, number):
                        handlers.skip_last_turn(chat, chat.settings)
                        yield *render(chat, shown_for(chat), "Stopped while queued: nothing ran."), gr.skip()
                    return
                yield from answer_on_device(
                    chat, number, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio,
                    eta_value, session,
                )  # fmt: skip
            finally:
                sessions.finish(session, number)

        def answer_on_device(
            chat, number, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio, eta_value,
            session,
        ):  # fmt: skip
            shown = shown_for(chat, mode_value)
            try:
                check_k(k_value, info.num_layers)  # every parameter first: nothing runs if one is bad
                params = handlers.sampling_config(tokens, sample, temp, nucleus, seed_value)
                method_value = method_of(choice, ratio)
                eta_checked = check_eta(eta_value)
                with activity.running("a chat turn"):
                    first = handlers.run_order(chat.runs)[0] if mode_value == "sequential" else "both"
                    note = f"Answering: {'both sides at once' if first == 'both' else first + ' side first'}…"
                    stop = sessions.flag(session, number)
                    answers = stream_answers(chat, k_value, params, mode_value, stop, method_value, eta_checked)
                    for chat, shown in answers:
                        if sessions.cleared(session, number):
                            continue  # Clear was pressed: finish quietly, never write the old chat back
                        yield *render(chat, shown, note), gr.skip()
            except Exception as error:  # the page keeps serving: say why, keep the chat consistent
                message = handlers.log_failure(error, "answer")
                handlers.undo_last_turn(chat)
                yield *render(chat, shown, f"⚠️ {message}"), gr.skip()
                return
            if sessions.cleared(session, number):
                # An update sent just before Clear can reach the page after Clear's empty chat: the turn's own
                # last word is the empty chat too, so whatever order they arrive in, the page ends empty.
                fresh = ChatState()
                yield *render(fresh, handlers.counters({}), ""), pd.DataFrame(handlers.timing_rows(fresh))
                return
            done = "Stopped." if sessions.stopped(session, number) else ""
            if sessions.take_refused(session):
                done += " The question you typed during the turn is still in the box: press Enter to send it."
            yield *render(chat, shown, done), pd.DataFrame(handlers.timing_rows(chat))

        turn_inputs = [k, mode, max_new_tokens, do_sample, temperature, top_p, seed, method, fastv_ratio, eta]
        question.submit(
            on_submit,
            [question, state, video, frames],
            [*panes, question, video, ticket],
            queue=False,
            api_visibility="private",
        ).then(
            run_turn,
            [state, ticket, *turn_inputs],
            [*panes, timing_plot],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )
        regenerate.click(on_regenerate_request, [state], [*panes, ticket], queue=False, api_visibility="private").then(
            run_turn,
            [state, ticket, *turn_inputs],
            [*panes, timing_plot],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )

        def on_stop(request: gr.Request) -> str:
            sessions.stop(request.session_hash)
            return "Stopping…" if sessions.busy(request.session_hash) else ""

        stop.click(on_stop, None, status, queue=False, api_visibility="private")

        def on_clear(request: gr.Request) -> None:
            sessions.clear(request.session_hash)  # the running turn stops and writes nothing more

        def show_cleared():
            fresh = ChatState()
            return *render(fresh, handlers.counters({}), ""), pd.DataFrame(handlers.timing_rows(fresh)), "", None

        # The empty chat goes out through the queue, on the same stream as the turn's updates, so it lands after
        # any update already on its way (an answer outside the queue could arrive before them and be overwritten).
        clear.click(on_clear, None, None, queue=False, api_visibility="private").then(
            show_cleared,
            None,
            [*panes, timing_plot, benchmark_text, video],
            concurrency_limit=None,
            concurrency_id="page",
            api_visibility="private",
        )

        def on_settings(k_value, choice, ratio):
            """The pane title shows the next turn's settings; controls that do not apply are hidden or locked."""
            schedule = choice.startswith("schedule:")
            return (
                gr.Chatbot(label=handlers.pane_label(choice, k_value, ratio, info.num_layers)),
                gr.Slider(visible=choice == "fastv"),
                gr.Slider(interactive=not schedule, info="the schedule sets every layer" if schedule else None),
            )

        for control in (k, method, fastv_ratio):
            control.change(
                on_settings, [k, method, fastv_ratio], [vtw_chat, fastv_ratio, k], queue=False, api_visibility="private"
            )
        do_sample.change(lambda on: gr.Row(visible=bool(on)), do_sample, sampling_row, queue=False,
                         api_visibility="private")  # fmt: skip
        pane.change(None, pane, None, js=SHOW_PANE_JS, api_visibility="private")

        def take_ticket(request: gr.Request) -> tuple[int | None, str]:
            return sessions.issue(request.session_hash), f"Queued: waiting for the device ({activity.describe()})."

        def on_search(number, source, over, eta_value, chat, k_value, request: gr.Request, progress=gr.Progress()):
            session = request.session_hash
            try:
                progress(0, desc="K search")
                eta_checked = check_eta(eta_value)
                samples = handlers.calibration_for(source, chat)
                stop = sessions.flag(session, number)
                with activity.running("a K search"):
                    result = search_on_device(
                        samples, eta_checked, lambda done, total: progress((done, total)), over, stop.is_set
                    )
            except Exception as error:
                message = handlers.log_failure(error, "Search K")
                return gr.Slider(value=k_value), f"⚠️ {message}", None, ""
            new_k = result["k"] if result["k"] is not None else k_value
            return gr.Slider(value=new_k), handlers.describe_search(result, source), kl_curve_figure(result), ""

        search_button.click(take_ticket, None, [job_ticket, status], queue=False, api_visibility="private").then(
            on_search,
            [job_ticket, search_source, criterion, eta, state, k],
            [k, search_text, search_plot, status],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )

        def on_benchmark(number, chat, k_value, choice, ratio, runs, tokens, request: gr.Request):
            stop = sessions.flag(request.session_hash, number)
            try:
                with activity.running("a benchmark"):
                    result = benchmark_on_device(chat, k_value, method_of(choice, ratio), runs, tokens, stop)
            except Exception as error:
                return f"⚠️ {handlers.log_failure(error, 'benchmark')}", ""
            return handlers.describe_benchmark(result), ""

        benchmark.click(take_ticket, None, [job_ticket, status], queue=False, api_visibility="private").then(
            on_benchmark,
            [job_ticket, state, k, method, fastv_ratio, repeats, max_new_tokens],
            [benchmark_text, status],
            concurrency_limit=1,
            concurrency_id="device",
            api_visibility="private",
        )

        def on_attention(chat, side, k_value):
            try:
                with activity.running("an attention analysis"):
                    report = attention_on_device(chat, side, k_value)
            except Exception as error:
                message = handlers.log_failure(error, "attention")
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

        def on_leave(request: gr.Request) -> None:
            sessions.clear(request.session_hash)  # the page is gone: cancel its turn, benchmark or K search

        demo.unload(on_leave)

        with gr.Row(visible=False):  # the API's own inputs; the page never shows them
            api_image = gr.File(file_types=["image"], type="filepath", label="image")
            # The API page builds its example from the component's example value: an image, not gr.File's PDF.
            api_image.example_payload = lambda: handle_file(API_EXAMPLE_IMAGE)  # type: ignore[method-assign]
            api_image.example_value = lambda: API_EXAMPLE_IMAGE  # type: ignore[method-assign]
            api_question = gr.Textbox(label="question")
            # No `precision`: Gradio would round 3.5 to 4 and fail on NaN before our checks could say why.
            api_k = gr.Number(default_k, label="k")
            api_tokens = gr.Number(64, label="max_new_tokens")
            api_result = gr.JSON(label="result")
            api_compare = gr.Button("compare")
            api_eta = gr.Number(search.eta, label="eta")
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
