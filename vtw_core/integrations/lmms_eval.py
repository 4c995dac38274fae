"""The `vtw` model of lmms-eval (0.7.x): any lmms-eval image task, answered by the vtw_core engine.

    lmms-eval --model vtw --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=vtw:16 --tasks mme --batch_size 8

Model args: pretrained (hub id or folder; default: the embedded default model), method (baseline, vtw:K,
vtw:auto, fastv:K:R, schedule:NAME|FILE) or k (K or auto), eta and search_over (the K search of k=auto, on
the task's own first `search_samples` samples), device, dtype, attention, max_new_tokens (when the task sets
none), trust_remote_code. Requests go through the engine's left-padded batches of `--batch_size`, in the
task's order. Each sample's prefill and decode FLOPs and time to first token ride in lmms-eval's token
counts (logged samples); the results' "throughput" block carries their means and the FLOPs ratios against
the unchanged model, over every process of a data-parallel run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image

from vtw_core.analysis.k_search import DEFAULT_ETA, CalibrationSample, search_k
from vtw_core.engine.methods import Method, parse_method
from vtw_core.errors import InputError, VTWError
from vtw_core.generation.generate import generate_batch
from vtw_core.generation.likelihood import continuation_logprobs
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import GenerationStats, SamplingConfig
from vtw_core.integrations.cost import SampleCost, sample_costs, summarize
from vtw_core.models.defaults import DEFAULT_MODEL_DIR, default_model
from vtw_core.models.prompts import render_prompt, user_message

IMAGE_PLACEHOLDER = "<image>"  # some lmms-eval tasks write it into the question; the chat template places images


@dataclass
class VTWTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts, with the sample's cost beside them (they go to --log_samples)."""

    cost: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), **self.cost}


class VTW(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "baseline",
        k: int | str | None = None,
        eta: float | None = None,
        search_over: str | None = None,
        search_samples: int = 20,
        device: str | None = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        trust_remote_code: bool = False,
        **unknown: Any,
    ) -> None:
        super().__init__()
        unknown.pop("max_batch_size", None)  # lmms-eval passes it to every model; --batch_size auto is refused
        if unknown:
            raise InputError(
                f"unknown model arg(s) for vtw: {', '.join(sorted(unknown))}; known: pretrained, method, k, eta, "
                "search_over, search_samples, device, dtype, attention, max_new_tokens, trust_remote_code"
            )
        self.method_spec = _method_spec(method, k)
        parse_method(self.method_spec, num_layers=1024, auto_k=1)  # syntax and files, before loading weights
        self.batch_size_per_process = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.search_samples = _positive_int("search_samples", search_samples)
        if eta is not None and not (isinstance(eta, int | float) and eta >= 0):
            raise InputError(f"eta must be a number >= 0, got {eta!r}")
        if search_over not in (None, "prompt", "reply"):
            raise InputError(f"search_over must be prompt or reply, got {search_over!r}")

        self.accelerator = Accelerator()
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        source = pretrained or default_model()
        if source is None:  # a non-editable install carries no assets/
            raise VTWError(
                f"no pretrained= given and the embedded default model is not at {DEFAULT_MODEL_DIR}; install "
                "vtw_core editable from a checkout (pip install -e .[eval]) or pass pretrained=a hub id or folder"
            )
        self.manager = ModelManager.load(
            source,
            device=_process_device(device or "auto", self.accelerator),
            dtype=dtype,
            attention=attention,
            trust_remote_code=bool(trust_remote_code),
        )
        if self.manager.processor is None:
            raise VTWError("lmms-eval needs a model with a processor")
        self._device = self.manager.model.device
        saved = _saved_search(source)
        self.eta = float(eta) if eta is not None else saved.get("kl_threshold", DEFAULT_ETA)
        self.search_over = search_over or saved.get("kl_over", "prompt")
        self.method: Method | None = None  # None for k=auto: then one K per task, searched on its samples
        self.auto_methods: dict[str, Method] = {}
        if not self.method_spec.endswith(":auto"):
            self.method = _checked_method(self.method_spec, self.manager.info.num_layers)
        logger.info(f"vtw: {self.manager.info.describe()}; method {self.method_spec}")

    # lmms-eval reads these.
    @property
    def model(self) -> torch.nn.Module:
        return self.manager.model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.manager.processor, "tokenizer", self.manager.processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ------------------------------------------------------------------------------------------------------
    # Requests

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        self._resolve_auto_k(requests)
        results: list[GenerationResult] = [GenerationResult("") for _ in requests]
        costs: list[tuple[str, SampleCost]] = []
        elapsed = 0.0
        for indices in self._batches(requests, key=lambda args: _sampling_key(args[1])):
            gen_kwargs, task = requests[indices[0]].args[1], requests[indices[0]].args[4]
            method = self.method_for(task)
            sampling, stops = self._sampling(gen_kwargs)
            conversations, images = self._prompts([requests[i] for i in indices])
            stats = GenerationStats(k=method.k, num_layers=self.manager.info.num_layers)
            with self.manager.lock:
                outputs = generate_batch(
                    self.model,
                    self.manager.processor,
                    conversations,
                    images,
                    k=method.k,
                    schedule=method.schedule,
                    sampling=sampling,
                    stats=stats,
                )
            elapsed += stats.total_s or 0.0
            batch_costs = sample_costs(stats, self.model.config, [len(ids) for ids in outputs])
            for index, ids, cost in zip(indices, outputs, batch_costs, strict=True):
                text = _cut_at_stops(self.tokenizer.decode(ids, skip_special_tokens=True), stops)
                results[index] = GenerationResult(text, self._token_counts(cost))
            costs.extend((task, cost) for cost in batch_costs)
        self._log_summary("generate_until", costs, elapsed)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(negative log-likelihood of the continuation, greedy) per request, under the method.

        lmms-eval 0.7 picks the multiple-choice answer with the *smallest* value (its own models return a
        loss), so the continuation's summed log-probability is returned negated. The pair travels inside a
        GenerationResult because lmms-eval 0.7.3 turns bare (float, bool) tuples into strings.
        """
        self._resolve_auto_k(requests)
        results: list[GenerationResult] = [GenerationResult("") for _ in requests]
        costs: list[tuple[str, SampleCost]] = []
        elapsed = 0.0
        for indices in self._batches(requests, key=lambda args: ""):
            batch = [requests[i] for i in indices]
            task = batch[0].args[4]
            method = self.method_for(task)
            conversations, images = self._prompts(batch)
            continuations = [
                self._continuation_ids(conversation, self._continuation_text(request))
                for conversation, request in zip(conversations, batch, strict=True)
            ]
            stats = GenerationStats(k=method.k, num_layers=self.manager.info.num_layers)
            started = time.perf_counter()
            with self.manager.lock:
                scores = continuation_logprobs(
                    self.model,
                    self.manager.processor,
                    conversations,
                    images,
                    continuations,
                    k=method.k,
                    schedule=method.schedule,
                    stats=stats,
                )
            elapsed += time.perf_counter() - started
            batch_costs = sample_costs(stats, self.model.config, [len(ids) for ids in continuations])
            for index, (logprob, greedy), cost in zip(indices, scores, batch_costs, strict=True):
                results[index] = GenerationResult((-logprob, greedy), self._token_counts(cost))
            costs.extend((task, cost) for cost in batch_costs)
        self._log_summary("loglikelihood", costs, elapsed)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the vtw model answers single-round tasks (generate_until, multiple choice) only")

    # ------------------------------------------------------------------------------------------------------
    # Helpers

    def _batches(self, requests: list[Instance], key: Callable[[tuple], str]) -> list[list[int]]:
        """Indices of the real requests in batches of `batch_size`, in the task's order; one task and one
        `key` (sampling settings) per batch.

        lmms-eval pads the shorter ranks of a data-parallel run with copies of a request; their answers are
        thrown away, so they are not computed (no collective runs inside a forward pass here).
        """
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            if not request.metadata.get("__padding_only__"):
                groups.setdefault(f"{request.args[4]}\n{key(request.args)}", []).append(index)
        size = self.batch_size_per_process
        return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]

    def _prompts(self, requests: Sequence[Instance]) -> tuple[list[list[dict]], list[list[Image.Image]]]:
        conversations, images = [], []
        for request in requests:
            context, doc_to_visual, doc_id, task, split = (request.args[0], *request.args[2:6])
            visuals = _images(doc_to_visual(self.task_dict[task][split][doc_id]), task)
            conversations.append([user_message(_question(context), len(visuals))])
            images.append(visuals)
        return conversations, images

    def method_for(self, task: str) -> Method:
        return self.method if self.method is not None else self.auto_methods[task]

    def _continuation_text(self, request: Instance) -> str:
        target, doc_id, task, split = request.args[1], *request.args[3:6]
        return target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))

    def _continuation_ids(self, conversation: list[dict], continuation: str) -> list[int]:
        """The continuation's tokens as they follow the rendered prompt (tokenised together, then split)."""
        prompt = render_prompt(self.manager.processor, conversation)
        context_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole_ids = self.tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        if whole_ids[: len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
            return whole_ids[len(context_ids) :]
        return self.tokenizer(continuation, add_special_tokens=False)["input_ids"]  # a merge across the boundary

    def _sampling(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingConfig, list[str]]:
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else [stop for stop in until if stop]
        if int(gen_kwargs.get("num_beams") or 1) > 1:
            logger.warning("vtw: beam search is not supported; decoding greedily")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = temperature > 0 and gen_kwargs.get("do_sample") is not False  # lmms-eval: 0 means greedy
        sampling = SamplingConfig(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0) if do_sample else 1.0,
        )
        sampling.validate()
        return sampling, stops

    def _token_counts(self, cost: SampleCost) -> VTWTokenCounts:
        extra = {name: value for name, value in cost.to_dict().items() if name not in ("prompt_tokens", "new_tokens")}
        return VTWTokenCounts(input_tokens=cost.prompt_tokens, output_tokens=cost.new_tokens, cost=extra)

    def _log_summary(self, request_type: str, costs: list[tuple[str, SampleCost]], elapsed: float) -> None:
        """Gather every process's per-sample costs; the first process logs their summary into the results.

        lmms-eval reports what `log_metrics` received under "throughput" in the results (as avg_<name>): the
        summary over all samples, and per task (`<task>:<name>`) when the run has several.
        """
        if self._distributed():
            gathered: list[tuple[list[tuple[str, SampleCost]], float] | None] = [None] * self._world_size
            dist.all_gather_object(gathered, (costs, elapsed))
            costs = [cost for part in gathered if part for cost in part[0]]
            elapsed = sum(part[1] for part in gathered if part)  # device time summed over processes
        if self._rank != 0 or not costs:
            return
        tasks = sorted({task for task, _ in costs})
        summary = summarize([cost for _, cost in costs])
        if self.method is not None and self.method.k is not None:
            summary["vtw_k"] = self.method.k
        for task in tasks if len(tasks) > 1 else []:
            task_summary = summarize([cost for name, cost in costs if name == task])
            summary.update({f"{task}:{name}": value for name, value in task_summary.items()})
        for task in tasks:
            if task in self.auto_methods:
                summary[f"{task}:vtw_k" if len(tasks) > 1 else "vtw_k"] = self.auto_methods[task].k
        logger.info(f"vtw: {request_type}, method {self.method_spec}: {json.dumps(summary)}")
        tokens = sum(cost.new_tokens for _, cost in costs)
        log_metrics(
            total_elapsed_time=elapsed,
            total_gen_tokens=tokens,
            avg_speed=tokens / elapsed if elapsed > 0 else 0.0,
            additional_metrics=summary,
        )

    def _resolve_auto_k(self, requests: list[Instance]) -> None:
        """k=auto: the K search on each task's first documents, once per task, the same K on every process."""
        if self.method is not None:
            return
        tasks = sorted({request.args[4] for request in _real(requests)})
        if self._distributed():
            gathered: list[list[str] | None] = [None] * self._world_size
            dist.all_gather_object(gathered, tasks)
            tasks = sorted({task for part in gathered for task in part or []})
        for task in tasks:
            if task not in self.auto_methods:
                self.auto_methods[task] = self._search(task, requests)

    def _search(self, task: str, requests: list[Instance]) -> Method:
        ours = [request for request in _real(requests) if request.args[4] == task]
        candidates = sorted({request.args[3]: request.args[0] for request in ours}.items())[: self.search_samples]
        if self._distributed():
            gathered: list[list[tuple[int, str]] | None] = [None] * self._world_size
            dist.all_gather_object(gathered, candidates)
            candidates = sorted({pair for part in gathered for pair in part or []})[: self.search_samples]
        chosen: list[int | None] = [None]
        if self._rank == 0:
            if not ours:
                raise VTWError(f"k=auto: the first process holds no sample of {task} to search K on")
            doc_to_visual, split = ours[0].args[2], ours[0].args[5]
            samples = [
                CalibrationSample(_question(context), _images(doc_to_visual(self.task_dict[task][split][doc]), task))
                for doc, context in candidates
            ]
            with self.manager.lock:
                result = search_k(self.model, self.manager.processor, samples, eta=self.eta, over=self.search_over)
            if result.k is None:
                raise VTWError(f"k=auto: no K meets eta = {self.eta:g} on the first {len(samples)} samples of {task}")
            chosen[0] = result.k
            curve = result.to_dict()["curve"]
            logger.info(f"vtw: k=auto chose K = {result.k} for {task} (eta {self.eta:g}, KL over the "
                        f"{self.search_over}, its first {len(samples)} samples); curve {curve}")  # fmt: skip
        if self._distributed():
            dist.broadcast_object_list(chosen, src=0)
        return parse_method("vtw:auto", self.manager.info.num_layers, auto_k=chosen[0])

    def _distributed(self) -> bool:
        return self._world_size > 1 and dist.is_available() and dist.is_initialized()


def _method_spec(method: str, k: int | str | None) -> str:
    if k is None:
        return str(method)
    if method != "baseline":
        raise InputError(f"pass either method or k, not both (got method={method} and k={k})")
    return f"vtw:{k}"


def _checked_method(spec: str, num_layers: int) -> Method:
    method = parse_method(spec, num_layers)
    if method.schedule is not None and len(method.schedule.keep) != num_layers:
        raise InputError(f"{spec}: the schedule has {len(method.schedule.keep)} layers, the model {num_layers}")
    return method


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1 or str(number) != str(value).strip():
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return number


def _process_device(device: str, accelerator: Accelerator) -> str:
    """One GPU per process in a data-parallel run on CUDA; the device as given otherwise."""
    if accelerator.num_processes > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{accelerator.local_process_index}"
    return device


def _saved_search(source: str) -> dict[str, Any]:
    """The K search settings saved beside a local checkpoint (`vtw.json`), if any: its eta and KL position."""
    path = Path(source) / "vtw.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {key: saved[key] for key in ("kl_threshold", "kl_over") if key in saved}


def _question(context: str) -> str:
    return context.replace(IMAGE_PLACEHOLDER, "").strip()


def _images(visuals: Any, task: str) -> list[Image.Image]:
    visuals = [] if visuals is None else visuals if isinstance(visuals, list | tuple) else [visuals]
    if not all(isinstance(visual, Image.Image) for visual in visuals):
        kinds = sorted({type(visual).__name__ for visual in visuals})
        raise InputError(f"task {task}: the vtw model takes images only, got {', '.join(kinds)}")
    return [visual.convert("RGB") for visual in visuals]


def _sampling_key(gen_kwargs: dict[str, Any]) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """The text up to the first stop string (generation itself ends at EOS or max_new_tokens)."""
    cut = min((text.find(stop) for stop in stops if stop in text), default=len(text))
    return text[:cut]


def _real(requests: list[Instance]) -> list[Instance]:
    """The requests whose answers count (not lmms-eval's padding copies for uneven data-parallel shards)."""
    return [request for request in requests if not request.metadata.get("__padding_only__")]
