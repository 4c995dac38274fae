"""The chat's events: send, Regenerate, Stop and Clear, and the controls that change the next turn.

A turn goes through the session's state machine (`app.session.TRANSITIONS`) and nothing else: a question is
taken in a step outside the queue (it shows at once, or is refused and kept in the box while another turn is
in flight) and answered in a second, queued step that carries the turn's ticket. Stop and Clear cancel a queued
turn at once (its job, when the device reaches it, finds its ticket gone and does nothing) and ask a running one
to end at its next token; every job reports how it ended, so no state outlives it.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from app.benchmark import timing_rows
from app.errors import log_failure
from app.media import VideoRefused
from app.metrics import counters, pane_label
from app.search import searched_eta
from app.session import ChatState, Event, Phase
from app.turns import (
    add_turn,
    check_room,
    drop_last_answers,
    fit_new_turn,
    run_order,
    sampling_config,
    settle_last_turn,
    show_waiting,
    skip_last_turn,
    undo_last_turn,
)
from app.ui.context import ON_DEVICE, PRIVATE, PageContext, method_of, render
from app.ui.layout import Page
from vtw_core.errors import InputError
from vtw_core.validation import check_k

SHOW_PANE_JS = "(pane) => { document.querySelector('#panes').dataset.pane = pane; return pane; }"
# A question sent while the session's turn is in flight: refused, kept in the box, and the page says why.
REFUSED = {
    Phase.QUEUED: "⏳ Your last question still waits for the device: this one stays in the box. Send it when the "
    "answers end, or press Stop.",
    Phase.RUNNING: "⏳ A turn is still running: your question stays in the box. Send it when the answers end, or "
    "press Stop.",
    Phase.STOPPING: "⏳ The last turn is stopping: your question stays in the box. Send it again in a moment.",
}
FULL = (
    " The conversation now fills the model's context: press Clear to start over, or send a new image (it starts "
    "a new conversation)."
)


def empty_chat() -> tuple:
    """The chat area and the timing chart of a fresh, empty chat."""
    fresh = ChatState()
    return *render(fresh, counters(), ""), pd.DataFrame(timing_rows(fresh))


def wire_chat(context: PageContext, page: Page) -> None:
    sessions, activity, info = context.sessions, context.activity, context.info
    states, ask, params = page.states, page.ask, page.params
    outputs = page.chat_outputs
    # The queued step's outputs: the chat area, the timing chart, the question box (a turn the device refused
    # goes back there) and the max-new-tokens slider (its top follows the context left).
    job_outputs = [*outputs, page.timing.timing_plot, ask.question, params.max_new_tokens]
    unchanged = (gr.skip(),) * len(job_outputs)

    def on_submit(message, chat, video_path, frame_count, tokens, request: gr.Request):
        """Outside the queue: check the question, show it at once, and take a ticket (or refuse, keeping it)."""
        message = message or {}
        step = sessions.fire(request.session_hash, Event.SEND)
        if step.recovered:
            settle_last_turn(chat)  # the turn before lost its job: its answers say so
        if not step.accepted:
            return *render(chat, counters(chat), REFUSED[step.before]), gr.skip(), gr.skip(), None
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
            sessions.fire(request.session_hash, Event.CANCELLED, step.ticket)
            reason = log_failure(error, "question")
            # Keep the typed question, drop the files: a rejected image would only be rejected again. The
            # video goes only when it was the reason (re-uploading a long video because of a typo would hurt).
            kept = {"text": message.get("text") or "", "files": []}
            dropped = gr.Video(value=None) if isinstance(error, VideoRefused) else gr.skip()
            return *render(chat, counters(chat), f"⚠️ {reason}"), gr.MultimodalTextbox(value=kept), dropped, None
        try:
            chat = fit_new_turn(context.manager, chat, tokens)  # a new image may start a new conversation
        except Exception as error:  # too long for the context: the question and its image stay in the box
            undo_last_turn(chat)
            sessions.fire(request.session_hash, Event.CANCELLED, step.ticket)
            return *render(chat, counters(chat), f"⚠️ {log_failure(error, 'question')}"), gr.skip(), gr.skip(), None
        show_waiting(chat)
        note = context.queued_note("your question")
        return *render(chat, counters(), note), gr.MultimodalTextbox(value=None), None, step.ticket

    def on_regenerate_request(chat, tokens, request: gr.Request):
        step = sessions.fire(request.session_hash, Event.REGENERATE)
        if step.recovered:
            settle_last_turn(chat)
        if not step.accepted:
            return *render(chat, counters(chat), "⏳ A turn is still in flight; press Stop first."), None
        try:
            if not chat.turns:
                raise InputError("nothing to regenerate yet")
            check_room(context.manager, chat, tokens)  # before the answers go: a refusal keeps them
            drop_last_answers(chat)
        except Exception as error:
            sessions.fire(request.session_hash, Event.CANCELLED, step.ticket)
            return *render(chat, counters(chat), f"⚠️ {log_failure(error, 'regenerate')}"), None
        show_waiting(chat)
        return *render(chat, counters(), context.queued_note("your question")), step.ticket

    def run_turn(
        chat, ticket, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio, searched,
        request: gr.Request,
    ):  # fmt: skip
        """In the queue: answer the turn behind `ticket` if it is still the session's turn, and say how it ended."""
        session = request.session_hash
        number = None if ticket is None else int(ticket)
        if number is None or not sessions.fire(session, Event.DEVICE_GRANTED, number).accepted:
            # Refused in the first step, or cancelled (Stop, Clear, a closed tab) while it waited: the page
            # already says so. One update that changes nothing: a generator that yields nothing makes Gradio
            # blank every output.
            yield unchanged
            return
        ended = Event.CANCELLED  # unless the answers end (Gradio may close this generator early)
        try:
            ended, last = yield from answer_on_device(
                chat, number, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio,
                searched, session,
            )  # fmt: skip
        finally:
            sessions.fire(session, ended, number)
        # The turn has ended before the page can show it ended: a question sent the moment the answers (or a
        # question given back) appear is taken, never refused as "still running".
        yield last

    def answer_on_device(
        chat, number, k_value, mode_value, tokens, sample, temp, nucleus, seed_value, choice, ratio, searched,
        session,
    ):  # fmt: skip
        """Yields the answers as they stream; returns how the turn ended and the page's last update, which
        `run_turn` sends once the session has taken the end (so the finished answers are held back for it)."""
        shown = counters(chat, mode_value)
        keep = (gr.skip(), gr.skip(), gr.skip())  # timing chart, question box, slider
        try:
            k_checked = check_k(k_value, info.num_layers)  # every parameter first: nothing runs if one is bad
            sampling = sampling_config(tokens, sample, temp, nucleus, seed_value)
            method_value = method_of(choice, ratio)
            # The footer names eta only when this session's own K search chose this K (not one set by hand).
            eta = searched_eta(k_checked, searched)
            with activity.running("a chat turn"):
                first = run_order(chat.runs)[0] if mode_value == "sequential" else "both"
                note = f"Answering: {'both sides at once' if first == 'both' else first + ' side first'}…"
                stop = sessions.flag(session, number)
                answers = context.device.stream_answers(chat, k_value, sampling, mode_value, stop, method_value, eta)
                for chat, shown in answers:
                    if sessions.cleared(session, number):
                        continue  # Clear was pressed: finish quietly, never write the old chat back
                    if chat.answered():
                        continue  # both sides have ended: shown with the turn's end, below
                    yield *render(chat, shown, note), *keep
        except Exception as error:  # the page keeps serving: say why, keep the chat consistent
            message = log_failure(error, "answer")
            turn = chat.turns[-1] if chat.turns else None
            undo_last_turn(chat)
            if sessions.cleared(session, number):
                return Event.FAILED, (*empty_chat(), gr.skip(), gr.skip())
            # The turn goes back into the question box: nothing the user typed or attached is lost.
            back = gr.MultimodalTextbox(value={"text": turn.text, "files": turn.image_paths}) if turn else gr.skip()
            slider, _ = context.token_limits(chat, tokens)
            note = f"⚠️ {message}" + (". Your question is back in the box." if turn else "")
            return Event.FAILED, (*render(chat, shown, note), gr.skip(), back, slider)
        if sessions.cleared(session, number):
            # An update sent just before Clear can reach the page after Clear's empty chat: the turn's own
            # last word is the empty chat too, so whatever order they arrive in, the page ends empty.
            return Event.FINISHED, (*empty_chat(), gr.skip(), context.token_limits(ChatState(), tokens)[0])
        done = "Stopped." if sessions.stopped(session, number) else ""
        if sessions.take_refused(session):
            done += " The question you typed during the turn is still in the box: press Enter to send it."
        slider, full = context.token_limits(chat, tokens)
        if full:
            done += FULL
        return Event.FINISHED, (*render(chat, shown, done.strip()), pd.DataFrame(timing_rows(chat)), gr.skip(), slider)

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
        states.searched,
    ]

    def queue_turn(ticket_step: Any) -> None:
        """The queued second step after a step that took a ticket: the turn itself, on the device.

        trigger_mode "multiple": the browser sends every turn's job, even while an older job (one Stop or Clear
        cancelled) still waits in the queue; with Gradio's default it would drop the new one.
        """
        ticket_step.then(
            run_turn,
            [states.chat, states.ticket, *turn_inputs],
            job_outputs,
            trigger_mode="multiple",
            show_progress="minimal",
            show_progress_on=[page.panes.baseline_chat, page.panes.vtw_chat],
            **ON_DEVICE,
            **PRIVATE,
        )

    queue_turn(
        ask.question.submit(
            on_submit,
            [ask.question, states.chat, ask.video, ask.frames, params.max_new_tokens],
            [*outputs, ask.question, ask.video, states.ticket],
            queue=False,
            **PRIVATE,
        )
    )
    queue_turn(
        ask.regenerate.click(
            on_regenerate_request,
            [states.chat, params.max_new_tokens],
            [*outputs, states.ticket],
            queue=False,
            **PRIVATE,
        )
    )

    def on_stop(chat, request: gr.Request):
        """Stop: a queued turn is skipped at once, a running one ends at its next token; K searches and
        benchmarks of the session stop too."""
        step = sessions.stop(request.session_hash)
        if step.before is Phase.QUEUED:
            skip_last_turn(chat)
            return render(chat, counters(chat), "Stopped while queued: nothing ran.")
        if step.before in (Phase.RUNNING, Phase.STOPPING):
            return (*(gr.skip(),) * (len(outputs) - 1), "Stopping…")
        if step.recovered:
            settle_last_turn(chat)
            return render(chat, counters(chat), "Stopped.")
        return (gr.skip(),) * len(outputs)

    ask.stop.click(on_stop, [states.chat], outputs, queue=False, **PRIVATE)

    def on_clear(request: gr.Request) -> None:
        sessions.clear(request.session_hash)  # a queued turn is dropped; a running one stops and writes no more

    def show_cleared(tokens):
        return *empty_chat(), "", None, context.token_limits(ChatState(), tokens)[0]

    # The empty chat goes out through the queue, on the same stream as the turn's updates, so it lands after
    # any update already on its way (an answer outside the queue could arrive before them and be overwritten).
    # Each pane's own trash icon clears the whole conversation too: the two panes are one chat.
    for clear_event in (ask.clear.click, page.panes.baseline_chat.clear, page.panes.vtw_chat.clear):
        clear_event(on_clear, None, None, queue=False, **PRIVATE).then(
            show_cleared,
            [params.max_new_tokens],
            [*outputs, page.timing.timing_plot, page.timing.result, ask.video, params.max_new_tokens],
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
