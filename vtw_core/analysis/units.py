"""One way to print FLOPs, bytes, KL divergences, seconds and ratios, for the app and the command line alike.

FLOPs and bytes get SI prefixes (k, M, G, T, P: powers of 1000), three significant digits, so the embedded
default model's 0.2 GFLOPs and LLaVA-7B's 8.5 TFLOPs read the same way. KL values span many decades (the
K search compares them with eta around 1e-3), so small ones are printed in scientific notation: a fixed
"0.000000" would hide exactly the values that decide K.
"""

from __future__ import annotations

import math

SI_PREFIXES = ("", "k", "M", "G", "T", "P", "E")


def si(value: float, unit: str, digits: int = 3) -> str:
    """`value` with an SI prefix and `digits` significant digits: si(2.12e8, "FLOPs") == "212 MFLOPs"."""
    if not math.isfinite(value) or value == 0:
        return f"{value:g} {unit}"
    exponent = min(max(math.floor(math.log10(abs(value)) / 3), 0), len(SI_PREFIXES) - 1)
    text = _significant(value / 1000**exponent, digits)
    if abs(float(text)) >= 1000 and exponent < len(SI_PREFIXES) - 1:  # 999.7 k rounds to "1.00 M", not "1000 k"
        exponent += 1
        text = _significant(value / 1000**exponent, digits)
    return f"{text} {SI_PREFIXES[exponent]}{unit}"


def _significant(value: float, digits: int) -> str:
    """`value` with `digits` significant digits, never in exponent form (values here are 1 to 999)."""
    rounded = float(f"{value:.{digits - 1}e}")  # 0.9997 becomes 1.00 before the decimals are counted
    magnitude = math.floor(math.log10(abs(rounded)))
    return f"{rounded:.{max(digits - 1 - magnitude, 0)}f}"


def format_flops(value: float) -> str:
    """Floating-point operations: "212 MFLOPs", "8.48 TFLOPs"."""
    return si(value, "FLOPs")


def format_bytes(value: float) -> str:
    """Memory sizes with SI prefixes: "1.23 MB" is 1.23e6 bytes."""
    return si(value, "B")


def format_kl(value: float) -> str:
    """A KL divergence: scientific notation below 0.01 ("5.40e-05"), four decimals above, "0" for exactly 0."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2e}" if abs(value) < 0.01 else f"{value:.4f}"


def format_seconds(value: float | None) -> str:
    """A duration: milliseconds under one second ("52 ms"), else seconds ("1.24 s")."""
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def format_ratio(value: float | None) -> str:
    """accelerated / baseline, as "0.77×"."""
    return "–" if value is None else f"{value:.2f}×"


def format_per_frame(value: float | None) -> str:
    """Vision tokens per video frame, one decimal ("196.0"): pooling can leave a fraction per frame."""
    return "–" if value is None else f"{value:.1f}"
