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

The client is lean on purpose: each client thread keeps one keep-alive connection of the standard library's
`http.client`, and every request body is encoded to bytes once. On a machine whose cores the servers share, a
heavier client (httpx took ~2.4 ms of CPU per request here, the stdlib one ~0.5) competes with the server it
measures and caps the faster server's closed loop most; the table prints the client's CPU per request.

`--gap` seconds pass before every timed request and every closed-loop run. Some servers keep a core busy after a
reply: vLLM's CPU worker spins for about 0.4 s after each one. With the servers sharing cores, a request sent
during another server's spin would be timed against that spin; the default gap (1 s) lets it end first.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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


def request_body(target: Target, image_url: str, question: str, max_tokens: int, stream: bool) -> bytes:
    """The request as the JSON bytes sent every time (encoded once)."""
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]
    body = {"model": target.model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}  # fmt: skip
    if target.method:
        body["vtw"] = {"method": target.method}
    return json.dumps(body).encode()


class Connection:
    """One keep-alive HTTP(S) connection to a server (the standard library's client: little CPU per request)."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float = 600.0):
        parts = urlsplit(base_url)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.connection = kind(parts.hostname, parts.port, timeout=timeout)
        self.path = parts.path.rstrip("/")
        self.headers = {"Content-Type": "application/json", **headers}

    def request(self, method: str, route: str, body: bytes | None = None) -> http.client.HTTPResponse:
        """Send and return the response (its body not read yet); one reconnect if the server closed the
        connection between requests."""
        try:
            return self._send(method, route, body)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            self.connection.close()  # it reconnects at the next request
            return self._send(method, route, body)

    def _send(self, method: str, route: str, body: bytes | None) -> http.client.HTTPResponse:
        self.connection.request(method, self.path + route, body=body, headers=self.headers)
        return self.connection.getresponse()

    def json(self, method: str, route: str, body: bytes | None = None) -> dict:
        response = self.request(method, route, body)
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {route}: HTTP {response.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data)

    def close(self) -> None:
        self.connection.close()


def streamed(connection: Connection, target: Target, body: bytes) -> tuple[float, str]:
    """(seconds to the first chunk with text, the whole answer) of one streamed request."""
    start = time.perf_counter()
    first, text = None, []
    response = connection.request("POST", "/chat/completions", body)
    if response.status != 200:
        raise RuntimeError(f"{target.name}: HTTP {response.status}: {response.read()[:300].decode(errors='replace')}")
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
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


def model_id(connection: Connection) -> str:
    return connection.json("GET", "/models")["data"][0]["id"]


def closed_loop(
    target: Target, body: bytes, headers: dict, clients: int, seconds: float
) -> tuple[float, list[int], float]:
    """Requests completed per second by `clients` clients sending back to back for `seconds`, the rows of the
    engine call that answered each (our server's `usage.vtw.batch_size`; empty for other servers), and this
    process's CPU seconds per completed request (the client's own cost)."""
    done = [0] * clients
    rows: list[int] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def client_loop(index: int) -> None:
        connection = Connection(target.base_url, headers)
        try:
            while time.perf_counter() < deadline:
                reply = connection.json("POST", "/chat/completions", body)
                if time.perf_counter() <= deadline:
                    done[index] += 1
                    batch_size = ((reply.get("usage") or {}).get("vtw") or {}).get("batch_size")
                    if isinstance(batch_size, int):
                        rows.append(batch_size)
        except Exception as error:  # reported once the threads are joined
            errors.append(str(error))
        finally:
            connection.close()

    cpu = time.process_time()
    threads = [threading.Thread(target=client_loop, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu
    if errors:
        raise RuntimeError(f"{target.name}: {errors[0]}")
    return sum(done) / seconds, rows, cpu / max(1, sum(done))


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
    connections = {name: Connection(url, headers) for name, url, _ in args.target}
    try:
        targets = [Target(name, url, method, model_id(connections[name])) for name, url, method in args.target]
        bodies = {t.name: request_body(t, image_url, args.question, args.max_tokens, True) for t in targets}
        answers: dict[str, str] = {}
        for target in targets:
            for _ in range(args.warmup):
                streamed(connections[target.name], target, bodies[target.name])
        ttft: dict[str, list[float]] = {t.name: [] for t in targets}
        for round_index in range(args.repeats):
            shift = round_index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                time.sleep(args.gap)
                seconds, text = streamed(connections[target.name], target, bodies[target.name])
                ttft[target.name].append(seconds)
                answers.setdefault(target.name, text)
    finally:
        for connection in connections.values():
            connection.close()

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
    client_cpu: list[float] = []
    for clients in args.clients:
        for _ in range(args.rounds):
            for target in targets:
                time.sleep(args.gap)
                rate, sizes, cpu = closed_loop(target, plain[target.name], headers, clients, args.seconds)
                rates[target.name][clients].append(rate)
                rows[target.name][clients].extend(sizes)
                client_cpu.append(cpu)
    for target in targets:
        cells = [spread(rates[target.name][c], digits=2) for c in args.clients]
        print(f"| {target.name} | " + " | ".join(cells) + " |")
    print(f"this client's CPU per request: {spread(client_cpu, 1000, 2)} ms")
    batched = [(t.name, c, rows[t.name][c]) for t in targets for c in args.clients if c > 1 and rows[t.name][c]]
    if batched:
        print(
            "rows per engine call, mean over the replies (our server's usage.vtw.batch_size): "
            + "; ".join(f"{name} at {c} clients {sum(sizes) / len(sizes):.1f}" for name, c, sizes in batched)
        )


if __name__ == "__main__":
    main()
