"""The page's sections, top to bottom: each builder lays out its components and returns them, wiring none.

The question row (question, Stop/Regenerate/Clear, the examples, the video input, the method and K controls),
the two chat panes with the status line, the metrics area, and the accordions: parameters, timing and benchmark,
Search K, attention. Events are wired in `app.ui.chat_events` and `app.ui.panel_events`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from app.media import ASSETS, example_files, example_label
from app.metrics import TIMING_NOTE, counters, header, pane_label
from app.search import CRITERIA
from app.session import ChatState
from app.ui.context import MAX_NEW_TOKENS, PageContext
from vtw_core.models.videos import LIMITS

# Schedule files name their algorithm and data set ("easyvqa-gsearch.json" holding "gsearch-tol0.003"): the menu
# shows a short label, and the line under it says where the schedule comes from.
ALGORITHMS = {"gsearch": "G-Search", "psigmoid": "P-Sigmoid"}
DATA_SETS = {"easyvqa": "easy-vqa"}
SETTINGS = {"tol": "tol.", "budget": "budget"}
METHOD_INFO = {
    "vtw": "layers from K on see no image",
    "fastv": "after layer K, cuts R of the image",
}


def _schedule(path: Any) -> tuple[str, str]:
    """A schedule file's short label ("G-Search", "P-Sigmoid 0.3") and its origin ("G-Search on easy-vqa, ...")."""
    try:
        name = str(json.loads(path.read_text(encoding="utf-8")).get("name", ""))
    except (OSError, ValueError, AttributeError):
        name = ""
    algorithm, _, setting = name.partition("-")
    if algorithm not in ALGORITHMS:
        return path.stem, f"schedule file {path.stem}"
    data = DATA_SETS.get(path.stem.split("-")[0], path.stem.split("-")[0])
    key = next((key for key in SETTINGS if setting.startswith(key)), None)
    value = setting.removeprefix(key) if key else setting
    label = ALGORITHMS[algorithm] + (f" {value}" if key == "budget" else "")
    return label, f"{ALGORITHMS[algorithm]} on {data}" + (f", {SETTINGS[key]} {value}" if key else "")


def method_choices() -> list[tuple[str, str]]:
    """VTW, FastV, and every schedule JSON under assets/schedules (e.g. from `schedule-search --out`)."""
    choices = [("VTW", "vtw"), ("FastV", "fastv")]
    for path in sorted((ASSETS / "schedules").glob("*.json")):
        choices.append((_schedule(path)[0], f"schedule:{path.stem}"))  # by name: no server paths on the page
    return choices


def method_info(choice: str) -> str:
    """The line under the method menu: what the chosen method does, and where a schedule comes from."""
    if choice.startswith("schedule:"):
        return _schedule(ASSETS / "schedules" / f"{choice.split(':', 1)[1]}.json")[1]
    return METHOD_INFO.get(choice, "")


def example_inputs(default_model: bool = True) -> list[dict[str, Any]]:
    """Examples for the question box that fit the model (see `app.media.example_files`)."""
    return [{"text": question, "files": [str(path)]} for path, question in example_files(default_model)]


def examples(context: PageContext, question: gr.MultimodalTextbox) -> None:
    """The examples as one line of short buttons under the question box (thumbnails would push the answers
    below the fold): choosing one puts its question and picture in the box, both on screen."""
    files = example_files(context.default_model)
    gr.Examples(
        example_inputs(context.default_model),
        inputs=[question],
        label="Examples",
        elem_id="examples",
        example_labels=[example_label(path, text) for path, text in files],
    )


def title(context: PageContext, banner: str) -> None:
    gr.Markdown(
        "# VTW Chat · Visual Tokens Withdrawal, side by side\n"
        "The first **K** decoder layers see the image, then every vision token is withdrawn. Same weights, "
        f"same question, two answers: the unchanged model and the accelerated one. {header(context.manager)}"
        + (f"\n\n{banner}" if banner else ""),
        elem_id="title",
    )


@dataclass(frozen=True)
class SessionStates:
    chat: gr.State  # the session's ChatState
    # The ticket of the turn a question (or Regenerate) just took. A hidden component, not a gr.State: the
    # browser sends its value with each queued job when the job is sent, so every job keeps its own turn's
    # ticket (a gr.State is read when the job starts, after later clicks may have changed it).
    ticket: gr.Number
    job_ticket: gr.Number  # the same, for a K search or a benchmark
    searched: gr.State  # the K the session's last K search chose, and its eta (`app.search.Searched`), or None


def session_states(context: PageContext) -> SessionStates:
    def hidden_ticket() -> gr.Number:
        return gr.Number(None, precision=0, visible=False)

    return SessionStates(gr.State(ChatState()), hidden_ticket(), hidden_ticket(), gr.State(context.search.starting))


@dataclass(frozen=True)
class QuestionRow:
    question: gr.MultimodalTextbox
    stop: gr.Button
    regenerate: gr.Button
    clear: gr.Button
    video: gr.Video
    frames: gr.Slider
    method: gr.Dropdown
    k: gr.Slider
    fastv_ratio: gr.Slider


def question_row(context: PageContext) -> QuestionRow:
    """The question with its buttons and the video input (left), the accelerated side's method and K (right)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            question = gr.MultimodalTextbox(
                placeholder=(
                    "Upload an image (or a video below), then ask about it (Enter sends)"
                    if context.with_video
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
            examples(context, question)  # right under the box: choosing one fills it, and both stay on screen
            # Below the question, and short: the question box must stay on screen at 1280x800.
            with gr.Row(visible=context.with_video, elem_id="video-row", equal_height=True):
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
                    info=method_info("vtw"),
                    elem_id="method",
                    min_width=170,
                    scale=1,
                )
                k = gr.Slider(
                    0,
                    context.info.num_layers,
                    value=context.default_k,
                    step=1,
                    label=f"K: layers that see the image ({context.info.num_layers} = unchanged)",
                    elem_id="k-slider",
                    min_width=180,
                    scale=2,
                )
            fastv_ratio = gr.Slider(
                0.05, 1.0, value=0.5, step=0.05, label="FastV R (share of vision tokens cut)", visible=False,
                elem_id="fastv-r",
            )  # fmt: skip
    return QuestionRow(question, stop, regenerate, clear, video, frames, method, k, fastv_ratio)


@dataclass(frozen=True)
class ChatPanes:
    status: gr.Markdown
    pane: gr.Radio  # on phones, which of the two panes shows
    baseline_chat: gr.Chatbot
    vtw_chat: gr.Chatbot


def chat_panes(context: PageContext) -> ChatPanes:
    """The status line, the phone's pane toggle, and the two chats side by side."""
    status = gr.Markdown("", elem_id="status")
    pane = gr.Radio(
        [("Baseline", "baseline"), ("Accelerated", "vtw")],
        value="baseline",
        show_label=False,
        elem_id="pane-toggle",
    )
    num_layers = context.info.num_layers
    with gr.Row(equal_height=True, elem_id="panes"):
        with gr.Column(elem_id="baseline-column", min_width=300):
            baseline_chat = _chat_pane(f"Baseline (all {num_layers} layers)", "baseline-chat")
        with gr.Column(elem_id="vtw-column", min_width=300):
            vtw_chat = _chat_pane(pane_label("vtw", context.default_k, 0.5, num_layers), "vtw-chat")
    return ChatPanes(status, pane, baseline_chat, vtw_chat)


def _chat_pane(label: str, elem_id: str) -> gr.Chatbot:
    return gr.Chatbot(label=label, height="auto", min_height=140, max_height=520, elem_id=elem_id)


@dataclass(frozen=True)
class MetricsArea:
    metrics: gr.Markdown
    summary: gr.Markdown


def metrics_area() -> MetricsArea:
    """The metrics table, the summary line, and the note on noisy timings."""
    empty = counters()
    metrics = gr.Markdown(empty["metrics"], elem_id="metrics")
    summary = gr.Markdown(empty["summary"], elem_id="summary")
    gr.Markdown(TIMING_NOTE, elem_id="timing-note")
    return MetricsArea(metrics, summary)


@dataclass(frozen=True)
class Parameters:
    max_new_tokens: gr.Slider
    mode: gr.Radio
    do_sample: gr.Checkbox
    sampling_row: gr.Row
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number


def parameters_panel(max_new_tokens_top: int = MAX_NEW_TOKENS) -> Parameters:
    """Generation parameters; the max-new-tokens slider ends at what the model's context leaves a first turn
    (the chat's events move its top as the conversation grows)."""
    with gr.Accordion("Parameters", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(
                1,
                max_new_tokens_top,
                value=min(128, max_new_tokens_top),
                step=1,
                label="max new tokens",
                info="at most what the model's context leaves for the answer",
                elem_id="max-new-tokens",
            )
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
    return Parameters(max_new_tokens, mode, do_sample, sampling_row, temperature, top_p, seed)


@dataclass(frozen=True)
class BenchmarkPanel:
    timing_plot: gr.LinePlot
    repeats: gr.Number
    button: gr.Button
    result: gr.Markdown


TURN_AXIS = 200  # the timing chart orders turns 1..TURN_AXIS on its axis (later ones follow, unordered)


def benchmark_panel() -> BenchmarkPanel:
    """The timing chart of the chat so far, and "Benchmark this turn"."""
    with gr.Accordion("Timing: chart and benchmark", open=False):
        timing_plot = gr.LinePlot(
            pd.DataFrame({"turn": pd.Series(dtype=str), "seconds": pd.Series(dtype=float), "series": []}),
            x="turn",
            y="seconds",
            color="series",
            title="TTFT and total time per turn (1 run each)",
            x_title="turn",
            y_title="seconds",
            # Turns are whole numbers: the turn is text (see `timing_rows`), in this order on the axis.
            sort=[str(turn) for turn in range(1, TURN_AXIS + 1)],
            y_lim=[0, None],  # from 0: a 10 ms gap must not look like a factor of two
            elem_id="timing-plot",
        )
        with gr.Row():
            repeats = gr.Number(5, label="runs per side", minimum=1, maximum=50, precision=0)
            button = gr.Button("Benchmark this turn", elem_id="benchmark")
        result = gr.Markdown(elem_id="benchmark-result")
    return BenchmarkPanel(timing_plot, repeats, button, result)


@dataclass(frozen=True)
class SearchPanel:
    source: gr.Radio
    criterion: gr.Radio
    eta: gr.Number
    button: gr.Button
    result: gr.Markdown
    plot: gr.Plot


def search_panel(context: PageContext) -> SearchPanel:
    search = context.search
    with gr.Accordion("Search K (the KL criterion)", open=False):
        gr.Markdown(
            "For each calibration sample, the next-token distribution of VTW at every K from 5 to N-1 is "
            "compared with the baseline's (KL divergence); K is the first one whose mean KL is at most eta. "
            + search.explanation,
            elem_id="search-explanation",
        )
        with gr.Row():
            source = gr.Radio(search.calibration, value=search.calibration[0][1], label="calibrate on")
            criterion = gr.Radio(CRITERIA, value=search.criterion, label="criterion")
            eta = gr.Number(search.eta, label="eta", info=f"default: {search.eta_source}", minimum=0,
                            elem_id="search-eta")  # fmt: skip
            button = gr.Button("Search K", variant="primary", elem_id="search-k")
        result = gr.Markdown(elem_id="search-result")
        # No label chip: it would cover the figure's own title.
        plot = gr.Plot(label="KL vs K", show_label=False, elem_id="search-plot")
    return SearchPanel(source, criterion, eta, button, result, plot)


@dataclass(frozen=True)
class AttentionPanel:
    side: gr.Radio
    button: gr.Button
    result: gr.Markdown
    prompt_plot: gr.Plot
    output_plot: gr.Plot


def attention_panel() -> AttentionPanel:
    with gr.Accordion("Attention per layer (paper Fig. 4)", open=False):
        with gr.Row():
            side = gr.Radio(
                [("baseline", "baseline"), ("VTW at the slider's K", "vtw")], value="baseline", label="model"
            )
            button = gr.Button("Analyse the current turn", elem_id="attention")
        result = gr.Markdown(elem_id="attention-result")
        with gr.Row():
            # The figures carry their own titles; Gradio's label chip would cover them.
            prompt_plot = gr.Plot(label="last prompt token", show_label=False, elem_id="attention-prompt")
            output_plot = gr.Plot(label="generated tokens", show_label=False, elem_id="attention-output")
    return AttentionPanel(side, button, result, prompt_plot, output_plot)


@dataclass(frozen=True)
class Page:
    """Every section of the page, for the event wiring."""

    states: SessionStates
    ask: QuestionRow
    panes: ChatPanes
    metrics: MetricsArea
    params: Parameters
    timing: BenchmarkPanel
    search: SearchPanel
    attention: AttentionPanel

    @property
    def chat_outputs(self) -> list[Any]:
        """The components `app.ui.context.render` fills, in its order."""
        panes = self.panes
        return [
            self.states.chat,
            panes.baseline_chat,
            panes.vtw_chat,
            self.metrics.metrics,
            self.metrics.summary,
            panes.status,
        ]


def page_sections(context: PageContext) -> Page:
    """All sections in page order (the examples sit under the question box, in `question_row`)."""
    states = session_states(context)
    ask = question_row(context)
    panes = chat_panes(context)
    metrics = metrics_area()
    room = context.room(ChatState())
    params = parameters_panel(MAX_NEW_TOKENS if room is None else max(1, min(MAX_NEW_TOKENS, room)))
    timing = benchmark_panel()
    search = search_panel(context)
    attention = attention_panel()
    return Page(states, ask, panes, metrics, params, timing, search, attention)
