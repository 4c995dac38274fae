"""The attention analysis (paper Fig. 4): how much of each layer's attention the vision tokens receive."""

from __future__ import annotations

from typing import Any

from app.session import ChatState
from vtw_core.analysis.attention import analyze_attention
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.models.images import load_image
from vtw_core.validation import check_k, check_max_new_tokens


def attention_report(manager: ModelManager, state: ChatState, side: str, k: int, max_new_tokens: int = 16) -> dict:
    """Attention shares per layer for the chat's last turn, on the baseline or on VTW at K."""
    k = check_k(k, manager.info.num_layers)
    if not state.turns:
        raise InputError("ask a question first: the analysis runs on the current turn")
    if state.has_video():
        raise InputError("the attention analysis runs on images only; this chat has a video")
    messages, paths = state.conversation(side)
    with manager.lock:
        report = analyze_attention(
            manager.model,
            manager.processor,
            messages,
            [load_image(path) for path in paths],
            k=None if side == "baseline" else k,
            max_new_tokens=check_max_new_tokens(max_new_tokens),
        )
    return report.to_dict()


def describe_attention(report: dict[str, Any]) -> str:
    shares = report["prompt"]
    first, last = shares[0]["vision"], shares[-1]["vision"]
    middle = len(shares) // 2
    return (
        f"Vision tokens ({report['segment_tokens']['vision']} of the prompt) receive {first:.0%} of the last prompt "
        f"token's attention in layer 0, {shares[middle]['vision']:.0%} in layer {middle} and {last:.0%} in the last "
        "layer (mean over heads)."
    )
