"""Drive a running VTW Chat app with N concurrent API sessions for a bounded time; print what it sustained.

    python app.py --port 7860 &
    python scripts/load_test.py --url http://127.0.0.1:7860/ --sessions 8 --duration 60

Each session is its own gradio_client connection calling `/compare` (baseline + VTW, greedy) in a loop.
Requests queue on the app's single device, so latency grows with the number of sessions while throughput
stays about the device's; errors (queue full, failures) are counted, not fatal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # vtw_core and app from this checkout, installed or not
ASSETS = ROOT / "assets" / "examples"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_session(url: str, args: argparse.Namespace, deadline: float, latencies: list, errors: Counter) -> None:
    from gradio_client import Client, handle_file

    try:
        client = Client(url, verbose=False)
    except Exception as error:  # connection refused, bad URL: counted like any failure
        errors[f"connect: {type(error).__name__}"] += 1
        return
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            client.predict(handle_file(args.image), args.question, args.k, args.max_new_tokens, api_name="/compare")
            latencies.append(time.monotonic() - start)
        except Exception as error:
            errors[f"{type(error).__name__}: {str(error)[:80]}"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent client sessions")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to keep sending requests")
    parser.add_argument("--image", default=str(ASSETS / "chelsea.jpg"))
    parser.add_argument("--question", default="What animal is this?")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    latencies: list[float] = []
    errors: Counter = Counter()
    started = time.monotonic()
    deadline = started + args.duration
    threads = [
        threading.Thread(target=run_session, args=(args.url, args, deadline, latencies, errors))
        for _ in range(args.sessions)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    print(f"{args.sessions} sessions for {args.duration:.0f} s against {args.url} ({elapsed:.1f} s incl. drain)")
    print(f"completed /compare calls: {len(latencies)} ({len(latencies) / elapsed * 60:.1f} per minute)")
    if latencies:
        print(
            "latency s: "
            f"p50 {percentile(latencies, 0.5):.2f} · p90 {percentile(latencies, 0.9):.2f} · "
            f"p99 {percentile(latencies, 0.99):.2f} · mean {statistics.fmean(latencies):.2f} · max {max(latencies):.2f}"
        )
    print(f"errors: {sum(errors.values())}")
    for message, count in errors.most_common():
        print(f"  {count} × {message}")


if __name__ == "__main__":
    main()
