"""Where the repository's bundled files live: the default model, calibration images, schedules, examples."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
