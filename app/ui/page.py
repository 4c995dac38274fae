"""The whole page: `build_demo` lays out the sections and wires their events; `launch_options` for `demo.launch`,
and `serve`, which launches it and prints where it runs."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.media import EXAMPLES, example_files
from app.ui.api import API_INPUTS, add_api, unreadable_inputs
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
#metrics, #benchmark-result { overflow-x: auto; }
#metrics table { font-size: 0.85em; margin: 0; }
#metrics td, #metrics th { padding: 2px 8px; }
/* Table cells break between words only ("baseline", never "baselin e"). */
#metrics th, #metrics td, #benchmark-result th, #benchmark-result td {
  word-break: normal; overflow-wrap: normal; hyphens: none;
}
#timing-note { font-size: 0.8em; opacity: 0.8; }
#pane-toggle { display: none; }
/* Phones: the panes stack, so a toggle shows one answer at a time instead of a long scroll. */
@media (max-width: 767px) {
  #pane-toggle { display: block; }
  #panes:not([data-pane="vtw"]) #vtw-column { display: none !important; }
  #panes[data-pane="vtw"] #baseline-column { display: none !important; }
}
"""


class Demo(gr.Blocks):
    """The page's Blocks: an API call whose inputs Gradio cannot read is refused with one log line and a
    message for the caller (`unreadable_inputs`), not Gradio's traceback in the log and an opaque error."""

    async def preprocess_data(self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except Exception as error:
            if block_fn.api_name not in API_INPUTS:
                raise
            raise unreadable_inputs(error, block_fn.api_name, len(inputs)) from error


def build_demo(manager: ModelManager, banner: str = "") -> gr.Blocks:
    context = PageContext.create(manager)
    examples = example_files(context.default_model)
    if examples:  # both sides, both orders, on the first example's prompt: see `app.turns.warm_up`
        warm_up_on_device(manager, context.default_k, examples)
    with Demo(title="VTW Chat") as demo:
        title(context, banner)
        page = page_sections(context)
        wire_chat(context, page)
        wire_panels(context, page)

        def on_leave(request: gr.Request) -> None:
            """The tab was closed or reloaded: its tab-closed event cancels its turn, benchmark or K search."""
            context.sessions.close(request.session_hash)

        demo.unload(on_leave)
        add_api(context)
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch_options() -> dict[str, Any]:
    """Options for `demo.launch`: theme and CSS (Gradio 6 takes them there), upload limits."""
    return {"css": CSS, "theme": gr.themes.Soft(), "max_file_size": "20mb", "allowed_paths": [str(EXAMPLES)]}


def serve(demo: gr.Blocks, host: str, port: int, share: bool = False) -> None:
    """Launch the page and block; print where it runs, and this app's switch for a public link (Gradio's own
    startup lines would point at `launch(share=True)`, which a user of `python app.py` cannot reach)."""
    demo.launch(server_name=host, server_port=port, share=share, quiet=True, prevent_thread_lock=True,
                **launch_options())  # fmt: skip
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if not share:
        print("* Public link: python app.py --share", flush=True)
    demo.block_thread()
