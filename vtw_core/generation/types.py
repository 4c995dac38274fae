"""The values generation passes around: a request's sampling settings (`SamplingConfig`), its measurements
(`GenerationStats`), the events of a streamed reply (`StreamEvent`) and a finished reply (`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from vtw_core import validation
from vtw_core.errors import InputError


@dataclass(frozen=True)
class SamplingConfig:
    """Greedy by default, so baseline and VTW answers are comparable token for token."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every field checked (finite, integral where needed, in range); integral floats become ints."""
        checked = {
            "max_new_tokens": validation.check_max_new_tokens(self.max_new_tokens),
            "temperature": validation.check_float(self.temperature, "temperature", 0, 100),
            "top_p": validation.check_float(self.top_p, "top_p", 0, 1, low_inclusive=False),
            "top_k": validation.check_int(self.top_k, "top_k", 0, 1_000_000),
            "seed": validation.check_seed(self.seed),
        }
        if not isinstance(self.do_sample, bool):
            raise InputError(f"do_sample must be true or false, got {self.do_sample!r}")
        if self.do_sample and checked["temperature"] == 0:
            raise InputError("temperature must be > 0 when sampling (0 means greedy: turn sampling off)")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: normalise once, at construction


@dataclass
class GenerationStats:
    """Per-request measurements. FLOPs are analytic (vtw_core.engine.flops) for the tokens actually processed."""

    k: int | None
    num_layers: int
    engine: str = "plain"
    prefill_engine: str = "plain"
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdpa"
    prompt_tokens: int = 0
    vision_tokens: int = 0  # image and video tokens
    video_frames: int = 0  # frames sampled from the request's videos
    video_tokens: int = 0
    vision_tokens_per_frame: float | None = None  # video tokens / frames (None without video)
    new_tokens: int = 0
    ttft_s: float | None = None
    total_s: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_flops: int = 0
    vision_flops: int = 0
    decode_flops: int = 0
    kv_cache_bytes: int = 0
    peak_memory_bytes: int | None = None
    finish_reason: str | None = None  # "eos", "length" or "stopped"
    # Batches: each row's own share of the counts above (the sums), so callers can report per request.
    prompt_tokens_per_row: list[int] = field(default_factory=list)
    vision_tokens_per_row: list[int] = field(default_factory=list)
    prefill_flops_per_row: list[int] = field(default_factory=list)
    decode_flops_per_row: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a number, a string, None or a list of numbers: a shallow copy with the lists copied is
        # what `dataclasses.asdict` gives, at a tenth of its cost (the server builds one per reply).
        return {name: list(value) if isinstance(value, list) else value
                for name, value in ((name, getattr(self, name)) for name in _STATS_FIELDS)}  # fmt: skip


_STATS_FIELDS = tuple(item.name for item in fields(GenerationStats))


@dataclass
class StreamEvent:
    text_delta: str
    text: str
    token_ids: list[int]
    stats: GenerationStats
    finished: bool = False


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats = field(repr=False)
