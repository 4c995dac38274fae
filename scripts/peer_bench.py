"""The same streamed chat request sent, interleaved, to several OpenAI-compatible servers: TTFT and throughput.

    python scripts/peer_bench.py \\
        --target vllm=http://127.0.0.1:8100/v1 \\
        --target baseline=http://127.0.0.1:8000/v1@baseline \\
        --target vtw=http://127.0.0.1:8000/v1@vtw:5 \\
        --repeats 21 --clients 1 4 8

A target is NAME=BASE_URL, optionally @METHOD: the method goes in the request's `vtw` extension field (our
server's per-request method); without it the request is plain OpenAI, so any server (vLLM, TGI, ours) takes it.
Every server gets the same request (one bundled image as a data URL, one question, greedy, `max_tokens`), after
`--warmup` untimed ones. Time to first token is measured from sending the request to the first streamed chunk
that carries text, in rounds that visit the targets in turn (A B C, then B C A, ...), so a slow spell on a
shared machine hits every target alike; each target's ratio to the first target is taken pair by pair (same
round) and given as median [min-max]. The answers must agree, or the table says which differ. Then, for each
client count, a closed loop (each client sends its next request as soon as the last one ends) runs
`--seconds` per target in turn, `--rounds` times: requests/s, median of the rounds.

`--gap` seconds pass before every timed request and every closed-loop run. Some servers keep a core busy after a
reply: vLLM's CPU worker spins for about 0.4 s after each one. With the servers sharing cores, a request sent
during another server's spin would be timed against that spin; the default gap (1 s) lets it end first.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the bundled examples of this checkout; no vtw_core import needed

DEFAULT_IMAGE = ROOT / "assets" / "examples" / "easyvqa-0.png"
DEFAULT_QUESTION = "What shape is in the image?"


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    method: str | None
    model: str


def parse_target(spec: str) -> tuple[str, str, str | None]:
    """NAME=URL[@METHOD] -> (name, url, method)."""
    name, separator, rest = spec.partition("=")
    if not separator or not name or not rest.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"a target is NAME=http(s)://HOST:PORT/v1[@METHOD], not {spec!r}")
    url, _, method = rest.partition("@")
    return name, url.rstrip("/"), method or None


def request_body(target: Target, image_url: str, question: str, max_tokens: int, stream: bool) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
    body = {"model": target.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip
    if target.method:
        body["vtw"] = {"method": target.method}
    return body


def streamed(client: httpx.Client, target: Target, body: dict, headers: dict) -> tuple[float, str]:
    """(seconds to the first chunk with text, the whole answer) of one streamed request."""
    import json

    start = time.perf_counter()
    first, text = None, []
    with client.stream("POST", f"{target.base_url}/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{target.name}: HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    if first is None:
                        first = time.perf_counter() - start
                    text.append(piece)
    if first is None:
        raise RuntimeError(f"{target.name}: the stream carried no text")
    return first, "".join(text)


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    return (f"{statistics.median(values) * scale:.{digits}f} "
            f"[{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}]")  # fmt: skip


def model_id(client: httpx.Client, base_url: str, headers: dict) -> str:
    response = client.get(f"{base_url}/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def closed_loop(target: Target, body: dict, headers: dict, clients: int, seconds: float) -> tuple[float, list[int]]:
    """Requests completed per second by `clients` clients sending back to back for `seconds`, and the rows of the
    engine call that answered each (our server's `usage.vtw.batch_size`; empty for other servers)."""
    done = [0] * clients
    rows: list[int] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def client_loop(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            while time.perf_counter() < deadline:
                response = client.post(f"{target.base_url}/chat/completions", json=body, headers=headers)
                if response.status_code != 200:
                    errors.append(f"HTTP {response.status_code}")
                    return
                if time.perf_counter() <= deadline:
                    done[index] += 1
                    batch_size = ((response.json().get("usage") or {}).get("vtw") or {}).get("batch_size")
                    if isinstance(batch_size, int):
                        rows.append(batch_size)

    threads = [threading.Thread(target=client_loop, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{target.name}: {errors[0]}")
    return sum(done) / seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--target", action="append", required=True, type=parse_target,
                        help="NAME=BASE_URL[@METHOD], e.g. vtw=http://127.0.0.1:8000/v1@vtw:5; the first is the "
                             "reference of the ratios")  # fmt: skip
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="an image file (default: easyvqa-0.png)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds of the TTFT table")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per target first")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8],
                        help="client counts of the throughput table (none: skip it)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one closed-loop run")
    parser.add_argument("--rounds", type=int, default=3, help="closed-loop runs per target and client count")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds of quiet before each timed request and each closed-loop run")  # fmt: skip
    parser.add_argument("--api-key", default=os.environ.get("VTW_API_KEY"), help="sent as a Bearer token")
    args = parser.parse_args()
    if len({name for name, _, _ in args.target}) != len(args.target):
        parser.error("target names must differ")
    if args.repeats < 1 or args.warmup < 0 or args.max_tokens < 1 or any(c < 1 for c in args.clients):
        parser.error("--repeats, --max-tokens and --clients must be >= 1, --warmup >= 0")
    if not args.gap >= 0:
        parser.error("--gap must be >= 0 seconds")

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    image_url = "data:image/png;base64," + base64.b64encode(args.image.read_bytes()).decode()
    with httpx.Client(timeout=600) as client:
        targets = [Target(name, url, method, model_id(client, url, headers)) for name, url, method in args.target]
        bodies = {t.name: request_body(t, image_url, args.question, args.max_tokens, True) for t in targets}
        answers: dict[str, str] = {}
        for target in targets:
            for _ in range(args.warmup):
                streamed(client, target, bodies[target.name], headers)
        ttft: dict[str, list[float]] = {t.name: [] for t in targets}
        for round_index in range(args.repeats):
            shift = round_index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                time.sleep(args.gap)
                seconds, text = streamed(client, target, bodies[target.name], headers)
                ttft[target.name].append(seconds)
                answers.setdefault(target.name, text)

    reference = targets[0].name
    print(f"{args.image.name}, {args.question!r}, max_tokens {args.max_tokens}, greedy; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    print(
        f"time to first token: median [min-max] of {args.repeats} interleaved rounds after {args.warmup} "
        f"untimed requests per target, {args.gap:g} s apart; ratios paired by round"
    )
    print(f"| target | model | method | TTFT ms | vs {reference} | answer |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        ratios = [a / b for a, b in zip(ttft[target.name], ttft[reference], strict=True)]
        method = target.method or "(server default)"
        print(f"| {target.name} | {target.model} | {method} | {spread(ttft[target.name], 1000)} | "
              f"{spread(ratios, digits=2)} | {answers[target.name]!r} |")  # fmt: skip
    # Detokenizers differ on the leading space of a reply ("Triangle." / " Triangle."): compare the words.
    differing = [name for name, text in answers.items() if text.strip() != answers[reference].strip()]
    print("answers: all equal (leading and trailing spaces aside)" if not differing
          else f"answers differ from {reference}'s: {', '.join(differing)}")  # fmt: skip

    if not args.clients:
        return
    plain = {t.name: request_body(t, image_url, args.question, args.max_tokens, False) for t in targets}
    print(
        f"\nclosed loop: requests/s, median [min-max] of {args.rounds} runs of {args.seconds:g} s per target, "
        "targets in turn"
    )
    print("| target | " + " | ".join(f"{c} client{'s' * (c > 1)}" for c in args.clients) + " |")
    print("|---|" + "---|" * len(args.clients))
    rates: dict[str, dict[int, list[float]]] = {t.name: {c: [] for c in args.clients} for t in targets}
    rows: dict[str, dict[int, list[int]]] = {t.name: {c: [] for c in args.clients} for t in targets}
    for clients in args.clients:
        for _ in range(args.rounds):
            for target in targets:
                time.sleep(args.gap)
                rate, sizes = closed_loop(target, plain[target.name], headers, clients, args.seconds)
                rates[target.name][clients].append(rate)
                rows[target.name][clients].extend(sizes)
    for target in targets:
        cells = [spread(rates[target.name][c], digits=2) for c in args.clients]
        print(f"| {target.name} | " + " | ".join(cells) + " |")
    batched = [(t.name, c, rows[t.name][c]) for t in targets for c in args.clients if c > 1 and rows[t.name][c]]
    if batched:
        print(
            "rows per engine call, mean over the replies (our server's usage.vtw.batch_size): "
            + "; ".join(f"{name} at {c} clients {sum(sizes) / len(sizes):.1f}" for name, c, sizes in batched)
        )


if __name__ == "__main__":
    main()
