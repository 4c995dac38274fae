"""The Gradio page: one shared question, two panes streaming the baseline and the accelerated answer, a metrics table.

Layout and wiring only; what happens on each event lives in the feature modules of `app` as plain functions.
`page` builds the page from the sections in `layout`, wired by `chat_events`, `panel_events` and `api`;
`context` holds what they share (the model's device calls, sessions, device activity).
"""

from app.ui.page import build_demo, launch_options

__all__ = ["build_demo", "launch_options"]
