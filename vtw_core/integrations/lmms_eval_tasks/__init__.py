"""lmms-eval tasks shipped with vtw_core: pass this folder to `lmms-eval --include_path` (see docs/evaluation.md)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
