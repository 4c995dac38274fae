"""The command line, `python -m vtw_core SUBCOMMAND`: one module per subcommand (generate, flops, bench, search-k,
attention, schedule-search, eval, serve), each with `add_parser(subparsers)` and `run(args)`, on the argument shapes
they share in `args`; `main` builds the parser from them and runs the chosen one. It may import everything in
vtw_core (heavy modules inside `run`, so `--help` stays fast), and nothing imports it except vtw_core/__main__.py.
"""

from __future__ import annotations

import argparse
import sys

from vtw_core.cli import attention, bench, flops, generate, schedule_search, search_k, serve
from vtw_core.cli import eval as evaluate
from vtw_core.errors import VTWError

DESCRIPTION = (
    "`python -m vtw_core`: generate, flops, bench, search-k, attention, eval and serve from the command line.\n\n"
    "Every command that prints a result with `--json` prints exactly one JSON object, as the last line.\n"
)
SUBCOMMANDS = (generate, flops, bench, search_k, attention, schedule_search, evaluate, serve)  # --help lists them so


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vtw_core", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 with `error: ...` on stderr when vtw_core refuses the request."""
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):  # the commands that load a model: vtw_core.runtime's rule, before they do
            from vtw_core.runtime import configure_process

            args.process = configure_process(args.threads)
        args.handler(args)
    except VTWError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
