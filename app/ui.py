"""The Gradio page: one question, two panes streaming the baseline and the VTW answer, live counters."""

from __future__ import annotations

import gradio as gr

from app.handlers import ChatState, compare, error_message
from vtw_core.manager import ModelManager

CSS = """
.counters { font-size: 0.9em; }
"""


def build_demo(manager: ModelManager, banner: str = "") -> gr.Blocks:
    info = manager.info
    with gr.Blocks(title="VTW Chat") as demo:
        gr.Markdown(f"# VTW Chat: Visual Tokens Withdrawal, side by side\n**Model:** {info.describe()}  \n{banner}")
        state = gr.State(ChatState())
        with gr.Row():
            with gr.Column():
                baseline_chat = gr.Chatbot(label="Baseline", height=420)
                baseline_counters = gr.Markdown("_no answer yet_", elem_classes="counters")
            with gr.Column():
                vtw_chat = gr.Chatbot(label=f"VTW (K = {info.num_layers // 2})", height=420)
                vtw_counters = gr.Markdown("_no answer yet_", elem_classes="counters")
        summary = gr.Markdown("Both sides run one after the other on the same device.")
        question = gr.MultimodalTextbox(
            placeholder="Upload an image and ask about it", file_types=["image"], file_count="multiple"
        )
        with gr.Row():
            k = gr.Slider(1, info.num_layers, value=info.num_layers // 2, step=1, label="K: layers that see vision")
            max_new_tokens = gr.Slider(1, 512, value=64, step=1, label="max new tokens")
        with gr.Row():
            stop = gr.Button("Stop", variant="stop")
            clear = gr.Button("Clear")

        def on_submit(message, chat_state, k_value, max_tokens):
            text = (message or {}).get("text", "")
            files = (message or {}).get("files", [])
            try:
                for updated, counters in compare(manager, chat_state, text, list(files), int(k_value), int(max_tokens)):
                    yield (
                        updated,
                        updated.display["baseline"],
                        updated.display["vtw"],
                        counters["baseline"],
                        counters["vtw"],
                        counters["summary"],
                        None,
                    )
            except Exception as error:  # the page must keep serving: show the reason, keep the session
                raise gr.Error(error_message(error)) from error

        outputs = [state, baseline_chat, vtw_chat, baseline_counters, vtw_counters, summary, question]
        run = question.submit(
            on_submit, [question, state, k, max_new_tokens], outputs, concurrency_limit=1, api_name=False
        )
        stop.click(None, cancels=[run])
        k.change(lambda value: gr.Chatbot(label=f"VTW (K = {int(value)})"), k, vtw_chat, api_name=False)

        def on_clear():
            fresh = ChatState()
            return fresh, [], [], "_no answer yet_", "_no answer yet_", ""

        clear.click(on_clear, None, outputs[:-1], api_name=False)
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo
