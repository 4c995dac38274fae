"""Real model configs shipped with vtw_core, for random-weight benches and `flops --model NAME` offline.

Each folder holds the `config.json` of a public checkpoint (no weights), loadable with
`transformers.AutoConfig.from_pretrained(folder)`.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent


def shipped_config_names() -> list[str]:
    """Names of the shipped configs, sorted (e.g. "llava-1.5-7b")."""
    return sorted(path.parent.name for path in CONFIGS_DIR.glob("*/config.json"))


def shipped_config_path(name: str) -> Path | None:
    """The folder of the shipped config called `name`, or None if there is none by that name."""
    # Only bare names: "../x" or a hub id like "llava-hf/llava-1.5-7b-hf" must not resolve here.
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    folder = CONFIGS_DIR / name
    return folder if (folder / "config.json").is_file() else None
