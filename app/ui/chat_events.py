"""The chat's events: send, Regenerate, Stop and Clear, and the controls that change the next turn.

A turn takes a ticket when the user acts, in a step outside the queue (it shows the question at once, or
refuses it while another turn runs), and is answered in a second, queued step: Stop cancels a ticket whether
its work runs or still waits in the queue, and Clear also tells a running turn never to write to the page again.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app.benchmark import timing_rows
from app.errors import log_failure
from app.media import VideoRefused
from app.metrics import counters, pane_label
from app.session import ChatState
from app.turns import (
    add_turn,
    drop_last_answers,
    run_order,
    sampling_config,
    show_waiting,
    skip_last_turn,
    undo_last_turn,
)
from app.ui.context import ON_DEVICE, PRIVATE, PageContext, method_of, render
from app.ui.layout import Page
from vtw_core.analysis.k_search import check_eta
from vtw_core.validation import check_k

SHOW_PANE_JS = "(pane) => { document.querySelector('#panes').dataset.pane = pane; return pane; }"


def empty_chat() -> tuple:
    """The chat area and the timing chart of a fresh, empty chat."""
    fresh = ChatState()
    return *render(fresh, counters(), ""), pd.DataFrame(timing_rows(fresh))


def wire_chat(context: PageContext, page: Page) -> None:
    sessions, activity, info = context.sessions, context.activity, context.info
    states, ask, params = page.states, page.ask, page.params
    outputs = page.chat_outputs

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
            return *render(chat, counters(chat), note), gr.skip(), gr.skip(), None
        try:
            add_turn(
                chat,
                message.get("text"),
                list(message.get("files", [])),
                context.allowed_roots,
                video_paths=[video_path] if video_path else [],
                num_frames=frame_count,
                family=info.family,
            )
        except Exception as error:
            reason = log_failure(error, "question")
            # Keep the typed question, drop the files: a rejected image would only be rejected again. The
            # video goes only when it was the reason (re-uploading a long video because of a typo would hurt).
            kept = {"text": message.get("text") or "", "files": []}
            dropped = gr.Video(value=None) if isinstance(error, VideoRefused) else gr.skip()
            return *render(chat, counters(chat), f"⚠️ {reason}"), gr.MultimodalTextbox(value=kept), dropped, None
        show_waiting(chat)
        number = sessions.issue(session, turn=True)
        return *render(chat, counters(), context.queued_note()), gr.MultimodalTextbox(value=None), None, number

    def on_regenerate_request(chat, request: gr.Request):
        session = request.session_hash
        if sessions.busy(session):
            return *render(chat, counters(chat), "⏳ A turn is still running; press Stop first."), None
        try:
            drop_last_answers(chat)
        except Exception as error:
            return *render(chat, counters(chat), f"⚠️ {log_failure(error, 'regenerate')}"), None
        show_waiting(chat)
        number = sessions.issue(session, turn=True)
        return *render(chat, counters(), context.queued_note()), number

    def run_turn(
        chat, number, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio, eta_value,
        request: gr.Request,
    ):  # fmt: skip
        """In the queue: answer the turn behind `number`, unless Stop or Clear came first."""
        session = request.session_hash
        if number is None:  # refused in the first step: nothing to run
            # One update that changes nothing: a generator that yields nothing makes Gradio blank every
            # output, and the refusal's message in the status line would vanish at once.
            yield (gr.skip(),) * (len(outputs) + 1)
            return
        try:
            if sessions.stopped(session, number):
                if not sessions.cleared(session, number):
                    skip_last_turn(chat, chat.settings)
                    yield *render(chat, counters(chat), "Stopped while queued: nothing ran."), gr.skip()
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
        shown = counters(chat, mode_value)
        try:
            check_k(k_value, info.num_layers)  # every parameter first: nothing runs if one is bad
            sampling = sampling_config(tokens, sample, temp, nucleus, seed_value)
            method_value = method_of(choice, ratio)
            eta_checked = check_eta(eta_value)
            with activity.running("a chat turn"):
                first = run_order(chat.runs)[0] if mode_value == "sequential" else "both"
                note = f"Answering: {'both sides at once' if first == 'both' else first + ' side first'}…"
                stop = sessions.flag(session, number)
                answers = context.device.stream_answers(
                    chat, k_value, sampling, mode_value, stop, method_value, eta_checked
                )
                for chat, shown in answers:
                    if sessions.cleared(session, number):
                        continue  # Clear was pressed: finish quietly, never write the old chat back
                    yield *render(chat, shown, note), gr.skip()
        except Exception as error:  # the page keeps serving: say why, keep the chat consistent
            message = log_failure(error, "answer")
            undo_last_turn(chat)
            yield *render(chat, shown, f"⚠️ {message}"), gr.skip()
            return
        if sessions.cleared(session, number):
            # An update sent just before Clear can reach the page after Clear's empty chat: the turn's own
            # last word is the empty chat too, so whatever order they arrive in, the page ends empty.
            yield empty_chat()
            return
        done = "Stopped." if sessions.stopped(session, number) else ""
        if sessions.take_refused(session):
            done += " The question you typed during the turn is still in the box: press Enter to send it."
        yield *render(chat, shown, done), pd.DataFrame(timing_rows(chat))

    turn_inputs = [
        ask.k,
        params.mode,
        params.max_new_tokens,
        params.do_sample,
        params.temperature,
        params.top_p,
        params.seed,
        ask.method,
        ask.fastv_ratio,
        page.search.eta,
    ]

    def queue_turn(ticket_step: Any) -> None:
        """The queued second step after a step that took a ticket: the turn itself, on the device."""
        ticket_step.then(
            run_turn,
            [states.chat, states.ticket, *turn_inputs],
            [*outputs, page.timing.timing_plot],
            **ON_DEVICE,
            **PRIVATE,
        )

    queue_turn(
        ask.question.submit(
            on_submit,
            [ask.question, states.chat, ask.video, ask.frames],
            [*outputs, ask.question, ask.video, states.ticket],
            queue=False,
            **PRIVATE,
        )
    )
    queue_turn(
        ask.regenerate.click(on_regenerate_request, [states.chat], [*outputs, states.ticket], queue=False, **PRIVATE)
    )

    def on_stop(request: gr.Request) -> str:
        sessions.stop(request.session_hash)
        return "Stopping…" if sessions.busy(request.session_hash) else ""

    ask.stop.click(on_stop, None, page.panes.status, queue=False, **PRIVATE)

    def on_clear(request: gr.Request) -> None:
        sessions.clear(request.session_hash)  # the running turn stops and writes nothing more

    def show_cleared():
        return *empty_chat(), "", None

    # The empty chat goes out through the queue, on the same stream as the turn's updates, so it lands after
    # any update already on its way (an answer outside the queue could arrive before them and be overwritten).
    ask.clear.click(on_clear, None, None, queue=False, **PRIVATE).then(
        show_cleared,
        None,
        [*outputs, page.timing.timing_plot, page.timing.result, ask.video],
        concurrency_limit=None,
        concurrency_id="page",
        **PRIVATE,
    )
    wire_settings(context, page)


def wire_settings(context: PageContext, page: Page) -> None:
    """The controls that change the next turn: the pane title, FastV's R, sampling, and the phone's pane toggle."""
    ask, params = page.ask, page.params

    def on_settings(k_value, choice, ratio):
        """The pane title shows the next turn's settings; controls that do not apply are hidden or locked."""
        schedule = choice.startswith("schedule:")
        return (
            gr.Chatbot(label=pane_label(choice, k_value, ratio, context.info.num_layers)),
            gr.Slider(visible=choice == "fastv"),
            gr.Slider(interactive=not schedule, info="the schedule sets every layer" if schedule else None),
        )

    controls = [ask.k, ask.method, ask.fastv_ratio]
    for control in controls:
        control.change(on_settings, controls, [page.panes.vtw_chat, ask.fastv_ratio, ask.k], queue=False, **PRIVATE)
    params.do_sample.change(
        lambda on: gr.Row(visible=bool(on)), params.do_sample, params.sampling_row, queue=False, **PRIVATE
    )
    page.panes.pane.change(None, page.panes.pane, None, js=SHOW_PANE_JS, **PRIVATE)
