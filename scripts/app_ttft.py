"""Time to first token of the baseline and of VTW, turn by turn over fresh sessions of a running VTW Chat app,
against `python -m vtw_core bench` on the same question; print a table.

    python app.py --port 7860 &
    python scripts/app_ttft.py --url http://127.0.0.1:7860/ --sessions 10 --turns 5

Each session is a new Gradio client (its own session), as a new visitor would be; each of its turns is one
`/compare` call (the app's API: one greedy question about one image, baseline then VTW at K, through the same
model manager as the chat) on the first of the app's examples for the loaded model, with its question. TTFT is
what the app measured for each side (its stats), not the client's round trip. Turn 1 of every session is the
turn a visitor sees first; turns 2..N follow within the session.

Then `python -m vtw_core bench` times the same image and question (baseline and VTW at K, interleaved after a
warm-up, in a process of its own) for the reference ratio; `--bench-json FILE` reads a saved `bench --json`
output instead, `--no-bench` skips it. A fair turn 1 has a VTW / baseline ratio within 1.25x of bench's.
Run it on a quiet machine: the app and bench take turns on the device, never at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.media import example_files  # noqa: E402  (examples only: this script touches no tensors)

TARGET = 1.25  # turn-1 ratio / bench ratio: at most this far from bench's (either way)


def spread(values: list[float], scale: float = 1.0, digits: int = 0) -> str:
    """median [min-max] of `values` times `scale`."""
    low, mid, high = min(values) * scale, statistics.median(values) * scale, max(values) * scale
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def bench_ratio(args: argparse.Namespace, image: Path, question: str, k: int) -> tuple[float, str] | None:
    """VTW / baseline TTFT (ratio of bench's medians) on the same image and question, and where it came from."""
    if args.no_bench:
        return None
    if args.bench_json:
        text, source = Path(args.bench_json).read_text(encoding="utf-8"), f"bench --json in {args.bench_json}"
    else:
        model = ["--model", args.model] if args.model else []
        command = [sys.executable, "-m", "vtw_core", "bench", *model, "--image", str(image), "--prompt", question,
                   "--k", str(k), "--new-tokens", str(args.max_new_tokens), "--repeats", str(args.bench_repeats),
                   "--json"]  # fmt: skip
        source = " ".join(["python", *command[1:]])
        print(f"reference: {source}", flush=True)
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
        text = done.stdout
    payload = json.loads(text.strip().splitlines()[-1])  # --json prints the payload last
    rows = payload["rows"]
    baseline = next(row for row in rows if row["label"] == "baseline")
    vtw = next((row for row in rows if row.get("k") == k), None)
    if vtw is None:
        sys.exit(f"the bench output has no row for K = {k} (it has {[row['label'] for row in rows]})")
    return vtw["ttft_s"] / baseline["ttft_s"], source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--sessions", type=int, default=10, help="fresh client sessions (turn 1 of each)")
    parser.add_argument("--turns", type=int, default=5, help="turns per session")
    parser.add_argument("--k", type=int, default=None, help="default: the K the app starts with")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--photos", action="store_true", help="use the photo examples (real checkpoints)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between sessions (a visitor arriving)")
    parser.add_argument("--think", type=float, default=1.0, help="seconds between turns (a visitor reading)")
    parser.add_argument("--model", help="the app's --model, for bench (default: the embedded default model)")
    parser.add_argument("--bench-repeats", type=int, default=7)
    parser.add_argument("--bench-json", help="read bench's --json output from this file instead of running it")
    parser.add_argument("--no-bench", action="store_true", help="no reference ratio")
    args = parser.parse_args()
    if args.sessions < 1 or args.turns < 1:
        parser.error("--sessions and --turns must be at least 1")

    from gradio_client import Client, handle_file

    k = args.k
    if k is None:
        api = Client(args.url, verbose=False).view_api(return_format="dict", print_info=False)
        k = api["named_endpoints"]["/compare"]["parameters"][2]["parameter_default"]
    image, question = example_files(default=not args.photos)[0]
    print(
        f"{args.sessions} fresh sessions x {args.turns} turns through {args.url} /compare: VTW at K = {k}, "
        f"{image.name} {question!r}, {args.max_new_tokens} max new tokens",
        flush=True,
    )
    ttft: dict[int, list[tuple[float, float]]] = {turn: [] for turn in range(1, args.turns + 1)}
    for session in range(1, args.sessions + 1):
        time.sleep(args.pause)
        client = Client(args.url, verbose=False)  # a new session, as a new visitor
        for turn in range(1, args.turns + 1):
            if turn > 1:
                time.sleep(args.think)
            result = client.predict(handle_file(str(image)), question, k, args.max_new_tokens, api_name="/compare")
            pair = (result["baseline"]["stats"]["ttft_s"], result["vtw"]["stats"]["ttft_s"])
            ttft[turn].append(pair)
            print(f"session {session} turn {turn}: baseline {pair[0] * 1e3:.1f} ms, VTW {pair[1] * 1e3:.1f} ms, "
                  f"ratio {pair[1] / pair[0]:.2f}", flush=True)  # fmt: skip
        client.close()

    reference = bench_ratio(args, image, question, k)
    bench = f"{reference[0]:.2f}" if reference else "-"
    print(f"\nTTFT ms and VTW / baseline ratio per turn: median [min-max] over {args.sessions} sessions")
    print("| turn | TTFT baseline | TTFT VTW | ratio | bench's ratio | ratio / bench's |")
    print("|---|---|---|---|---|---|")
    for turn, pairs in ttft.items():
        ratios = [vtw / base for base, vtw in pairs]
        against = f"{statistics.median(ratios) / reference[0]:.2f}" if reference else "-"
        print(f"| {turn} | {spread([b for b, _ in pairs], 1e3)} | {spread([v for _, v in pairs], 1e3)} "
              f"| {spread(ratios, 1, 2)} | {bench} | {against} |")  # fmt: skip
    if reference:
        first = statistics.median(vtw / base for base, vtw in ttft[1]) / reference[0]
        verdict = "within" if 1 / TARGET <= first <= TARGET else "OUTSIDE"
        print(f"\nTurn 1's median ratio is {first:.2f}x bench's ({reference[1]}): {verdict} the {TARGET}x target.")


if __name__ == "__main__":
    main()
