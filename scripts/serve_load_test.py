"""Load test of the OpenAI-compatible server: requests/s and latency percentiles under N concurrent clients.

Against a running server:
    python scripts/serve_load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 48

Or let the script start the server on 127.0.0.1, measure, and stop it:
    python scripts/serve_load_test.py --start local --max-batch-size 1 --clients 8     # one process, unbatched
    python scripts/serve_load_test.py --start local --max-batch-size 8 --clients 8     # batched
    python scripts/serve_load_test.py --start ray --replicas 2 --clients 8             # Ray Serve, 2 replicas

Every client sends greedy questions about the bundled easy-vqa examples, one after the other, until the
request budget or the time limit is spent. The table gives throughput, p50/p99 latency, the mean batch size
the server reports in `usage.vtw.batch_size`, and how many replicas answered.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # vtw_core from this checkout, installed or not

from vtw_core.serve.readiness import ServerNotReady, wait_until_ready  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"
QUESTIONS = [
    ("easyvqa-0.png", "what is the red shape?"),
    ("easyvqa-1.png", "what is the color of the rectangle?"),
    ("easyvqa-2.png", "is there a rectangle?"),
    ("easyvqa-0.png", "is there a circle in the image?"),
]


def body(index: int, method: str, max_tokens: int) -> dict:
    image, text = QUESTIONS[index % len(QUESTIONS)]
    url = "data:image/png;base64," + base64.b64encode((EXAMPLES / image).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "vtw": {"method": method}}  # fmt: skip


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_load(url: str, clients: int, requests: int, duration: float, method: str, max_tokens: int) -> dict:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    replicas: set[str] = set()
    errors: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                start = time.perf_counter()
                try:
                    response = http.post("/v1/chat/completions", json=body(index, method, max_tokens))
                    elapsed = time.perf_counter() - start
                    payload = response.json()
                except (httpx.HTTPError, ValueError) as error:
                    with lock:
                        errors.append(type(error).__name__)
                    continue
                with lock:
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {payload.get('error', {}).get('code')}")
                        continue
                    latencies.append(elapsed)
                    batch_sizes.append(payload["usage"]["vtw"]["batch_size"])
                    replicas.add(response.headers.get("x-vtw-replica", "single"))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "ok": len(latencies),
        "errors": len(errors),
        "wall_s": wall,
        "rps": len(latencies) / wall if wall else 0.0,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_s": percentile(latencies, 0.99) if latencies else float("nan"),
        "mean_batch": statistics.mean(batch_sizes) if batch_sizes else float("nan"),
        "replicas": len(replicas),
        "error_kinds": sorted(set(errors)),
    }


def start_server(args: argparse.Namespace, port: int) -> tuple[subprocess.Popen, Path | None]:
    """`python -m vtw_core serve` or `serve run <config>` on 127.0.0.1, as docs/serving.md documents them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.start == "local":
        command = [sys.executable, "-m", "vtw_core", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--max-batch-size", str(args.max_batch_size),
                   "--batch-wait-ms", str(args.batch_wait_ms)]  # fmt: skip
        if args.model:
            command += ["--model", args.model]
        return subprocess.Popen(command, cwd=ROOT, env=env), None
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    application = config["applications"][0]
    application["args"].update({"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                                "model": args.model})  # fmt: skip
    application["deployments"][0]["num_replicas"] = args.replicas
    path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    path.write_text(yaml.safe_dump(config))
    # One machine: keep Ray's own traffic on the loopback address and send no usage reports.
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    serve = Path(sys.executable).parent / "serve"
    return subprocess.Popen([str(serve), "run", str(path)], cwd=ROOT, env=env), path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: the one --start launches)")
    parser.add_argument("--start", choices=["none", "local", "ray"], default="none")
    parser.add_argument("--model", help="for --start: hub id or folder (default: the embedded default model)")
    parser.add_argument("--replicas", type=int, default=1, help="--start ray: number of replicas")
    parser.add_argument("--max-batch-size", type=int, default=8, help="--start: requests per engine call")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=8765, help="--start: port on 127.0.0.1")
    parser.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent clients (one row each)")
    parser.add_argument("--requests", type=int, default=48, help="requests per row")
    parser.add_argument("--duration", type=float, default=120, help="time limit per row, seconds")
    parser.add_argument("--method", default="vtw:9")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.start == "none" and not args.url:
        parser.error("pass --url, or --start local|ray")
    process, config = (None, None)
    url = args.url or f"http://127.0.0.1:{args.port}"
    try:
        if args.start != "none":
            process, config = start_server(args, args.port)
            try:
                wait_until_ready(url, process, timeout_s=300)
            except ServerNotReady as error:
                raise SystemExit(str(error)) from None
        run_load(url, 1, 2, 60, args.method, args.max_tokens)  # warm-up: first-call costs are not load
        setup = f"{args.start} server" + (f", {args.replicas} replica(s)" if args.start == "ray" else "")
        print(f"{url} ({setup}, max batch {args.max_batch_size}), method {args.method}, "
              f"{args.max_tokens} max tokens, greedy")  # fmt: skip
        print("| clients | ok | errors | wall s | req/s | p50 s | p99 s | mean batch | replicas |")
        print("|---|---|---|---|---|---|---|---|---|")
        for clients in args.clients:
            row = run_load(url, clients, args.requests, args.duration, args.method, args.max_tokens)
            print(f"| {row['clients']} | {row['ok']} | {row['errors']} | {row['wall_s']:.1f} | {row['rps']:.2f} "
                  f"| {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['mean_batch']:.2f} | {row['replicas']} |",
                  flush=True)  # fmt: skip
            if row["error_kinds"]:
                print(f"  errors: {', '.join(row['error_kinds'])}")
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)  # Ctrl-C: `serve run` then shuts Serve and its Ray cluster down
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if config is not None:
            config.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
