"""Choosing K (the paper's Algorithm 1): the first layer after which withdrawing vision barely moves the answer.

For each calibration sample, take the next-token distribution at the last prompt position from the baseline
and from VTW at every K in start..N-1, score K by KL(P_vtw || P_baseline) (the official code's direction)
averaged over samples, and pick the first K whose mean is at most eta (the official code's `<=`).

VTW at K runs layers < K exactly as the baseline does. So one baseline pass per sample suffices: when it
reaches layer K, a branch runs only layers K..N-1 on that layer's input with the vision tokens withdrawn.
Branches run as the baseline pass goes deeper, so only the current layer's states are alive at any time
(memory stays that of one pass), and the numbers equal N separate VTW passes (tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from vtw_core.engine.decoder import TokenState, Withdrawal, decode_step, prefill, run_decoder, withdrawal_selector
from vtw_core.engine.embed import PromptEmbeddings, embed_prompt
from vtw_core.errors import InputError
from vtw_core.models.families import num_decoder_layers
from vtw_core.models.prompts import build_model_inputs, eos_token_ids_of, user_message
from vtw_core.validation import check_float

DEFAULT_ETA = 0.003
DEFAULT_START = 5
# eta per checkpoint, as the official VTW evaluation scripts (github.com/lzhxmu/VTW) set it; DEFAULT_ETA elsewhere.
OFFICIAL_ETA = {
    "llava-1.5-7b-hf": 0.003,
    "llava-1.5-13b-hf": 0.0005,
    "llava-v1.6-vicuna-7b-hf": 0.0001,
}
Progress = Callable[[int, int], None]  # (samples done, samples in all)


@dataclass
class KSearchResult:
    k: int | None  # None: no K in the range meets eta
    eta: float
    num_layers: int
    curve: list[tuple[int, float]]  # (K, mean KL over samples), K ascending
    samples: int
    per_sample: list[list[float]] = field(default_factory=list, repr=False)  # [sample][K index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "eta": self.eta,
            "num_layers": self.num_layers,
            "samples": self.samples,
            "curve": [{"k": k, "kl": kl} for k, kl in self.curve],
        }


def default_eta(source: str) -> tuple[float, str]:
    """The eta for a model (hub id or folder) and where it comes from, for the app and the CLI to say."""
    name = source.rstrip("/").rsplit("/", 1)[-1].lower()
    if name in OFFICIAL_ETA:
        return OFFICIAL_ETA[name], f"the official VTW evaluation's value for {name}"
    return DEFAULT_ETA, "the paper's default (LLaVA-1.5-7B)"


def check_eta(eta: Any) -> float:
    """eta is a KL threshold: finite, from 0 to 100 (100 accepts any K; the paper's values are about 1e-3)."""
    return check_float(eta, "eta", 0, 100)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from logits (batch, vocab), in float32."""
    log_p = torch.log_softmax(logits_p.float(), dim=-1)
    log_q = torch.log_softmax(logits_q.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def candidate_ks(num_layers: int, start: int = DEFAULT_START) -> list[int]:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InputError(f"start must be a non-negative integer, got {start!r}")
    return list(range(start, num_layers))


@torch.inference_mode()
def kl_per_k(model: nn.Module, prompt: PromptEmbeddings, ks: Sequence[int]) -> torch.Tensor:
    """KL(P_vtw@K || P_baseline) for each K in `ks` and each row: (len(ks), batch), one baseline pass."""
    wanted = set(ks)
    branch_logits: dict[int, torch.Tensor] = {}

    def branch(layer_idx: int, hidden_states: torch.Tensor, tokens: TokenState) -> None:
        if layer_idx in wanted:
            logits, _ = run_decoder(model, hidden_states, tokens, first_layer=layer_idx,
                                    selector=Withdrawal(layer_idx), use_cache=False)  # fmt: skip
            branch_logits[layer_idx] = logits

    # Only logits are compared: neither the baseline pass nor a branch stores keys and values.
    baseline_logits, _ = prefill(model, prompt, observer=branch, use_cache=False)
    if not ks:
        return baseline_logits.new_zeros(0, baseline_logits.shape[0])
    return torch.stack([kl_divergence(branch_logits[k], baseline_logits) for k in ks])


@torch.inference_mode()
def kl_per_k_naive(model: nn.Module, prompt: PromptEmbeddings, ks: Sequence[int]) -> torch.Tensor:
    """The same as `kl_per_k` by definition: a full VTW pass per K. For tests and timing."""
    num_layers = num_decoder_layers(model.config)
    baseline_logits, _ = prefill(model, prompt)
    rows = [kl_divergence(prefill(model, prompt, withdrawal_selector(k, num_layers))[0], baseline_logits) for k in ks]
    return torch.stack(rows) if rows else baseline_logits.new_zeros(0, baseline_logits.shape[0])


@torch.inference_mode()
def reply_kl(
    model: nn.Module, prompt: PromptEmbeddings, reply_ids: torch.Tensor, selectors: Sequence[Callable[[], Any]]
) -> torch.Tensor:
    """Mean KL(P_selector || P_baseline) over the positions of a reply (1, T), teacher-forced: (len(selectors), 1).

    A variant of Algorithm 1 for models whose replies open with words that follow from the question alone
    ("It is a ..."): the last prompt position then says nothing about the image, the answer word comes later.
    `selectors` are factories (a selector may hold per-request state); each needs its own full pass.
    """

    def log_probs(selector) -> torch.Tensor:
        logits, state = prefill(model, prompt, selector)
        steps = [logits]
        for t in range(reply_ids.shape[1] - 1):
            steps.append(decode_step(model, state, reply_ids[:, t : t + 1]))
        return torch.stack(steps, dim=1)  # (1, T, vocab)

    baseline = log_probs(None).flatten(0, 1)
    rows = [kl_divergence(log_probs(make()).flatten(0, 1), baseline).mean()[None] for make in selectors]
    return torch.stack(rows) if rows else baseline.new_zeros(0, 1)


def reply_kl_per_k(
    model: nn.Module, prompt: PromptEmbeddings, reply_ids: torch.Tensor, ks: Sequence[int]
) -> torch.Tensor:
    """`reply_kl` for VTW at each K: (len(ks), 1)."""
    num_layers = num_decoder_layers(model.config)
    return reply_kl(model, prompt, reply_ids, [lambda k=k: withdrawal_selector(k, num_layers) for k in ks])


@dataclass
class CalibrationSample:
    question: str
    images: list[Image.Image]


def search_k(
    model: nn.Module,
    processor: Any,
    samples: Sequence[CalibrationSample],
    *,
    eta: float = DEFAULT_ETA,
    start: int = DEFAULT_START,
    progress: Progress | None = None,
    naive: bool = False,
    over: str = "prompt",
) -> KSearchResult:
    """Algorithm 1 over `samples` (each through the model's chat template as one user turn).

    over="prompt" (the paper): KL at the last prompt position. over="reply": KL averaged over the baseline's
    greedy reply (up to 32 tokens), teacher-forced (`reply_kl_per_k`).
    """
    if over not in ("prompt", "reply"):
        raise InputError(f"over must be 'prompt' or 'reply', got {over!r}")
    if not samples:
        raise InputError("the calibration set is empty")
    eta = check_eta(eta)
    num_layers = num_decoder_layers(model.config)
    ks = candidate_ks(num_layers, start)
    per_sample: list[list[float]] = []
    measure = kl_per_k_naive if naive else kl_per_k
    for done, sample in enumerate(samples, start=1):
        messages = [user_message(sample.question, num_images=len(sample.images))]
        inputs = build_model_inputs(processor, [messages], [sample.images], model.device, model.dtype)
        prompt = embed_prompt(model, inputs)
        if over == "reply":
            reply = greedy_reply(model, processor, inputs)
            per_sample.append(reply_kl_per_k(model, prompt, reply, ks)[:, 0].tolist())
        else:
            per_sample.append(measure(model, prompt, ks)[:, 0].tolist())
        if progress is not None:
            progress(done, len(samples))
    means = [sum(values) / len(values) for values in zip(*per_sample, strict=True)] if ks else []
    curve = list(zip(ks, means, strict=True))
    chosen = next((k for k, kl in curve if kl <= eta), None)
    return KSearchResult(chosen, eta, num_layers, curve, len(samples), per_sample)


def greedy_reply(model: nn.Module, processor: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unchanged model's greedy reply to one prompt, up to and including its end token: (1, T)."""
    from vtw_core.generation.generate import generate_tokens
    from vtw_core.generation.types import SamplingConfig

    eos = eos_token_ids_of(model, processor)
    tokens = []
    for column in generate_tokens(model, inputs, sampling=SamplingConfig(max_new_tokens=32), eos_token_ids=eos):
        tokens.append(column)
    return torch.stack(tokens, dim=1)
