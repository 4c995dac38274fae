"""The whole page: `build_demo` lays out the sections and wires their events; `launch_options` for `demo.launch`."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.media import EXAMPLES, example_files
from app.ui.api import add_api
from app.ui.chat_events import wire_chat
from app.ui.context import PageContext, warm_up_on_device
from app.ui.layout import page_sections, title
from app.ui.panel_events import wire_panels
from vtw_core.generation.manager import ModelManager

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


def build_demo(manager: ModelManager, banner: str = "") -> gr.Blocks:
    context = PageContext.create(manager)
    examples = example_files(context.default_model)
    if examples:
        warm_up_on_device(manager, context.default_k, examples[0][0])
    with gr.Blocks(title="VTW Chat") as demo:
        title(context, banner)
        page = page_sections(context)
        wire_chat(context, page)
        wire_panels(context, page)

        def on_leave(request: gr.Request) -> None:
            context.sessions.clear(request.session_hash)  # the page is gone: cancel its turn, benchmark or K search

        demo.unload(on_leave)
        add_api(context)
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch_options() -> dict[str, Any]:
    """Options for `demo.launch`: theme and CSS (Gradio 6 takes them there), upload limits."""
    return {"css": CSS, "theme": gr.themes.Soft(), "max_file_size": "20mb", "allowed_paths": [str(EXAMPLES)]}
