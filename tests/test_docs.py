"""The documentation holds: its links resolve, the files and modules it names exist, and its runnable commands run.

A shell block is runnable on a CPU when its fence reads ```` ```bash cpu ```` instead of ```` ```bash ````. Each of its
commands (a line, `\\` continuing it; `#` starts a comment) runs from the repository root with HF_HUB_OFFLINE=1 and
must exit with status 0. Mark only commands that finish in a few seconds on the embedded default model or a
shipped config; installs, servers and long runs stay plain `bash` blocks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE_INFO = "bash cpu"
COMMAND_TIMEOUT_S = 180

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})\s*(.*?)\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"\b(?:src|href)=\"([^\"]+)\"")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# Repository paths and modules named in code: `vtw_core/engine/decoder.py`, `python scripts/x.py`, `vtw_core.serve`.
REPO_PATH = re.compile(r"(?<![\w./-])((?:vtw_core|app|scripts|assets|tests|docs|\.ci)/[\w./-]*)")
TOP_FILE = re.compile(
    r"(?<![\w./-])((?:app|serve_config|pyproject|requirements(?:-dev)?)\.(?:py|yaml|toml|txt))(?![\w/-])"
)
MODULE = re.compile(r"(?<![\w./-])(vtw_core(?:\.\w+)+)")
# A file tree in a plain fenced block: a root line `vtw_core/`, then `├── name  what it is` entries, 4 columns a level.
TREE_ROOT = re.compile(r"^([\w.-]+)/\s*$")
TREE_ENTRY = re.compile(r"^((?:│   |    )*)[├└]── ([\w.-]+/?(?:, [\w.-]+/?)*)")
# One-off scripts being folded into `bench` options; the pages that name them are rewritten separately. Empty this
# set when they are: every other path must exist.
SHELL_SYNTAX = {"&&", "||", "|", ";", "&", ">", ">>", "<", "2>&1"}


def split_fences(text: str) -> tuple[list[str], list[tuple[str, int, list[str]]]]:
    """(the lines outside fenced code, fences blanked out; the fenced blocks as (info string, first line, lines))."""
    prose: list[str] = []
    blocks: list[tuple[str, int, list[str]]] = []
    fence: tuple[str, str, int, list[str]] | None = None  # (marker, info, first line, lines)
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                fence = (match.group(1), match.group(2), number + 1, [])
                prose.append("")
            else:
                prose.append(line)
            continue
        marker, info, first, lines = fence
        if match and match.group(1)[0] == marker[0] and len(match.group(1)) >= len(marker) and not match.group(2):
            blocks.append((info, first, lines))
            fence = None
        else:
            lines.append(line)
        prose.append("")
    if fence is not None:
        blocks.append((fence[1], fence[2], fence[3]))
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, without punctuation, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... suffixes on repeated headings."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    seen: Counter[str] = Counter()
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
            seen[base] += 1
    return found


def link_targets(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link outside code: inline, reference-style, and HTML src/href attributes."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    targets = []
    for number, line in enumerate(prose, start=1):
        line = CODE_SPAN.sub("", line)
        for pattern in (INLINE_LINK, HTML_LINK, REFERENCE_LINK):
            targets += [(number, match.group(1)) for match in pattern.finditer(line)]
    return targets


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown file that name no existing file, or no heading of the markdown file named."""
    broken = []
    for number, target in link_targets(path):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not resolved.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading with that anchor in {resolved.name})")
    return broken


def code_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline code span and every line of fenced code."""
    prose, blocks = split_fences(path.read_text(encoding="utf-8"))
    texts = [(number, match.group(2)) for number, line in enumerate(prose, 1) for match in CODE_SPAN.finditer(line)]
    for _, first, lines in blocks:
        texts += [(first + offset, line) for offset, line in enumerate(lines)]
    return texts


def module_exists(name: str) -> bool:
    """`vtw_core.a.b.attr...`: the longest prefix that is a package or module exists, and what follows is in it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if source.is_file():
            text = source.read_text(encoding="utf-8")
            return all(re.search(rf"\b{re.escape(attr)}\b", text) for attr in parts[end:])
    return False


def tree_paths(path: Path) -> list[tuple[int, str]]:
    """(line, path) of every entry of the file trees drawn in a page's plain fenced blocks."""
    _, blocks = split_fences(path.read_text(encoding="utf-8"))
    paths = []
    for info, first, lines in blocks:
        root = TREE_ROOT.match(lines[0]) if lines and not info else None
        if root is None:
            continue
        folders = [root.group(1)]
        for offset, line in enumerate(lines[1:], start=1):
            entry = TREE_ENTRY.match(line)
            if entry is None:
                continue
            parents = folders[: len(entry.group(1)) // 4 + 1]
            for name in entry.group(2).split(", "):
                paths.append((first + offset, "/".join([*parents, name.rstrip("/")])))
                if name.endswith("/"):
                    folders = [*parents, name.rstrip("/")]
    return paths


def missing_names(path: Path) -> list[str]:
    """Repository paths and `vtw_core` modules named in a page's code or file trees that do not exist."""
    missing = [f"{path.name}:{number}: {name}" for number, name in tree_paths(path) if not (ROOT / name).exists()]
    for number, text in code_texts(path):
        for match in (*REPO_PATH.finditer(text), *TOP_FILE.finditer(text)):
            name = match.group(1).rstrip(".,:;")
            if not (ROOT / name).exists():
                missing.append(f"{path.name}:{number}: {name}")
        for match in MODULE.finditer(text):
            if not module_exists(match.group(1)):
                missing.append(f"{path.name}:{number}: {match.group(1)}")
    return missing


def runnable_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) of every command in the blocks fenced as runnable on a CPU."""
    _, blocks = split_fences(text)
    commands = []
    for info, first, lines in blocks:
        if info != RUNNABLE_INFO:
            continue
        pending, start = "", first
        for offset, line in enumerate(lines):
            if not pending:
                start = first + offset
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append((start, command))
    return commands


def run_command(command: str) -> subprocess.CompletedProcess[str]:
    """One documented command, from the repository root, offline; `python` is this interpreter. No shell syntax."""
    argv = shlex.split(command, comments=True)
    shell_words = SHELL_SYNTAX.intersection(argv)
    if shell_words:
        raise ValueError(f"runnable commands are run without a shell; found {sorted(shell_words)} in: {command}")
    if argv[0] == "python":
        argv[0] = sys.executable
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )


def documented_commands() -> list[tuple[str, str]]:
    """Every runnable command of the README and docs/, each once: (where it first appears, command)."""
    found: dict[str, str] = {}
    for page in PAGES:
        for number, command in runnable_commands(page.read_text(encoding="utf-8")):
            found.setdefault(command, f"{page.relative_to(ROOT)}:{number}")
    return [(where, command) for command, where in found.items()]


COMMANDS = documented_commands()


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_named_files_and_modules_exist(page: Path) -> None:
    assert missing_names(page) == []


def test_readme_stays_a_door() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 250
    assert len(COMMANDS) >= 3, "the README and docs/ should keep some commands marked as runnable on a CPU"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_runnable_command(where: str, command: str) -> None:
    result = run_command(command)
    assert result.returncode == 0, f"{where}: `{command}` exited {result.returncode}\n{result.stderr[-3000:]}"


# --- The checks themselves can fail ----------------------------------------------------------------------------


def test_broken_links_and_anchors_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text(
        "# Other page\n\n## Serve many users: an OpenAI-compatible API\n\n## Usage\n\n## Usage\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#serve-many-users-an-openai-compatible-api) [ok](#page) [ok](other.md#usage-1)\n"
        "[web](https://example.com/missing.md) `[code](not-a-link.md)`\n"
        '[gone](missing.md) [bad anchor](other.md#nope) [bad self](#nowhere) <img src="missing.png">\n'
        "```bash\n# Not a heading\n[in a fence](missing-too.md)\n```\n[fence heading](#not-a-heading)\n"
    )
    assert [entry.split(": ", 1)[1] for entry in broken_links(page)] == [
        "missing.md (no such file)",
        "other.md#nope (no heading with that anchor in other.md)",
        "#nowhere (no heading with that anchor in page.md)",
        "missing.png (no such file)",
        "#not-a-heading (no heading with that anchor in page.md)",
    ]


def test_slugs_follow_github() -> None:
    assert slug("Serve many users: an OpenAI-compatible API") == "serve-many-users-an-openai-compatible-api"
    assert slug("The `eval` command") == "the-eval-command"
    assert slug("History: the second default model (v2)") == "history-the-second-default-model-v2"
    assert slug("Speed on a 2-core CPU") == "speed-on-a-2-core-cpu"


def test_missing_files_and_modules_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "`vtw_core/engine/decoder.py`, `vtw_core/engine/nope.py`, `python scripts/no_such_script.py --x 1`,\n"
        "`vtw_core.engine.decoder.run_decoder`, `vtw_core.engine.decoder.no_such_function`, `vtw_core.nope`\n"
        "```\nvtw_core/\n├── engine/    the engine\n│   ├── decoder.py, gone.py  two files\n│   └── nope/\n"
        "│       └── x.py\n└── errors.py\n```\n"
    )
    assert [entry.split(": ", 1)[1] for entry in missing_names(page)] == [
        "vtw_core/engine/gone.py",
        "vtw_core/engine/nope",
        "vtw_core/engine/nope/x.py",
        "vtw_core/engine/nope.py",
        "scripts/no_such_script.py",
        "vtw_core.engine.decoder.no_such_function",
        "vtw_core.nope",
    ]


def test_only_marked_blocks_run_and_failures_show() -> None:
    text = (
        "```bash\npython -c 'raise SystemExit(1)'\n```\n"
        "```bash cpu\n# a comment\npython -c 'import sys' \\\n    --flag\n"
        "python -c 'raise SystemExit(3)'  # fails\n```\n"
    )
    commands = runnable_commands(text)
    assert commands == [(6, "python -c 'import sys'      --flag"), (8, "python -c 'raise SystemExit(3)'  # fails")]
    assert run_command(commands[1][1]).returncode == 3
    with pytest.raises(ValueError, match="without a shell"):
        run_command("python app.py --help && echo done")
