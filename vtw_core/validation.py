"""Request limits and parameter checks, shared by every entry point (app, API, CLI, server, Python).

Each check runs before any model work, names the parameter and its valid values, and raises InputError.
Numbers arrive from sliders, JSON and argparse alike, so floats that hold integers are accepted where an
integer is wanted, and NaN, infinities, booleans and out-of-range values are refused.
"""

from __future__ import annotations

import math
from typing import Any

from vtw_core.errors import InputError

# A question is a sentence or a paragraph; the limits keep one request from holding the device for minutes.
MAX_TEXT_CHARS = 4_000
MAX_TEXT_BYTES = 12_000  # UTF-8: 1 to 4 bytes per character, so both limits can bind
MAX_NEW_TOKENS = 4_096
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


def check_text(value: Any, name: str = "question") -> str:
    """The text, stripped; refused when not a string, empty, or longer than the limits (checked before tokenising)."""
    if not isinstance(value, str):
        raise InputError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise InputError(f"{name} is {len(value):,} characters long; at most {MAX_TEXT_CHARS:,} are accepted")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_TEXT_BYTES:
        raise InputError(f"{name} is {size:,} bytes long in UTF-8; at most {MAX_TEXT_BYTES:,} are accepted")
    text = value.strip()
    if not text:
        raise InputError(f"{name} is empty")
    return text


def _finite_number(value: Any, name: str) -> float | int:
    if isinstance(value, bool) or value is None:
        raise InputError(f"{name} must be a number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name} must be a number, got {value[:40]!r}") from None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {number}")
    return number


def check_int(value: Any, name: str, low: int, high: int) -> int:
    """An integer from low to high inclusive; a float is accepted when it holds an integer (sliders send 3.0)."""
    if isinstance(value, bool) or value is None:
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    number = _finite_number(value, name)
    if isinstance(number, float):
        if not number.is_integer():
            raise InputError(f"{name} must be a whole number from {low} to {high}, got {number:g}")
        number = int(number)
    if not low <= number <= high:
        shown = f"{number:.3g}" if abs(number) > 10**12 else str(number)
        raise InputError(f"{name} must be a whole number from {low} to {high}, got {shown}")
    return number


def check_float(
    value: Any, name: str, low: float, high: float, *, low_inclusive: bool = True, high_inclusive: bool = True
) -> float:
    """A finite float in the given interval; the message spells out the interval."""
    number = float(_finite_number(value, name))
    above = number >= low if low_inclusive else number > low
    below = number <= high if high_inclusive else number < high
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise InputError(f"{name} must be in {interval}, got {number:g}")
    return number


def check_k(value: Any, num_layers: int) -> int:
    """K counts the decoder layers that still see vision: 0 (none) .. num_layers (the unchanged model)."""
    return check_int(value, "K", 0, num_layers)


def check_seed(value: Any) -> int | None:
    return None if value is None else check_int(value, "seed", 0, MAX_SEED)


def check_max_new_tokens(value: Any) -> int:
    return check_int(value, "max_new_tokens", 1, MAX_NEW_TOKENS)
