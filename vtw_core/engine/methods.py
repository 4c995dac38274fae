"""One way to name a token-reduction method everywhere K goes (CLI, eval, bench, app).

baseline            the unchanged model
vtw:K               Visual Tokens Withdrawal after K layers ("vtw:auto": K from the K search)
fastv:K:R           FastV: from layer K keep the top (1 - R) vision tokens by the last token's attention
schedule:FILE       a per-layer schedule saved as JSON (G-Search, P-Sigmoid, hand-written)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vtw_core import validation
from vtw_core.assets import ASSETS_DIR
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError

SCHEDULES = ASSETS_DIR / "schedules"


@dataclass(frozen=True)
class Method:
    label: str
    k: int | None = None
    schedule: Schedule | None = None


def parse_method(spec: str, num_layers: int, auto_k: int | None = None) -> Method:
    """A method from its spec string; `auto_k` stands in for "vtw:auto" (the caller runs the K search)."""
    name, _, rest = spec.partition(":")
    try:
        if name == "baseline" and not rest:
            return Method("baseline")
        if name == "vtw":
            if rest == "auto" and auto_k is None:
                raise InputError("vtw:auto needs the K search to run first (the caller runs it)")
            k = validation.check_k(auto_k if rest == "auto" else rest, num_layers)
            return Method(f"VTW K={k}", k=k)
        if name == "fastv":
            k_text, _, ratio_text = rest.partition(":")
            k, ratio = int(k_text or 2), float(ratio_text or 0.5)
            return Method(f"FastV K={k} R={ratio:g}", schedule=Schedule.fastv(k, ratio, num_layers))
        if name == "schedule" and rest:
            path = Path(rest)
            if not path.is_file() and (SCHEDULES / f"{rest}.json").is_file():
                path = SCHEDULES / f"{rest}.json"  # a bundled schedule by name
            schedule = Schedule.load(path)
            return Method(f"schedule {schedule.name}", schedule=schedule)
    except ValueError as error:
        raise InputError(f"cannot read the method {spec!r}: {error}") from error
    raise InputError(f"unknown method {spec!r}; use baseline, vtw:K, vtw:auto, fastv:K:R or schedule:FILE")
