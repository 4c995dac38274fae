"""One loaded model and processor per process, shared by every caller (baseline and VTW alike)."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from vtw_core.engine.decoder import ATTENTION_IMPLEMENTATIONS, PositionMode, check_k
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError, VTWError
from vtw_core.generation.batch_stream import stream_generate_batch
from vtw_core.generation.concurrent import interleave
from vtw_core.generation.generate import (
    PREFILL_CHOICES,
    DecodeEngine,
    PrefillChoice,
    check_method,
    generate,
    stream_generate,
)
from vtw_core.generation.streaming import model_placement
from vtw_core.generation.types import GenerationResult, SamplingConfig, StreamEvent
from vtw_core.models.configs import shipped_config_path
from vtw_core.models.families import SUPPORTED_FAMILIES, model_family, num_decoder_layers
from vtw_core.models.processors import load_processor
from vtw_core.models.prompts import Message, user_message
from vtw_core.models.videos import Video

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """A device that can run the model here: cpu, cuda[:N] with that GPU present, or mps where available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("CUDA was requested but no GPU is available; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"{device} was requested but this machine has {torch.cuda.device_count()} GPU(s)")
        return resolved
    if resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError("mps (Apple GPU) was requested but is not available here; use --device cpu")
        return resolved
    raise InputError(f"device {device!r} cannot run a model here; use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (CPU half-precision matmuls are slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


# The package each flash kernel needs; transformers names these implementations after them.
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def resolve_attention(attention: str, device: torch.device) -> str:
    """flash-attn where it is installed and usable (CUDA), else PyTorch's sdpa."""
    if attention == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(f"attention must be one of auto, {', '.join(ATTENTION_IMPLEMENTATIONS)}; got {attention!r}")
    if attention in FLASH_PACKAGES:
        if device.type != "cuda":
            raise InputError(f"{attention} runs on CUDA only; use --attention sdpa on {device.type}")
        if importlib.util.find_spec(FLASH_PACKAGES[attention]) is None:
            raise InputError(
                f"{attention} needs the {FLASH_PACKAGES[attention]} package, which is not installed; "
                "install it or use --attention sdpa"
            )
    return attention


def resolve_source(source: str) -> str:
    """A local folder, a config shipped with vtw_core (random weights only), or a hub id, as given."""
    shipped = shipped_config_path(source)
    if shipped is not None and not Path(source).exists():
        return str(shipped)
    return source


def searched_k(source: str, num_layers: int) -> int | None:
    """The K that a K search saved beside a local checkpoint (`vtw.json`, as the default model ships), if valid."""
    path = Path(source) / "vtw.json"
    if not path.is_file():
        return None
    try:
        k = json.loads(path.read_text(encoding="utf-8")).get("k")
    except (OSError, ValueError, AttributeError):
        return None
    return k if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_layers else None


@dataclass
class ModelInfo:
    source: str
    family: str
    num_layers: int
    device: str
    dtype: str
    attention: str
    random_weights: bool
    searched_k: int | None = None  # from the checkpoint's vtw.json: the app's starting K

    def describe(self) -> str:
        weights = " (random weights)" if self.random_weights else ""
        return (
            f"{self.source}{weights}: {SUPPORTED_FAMILIES[self.family]}, {self.num_layers} layers, "
            f"{self.device}, {self.dtype}, {self.attention}"
        )


def _reason(error: BaseException) -> str:
    """The first line of a library's error, with its type: enough to act on, without the traceback."""
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


class ModelManager:
    """Holds one copy of the weights on one device; `lock` serialises every use of that device."""

    def __init__(self, model: torch.nn.Module, processor: Any, source: str, random_weights: bool = False,
                 prefill_engine: PrefillChoice = "plain"):  # fmt: skip
        """`prefill_engine`: how answers (`stream`, `stream_batch`, `generate`, `race`) prefill (see generate_rows)."""
        if prefill_engine not in PREFILL_CHOICES:
            raise InputError(f"prefill engine must be one of {', '.join(PREFILL_CHOICES)}; got {prefill_engine!r}")
        self.prefill_engine = prefill_engine
        self.model = model.eval()
        self.processor = processor
        self.lock = threading.Lock()
        self.info = ModelInfo(
            source=source,
            family=model_family(model.config),
            num_layers=num_decoder_layers(model.config),
            **model_placement(model),
            random_weights=random_weights,
        )
        self.info.searched_k = searched_k(source, self.info.num_layers)

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        trust_remote_code: bool = False,
        random_weights: bool = False,
        prefill_engine: PrefillChoice = "plain",
    ) -> ModelManager:
        """Load from a hub id or local folder; `random_weights` builds the architecture from its config only."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        implementation = resolve_attention(attention, torch_device)
        path = resolve_source(source)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as error:  # OSError: no config; ValueError: custom code without trust_remote_code; ...
            raise VTWError(f"cannot load a model config from {source!r}: {_reason(error)}") from error
        model_family(config)  # fail before downloading weights of an unsupported model
        if random_weights:
            with torch_device:
                model = AutoModelForImageTextToText.from_config(
                    config,
                    dtype=torch_dtype,
                    attn_implementation=implementation,
                    trust_remote_code=trust_remote_code,
                )
            processor = None
        else:
            try:
                model = AutoModelForImageTextToText.from_pretrained(
                    path,
                    dtype=torch_dtype,
                    attn_implementation=implementation,
                    device_map=str(torch_device),
                    trust_remote_code=trust_remote_code,
                )
            except Exception as error:  # missing or truncated weights, a corrupt header, a broken shard, ...
                raise VTWError(f"cannot load the model weights from {source!r}: {_reason(error)}") from error
            try:
                processor = load_processor(path, trust_remote_code=trust_remote_code)
            except Exception as error:  # no tokenizer, a broken tokenizer.json, no image processor, ...
                message = f"cannot load the tokenizer and image processor of {source!r}: {_reason(error)}"
                raise VTWError(message) from error
        return cls(model, processor, source, random_weights=random_weights, prefill_engine=prefill_engine)

    def _require_processor(self) -> None:
        if self.processor is None:
            raise InputError("this model was built with random weights and has no processor; it cannot chat")

    def _check_request(self, k: Any, schedule: Schedule | None, sampling: SamplingConfig) -> None:
        """Before waiting for the device: K, the method and the sampling parameters."""
        self._require_processor()
        check_k(k, self.info.num_layers)
        check_method(k, schedule)
        if not isinstance(sampling, SamplingConfig):
            raise InputError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        sampling.validate()

    def stream(
        self,
        messages: list[Message],
        images: list[Image.Image],
        *,
        videos: list[Video] | None = None,
        k: int | None = None,
        position_mode: PositionMode = "original",
        sampling: SamplingConfig = SamplingConfig(),
        stop_event: threading.Event | None = None,
        engine: DecodeEngine = "auto",
        schedule: Schedule | None = None,
    ) -> Iterator[StreamEvent]:
        """Stream one answer; the device is held for the whole answer, so each request's numbers are its own.

        `videos`: vtw_core.models.videos.read_video results for the messages' "video" slots.
        """
        self._check_request(k, schedule, sampling)
        with self.lock:
            yield from stream_generate(
                self.model,
                self.processor,
                messages,
                images,
                videos=videos,
                k=k,
                position_mode=position_mode,
                sampling=sampling,
                stop_event=stop_event,
                engine=engine,
                schedule=schedule,
                prefill_engine=self.prefill_engine,
            )

    def stream_batch(
        self,
        conversations: list[list[Message]],
        images: list[list[Image.Image]],
        *,
        k: int | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        stop_event: threading.Event | None = None,
        stop_events: Sequence[threading.Event | None] | None = None,
        max_new_tokens: Sequence[int] | None = None,
        schedule: Schedule | None = None,
    ) -> Iterator[tuple[int, StreamEvent]]:
        """Answer several conversations in one left-padded engine call (same method and sampling for all).

        Yields (row, event); each row's events and stats are its own (vtw_core.generation.batch_stream).
        `stop_events` (one per row) stop single rows, which then leave the batch; `stop_event` stops them all.
        `max_new_tokens` (one per row) overrides `sampling.max_new_tokens` row by row.
        """
        self._require_processor()
        with self.lock:
            yield from stream_generate_batch(
                self.model,
                self.processor,
                conversations,
                images,
                k=k,
                sampling=sampling,
                stop_event=stop_event,
                stop_events=stop_events,
                max_new_tokens=max_new_tokens,
                schedule=schedule,
                prefill_engine=self.prefill_engine,
            )

    def race(self, requests: dict[str, dict[str, Any]]) -> Iterator[tuple[str, StreamEvent]]:
        """Run several `stream` requests at once on the device, yielding (name, event) as they come.

        Their timings are contended (they share the device), unlike requests run one after the other.
        Closing the iterator early stops every request and waits for them.
        """
        self._require_processor()

        def starter(options: dict[str, Any]):
            return lambda stop: stream_generate(self.model, self.processor, stop_event=stop,
                                                prefill_engine=self.prefill_engine, **options)  # fmt: skip

        streams = {}
        for name, options in requests.items():
            options = dict(options)
            stop = options.pop("stop_event", None)
            streams[name] = (starter(options), stop)
        with self.lock:
            yield from interleave(streams)

    def warm_up(self, ks: Iterable[int | None], batches: bool = False) -> None:
        """One short answer per K about a blank image, so no request pays a one-time cost (the compiled prefill
        and decode step trace and compile their graphs per K at their first use; the step's, at the answer's second
        token); `batches`: also two batches of two per K, one of equal prompts and one left-padded (a batch
        compiles graphs of its own, with and without padding masks)."""
        image = Image.new("RGB", (64, 64), "white")
        sampling = SamplingConfig(max_new_tokens=2)
        questions = ["What is in the image?", "What color is the shape in the image?"]
        for k in dict.fromkeys(ks):  # each K once, in order
            self.generate([user_message(questions[0])], [image], k=k, sampling=sampling)
            for pair in ([questions[0]] * 2, questions) if batches else ():
                for _ in self.stream_batch([[user_message(q)] for q in pair], [[image]] * 2, k=k, sampling=sampling):
                    pass

    def generate(self, messages: list[Message], images: list[Image.Image], **options: Any) -> GenerationResult:
        self._check_request(options.get("k"), options.get("schedule"), options.get("sampling", SamplingConfig()))
        with self.lock:
            return generate(self.model, self.processor, messages, images,
                            **{"prefill_engine": self.prefill_engine, **options})  # fmt: skip
