"""Per-layer vision-token schedules: how many vision tokens each decoder layer keeps, and which.

A schedule gives, for each layer l, the share of the prompt's vision tokens that layer l (and every deeper
one, until the next cut) processes; shares never grow with depth and text tokens are always kept. Where the
share drops before layer l, the vision tokens are ranked by the attention they received at layer l-1 and
the best ones stay:

- ranking "last": attention from the last prompt token (FastV);
- ranking "text": attention from every text token, summed (G-Search's criterion).

The attention is recomputed for those query rows only (vtw_core.engine.query_attention), so the model
keeps its sdpa / flash kernels. VTW is the schedule 1 for K layers then 0 (no ranking needed: all go).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache

from vtw_core.engine.decoder import TokenState
from vtw_core.engine.query_attention import query_attention
from vtw_core.errors import InputError

Ranking = Literal["last", "text"]


@dataclass(frozen=True)
class Schedule:
    keep: tuple[float, ...]  # per layer: share of the prompt's vision tokens kept, non-increasing in [0, 1]
    ranking: Ranking = "text"
    name: str = "schedule"

    def __post_init__(self) -> None:
        if not self.keep:
            raise InputError("a schedule needs one keep share per decoder layer")
        if any(not 0 <= share <= 1 for share in self.keep):
            raise InputError("keep shares must lie between 0 and 1")
        if any(later > earlier + 1e-9 for earlier, later in zip(self.keep, self.keep[1:], strict=False)):
            raise InputError("keep shares must not grow with depth (a dropped token cannot come back)")
        if self.ranking not in ("last", "text"):
            raise InputError(f"ranking must be 'last' or 'text', got {self.ranking!r}")
        if 0 < self.keep[0] < 1:
            raise InputError("layer 0 keeps all or none of the vision tokens: there is no attention to rank by yet")

    @classmethod
    def vtw(cls, k: int, num_layers: int) -> Schedule:
        return cls(tuple([1.0] * k + [0.0] * (num_layers - k)), "last", f"vtw-k{k}")

    @classmethod
    def fastv(cls, k: int, ratio: float, num_layers: int) -> Schedule:
        """FastV: layers < k see every vision token; from layer k the top (1 - ratio), by the last token's attention."""
        if not 1 <= k < num_layers:
            raise InputError(f"FastV's K must be between 1 and {num_layers - 1}, got {k}")
        if not 0 <= ratio <= 1:
            raise InputError(f"FastV's R must be between 0 and 1, got {ratio}")
        return cls(tuple([1.0] * k + [1.0 - ratio] * (num_layers - k)), "last", f"fastv-k{k}-r{ratio:g}")

    def kept_counts(self, vision_tokens: int) -> list[int]:
        """Vision tokens kept per layer: `round(share * total)`, Python's rounding, as the official FastV code."""
        return [round(share * vision_tokens) for share in self.keep]

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "ranking": self.ranking, "keep": list(self.keep)})

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        try:
            data = json.loads(text)
            return cls(tuple(float(x) for x in data["keep"]), data.get("ranking", "text"), data.get("name", "schedule"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise InputError(f"not a schedule (JSON with a 'keep' list): {error}") from error

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"schedule file not found: {path}")
        return cls.from_json(path.read_text(encoding="utf-8"))


class ScheduleSelector:
    """A TokenSelector for one request (it keeps the query rows of the previous layer between calls)."""

    def __init__(self, model: nn.Module, schedule: Schedule, num_layers: int):
        if len(schedule.keep) != num_layers:
            raise InputError(f"the schedule has {len(schedule.keep)} layers, the model {num_layers}")
        self.model = model
        self.schedule = schedule
        self.vision_total: torch.Tensor | None = None
        self.previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _query_rows(self, hidden_states: torch.Tensor, tokens: TokenState):
        """(hidden rows, position rows, their slots) of the ranking queries in the current token layout."""
        if self.schedule.ranking == "last":
            slots = torch.full((hidden_states.shape[0], 1), hidden_states.shape[1] - 1, device=hidden_states.device)
        else:
            text = tokens.valid & ~tokens.vision
            count = int(text.sum(1).max())
            # Text tokens packed to the right (stable order), padding rows reuse the last slot (masked later).
            slots = torch.argsort(text.long(), dim=1, stable=True)[:, -count:]
        rows = hidden_states.gather(1, slots[..., None].expand(-1, -1, hidden_states.shape[-1]))
        positions = tokens.position_ids.gather(-1, slots if tokens.position_ids.ndim == 2 else
                                               slots[None].expand(tokens.position_ids.shape[0], -1, -1))  # fmt: skip
        return rows, positions, slots

    def keep(
        self, layer_idx: int, hidden_states: torch.Tensor, tokens: TokenState, cache: DynamicCache
    ) -> torch.Tensor | None:
        if self.vision_total is None:
            self.vision_total = tokens.vision.sum(1)
        # (batch,): the official FastV rule, round(share * total) with ties to even, in float64 like Python's round.
        target = torch.round(self.vision_total.double() * self.schedule.keep[layer_idx]).long()
        current = tokens.vision.sum(1)
        decision = None
        if bool((target < current).any()):
            if bool((target == 0).all()):
                decision = tokens.valid & ~tokens.vision
            else:
                decision = self._rank_and_cut(layer_idx, tokens, cache, target)
        return decision

    def observe(self, layer_idx: int, hidden_states: torch.Tensor, tokens: TokenState) -> None:
        """The layer's actual input (after this layer's cut): keep the ranking rows if the next layer cuts."""
        cuts_next = layer_idx + 1 < len(self.schedule.keep) and 0 < self.schedule.keep[layer_idx + 1] < 1
        self.previous = self._query_rows(hidden_states, tokens) if cuts_next else None

    def _rank_and_cut(self, layer_idx: int, tokens: TokenState, cache: DynamicCache, target: torch.Tensor):
        if self.previous is None:
            raise InputError("a schedule can only cut vision tokens after a layer that saw them")
        rows, positions, slots = self.previous
        if cache is None:
            raise InputError("a ranked schedule reads the keys of the layer before its cut: run with use_cache=True")
        keys = cache.layers[layer_idx - 1].keys
        valid = tokens.valid
        if self.schedule.ranking == "text":
            text = (tokens.valid & ~tokens.vision).gather(1, slots)
            probabilities = query_attention(self.model, layer_idx - 1, rows, positions, keys, valid, slots)
            received = (probabilities * text[..., None]).sum(1)  # (batch, keys)
        else:
            received = query_attention(self.model, layer_idx - 1, rows, positions, keys, valid, slots)[:, 0]
        received = received.masked_fill(~tokens.vision, float("-inf"))
        order = received.argsort(dim=1, descending=True, stable=True)
        positions_in_order = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, positions_in_order)
        chosen_vision = tokens.vision & (rank < target[:, None])
        return (tokens.valid & ~tokens.vision) | chosen_vision
