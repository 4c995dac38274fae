"""Every script in scripts/ runs as `python scripts/NAME.py` after the README's install alone, which installs the
requirements but not vtw_core: each puts the repository root on sys.path itself, before importing vtw_core or app.

The run below takes vtw_core's own installation (this checkout's editable install, or any other) out of the
interpreter before the script starts, and runs it from a temporary folder with PYTHONPATH unset, so only the
script's own bootstrap can make vtw_core importable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
BOOTSTRAP = ("ROOT = Path(__file__).resolve().parent.parent", "sys.path.insert(0, str(ROOT))")

# Run a script as `python scripts/NAME.py ARGS` would, with vtw_core and app found only through sys.path entries
# outside site-packages: an installed copy (editable or not) is out of reach, a path the script adds is not.
UNINSTALLED = """
import importlib.util, os, runpy, sys
from importlib.machinery import PathFinder


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name not in ("vtw_core", "app"):
            return None
        spec = PathFinder.find_spec(name, [entry for entry in sys.path if "-packages" not in entry])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return spec


def vtw_core_spec():
    try:
        return importlib.util.find_spec("vtw_core")
    except ModuleNotFoundError:
        return None


sys.meta_path.insert(0, NotInstalled())
if vtw_core_spec() is not None:
    sys.exit("vtw_core is importable before the script runs: this check would prove nothing")
script, *args = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))  # what `python scripts/NAME.py` puts first
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as exit:
    code = exit.code
spec = vtw_core_spec()
print("vtw_core from", spec.origin if spec else None)
sys.exit(code)
"""


def test_the_scripts_are_found():
    assert len(SCRIPTS) >= 5 and all(path.is_file() for path in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_bootstraps_the_repository_root(script):
    lines = [line.split("  #")[0].rstrip() for line in script.read_text(encoding="utf-8").splitlines()]
    positions = [lines.index(line) if line in lines else -1 for line in BOOTSTRAP]
    assert -1 not in positions, f"{script.name} lacks the bootstrap lines {BOOTSTRAP}"
    imports = [n for n, line in enumerate(lines) if re.match(r"\s*(from|import) (vtw_core|app)\b", line)]
    assert all(positions[0] < positions[1] < n for n in imports), "vtw_core or app imported before the bootstrap"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_help_without_vtw_core_installed(script, tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", UNINSTALLED, str(script), "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: ")
    # The script's bootstrap, not an installation, is what makes vtw_core importable.
    assert f"vtw_core from {ROOT / 'vtw_core' / '__init__.py'}" in result.stdout
