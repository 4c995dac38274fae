"""The events of the accordions below the chat: Search K, "Benchmark this turn" and the attention analysis.

Search K and the benchmark take a ticket outside the queue first, as a chat turn does, so Stop (or leaving
the page) cancels them whether they run or still wait for the device. The ticket travels with its job (a
hidden component the browser sends when it sends the job), and every click's job is queued: a search stopped
while it waited stays stopped, and the click after it runs with its own inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gradio as gr

from app.attention import describe_attention
from app.benchmark import describe_benchmark
from app.errors import log_failure
from app.search import Searched, calibration_for, describe_search
from app.ui.context import ON_DEVICE, PRIVATE, PageContext, method_of
from app.ui.layout import Page, method_info
from vtw_core.analysis.k_search import check_eta
from vtw_core.analysis.plots import attention_figure, kl_curve_figure


def wire_panels(context: PageContext, page: Page) -> None:
    sessions, activity = context.sessions, context.activity
    states, ask, status = page.states, page.ask, page.panes.status

    def take_ticket(request: gr.Request) -> tuple[int | None, str]:
        return sessions.issue(request.session_hash), context.queued_note()

    def after_ticket(button: gr.Button, work: Callable[..., Any], inputs: list[Any], outputs: list[Any]) -> None:
        """`button` takes a ticket into `job_ticket` outside the queue, then `work` runs on the device with it.

        As for a chat turn (`app.ui.chat_events`): the ticket is sent with the job, and trigger_mode "multiple"
        queues every click's job, even while an older one (which Stop cancelled) still waits for the device;
        with Gradio's default the new job would be dropped and the old one would run with the new ticket.
        """
        button.click(take_ticket, None, [states.job_ticket, status], queue=False, **PRIVATE).then(
            work, [states.job_ticket, *inputs], outputs, trigger_mode="multiple", **ON_DEVICE, **PRIVATE
        )

    def ticket_of(number: Any) -> int:
        """The job's ticket; a job without one counts as stopped (ticket 0 is never issued)."""
        return int(number) if isinstance(number, (int, float)) and math.isfinite(number) else 0

    def on_search(number, source, over, eta_value, chat, k_value, request: gr.Request, progress=gr.Progress()):
        """The K search, saying its phase in the result line: the calibration set loads, then the samples run
        (a progress bar from the first finished sample on, never one that sits at 0 %). A K it finds moves the
        slider and becomes the session's searched K (the footers name its eta while the slider stays there)."""
        session = request.session_hash
        try:
            eta_checked = check_eta(eta_value)
            yield gr.skip(), "⏳ Preparing the calibration set…", gr.skip(), gr.skip(), gr.skip()
            samples = calibration_for(source, chat)
            stop = sessions.flag(session, ticket_of(number))
            yield gr.skip(), f"⏳ K search on {len(samples)} calibration sample(s)…", gr.skip(), "", gr.skip()

            def report(done: int, total: int) -> None:
                progress((done, total), desc="K search", unit="samples")

            with activity.running("a K search"):
                result = context.device.search(samples, eta_checked, report, over, stop.is_set)
        except Exception as error:
            message = log_failure(error, "Search K")
            yield gr.Slider(value=k_value), f"⚠️ {message}", None, "", gr.skip()
            return
        # A K found moves the slider and becomes the session's searched K; without one both stay as they were.
        found = None if result["k"] is None else Searched(int(result["k"]), float(result["eta"]))
        slider = gr.Slider(value=k_value if found is None else found.k)
        text, curve = describe_search(result, source, k_value), kl_curve_figure(result)
        yield slider, text, curve, "", gr.skip() if found is None else found

    search = page.search
    after_ticket(
        search.button,
        on_search,
        [search.source, search.criterion, search.eta, states.chat, ask.k],
        [ask.k, search.result, search.plot, status, states.searched],
    )

    def on_benchmark(number, chat, k_value, choice, ratio, runs, tokens, request: gr.Request):
        stop = sessions.flag(request.session_hash, ticket_of(number))
        try:
            with activity.running("a benchmark"):
                result = context.device.benchmark(chat, k_value, method_of(choice, ratio), runs, tokens, stop)
        except Exception as error:
            return f"⚠️ {log_failure(error, 'benchmark')}", ""
        return describe_benchmark(result), ""

    timing = page.timing
    after_ticket(
        timing.button,
        on_benchmark,
        [states.chat, ask.k, ask.method, ask.fastv_ratio, timing.repeats, page.params.max_new_tokens],
        [timing.result, status],
    )

    def on_attention(chat, side, k_value):
        try:
            with activity.running("an attention analysis"):
                report = context.device.attention(chat, side, k_value)
        except Exception as error:
            message = log_failure(error, "attention")
            return f"⚠️ {message}", None, None
        output_plot = attention_figure(report, "generated") if report["generated"] else None
        return describe_attention(report), attention_figure(report, "prompt"), output_plot

    # The line under the method menu says what the chosen method is (and where a schedule comes from).
    ask.method.change(lambda choice: gr.Dropdown(info=method_info(choice)), ask.method, ask.method, queue=False,
                      **PRIVATE)  # fmt: skip

    attention = page.attention
    attention.button.click(
        on_attention,
        [states.chat, attention.side, ask.k],
        [attention.result, attention.prompt_plot, attention.output_plot],
        **ON_DEVICE,
        **PRIVATE,
    )
