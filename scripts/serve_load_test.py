"""Load test of the OpenAI-compatible server: requests/s and latency percentiles under N concurrent clients, and
what clients see when a model replica or a node dies under that load.

Against a running server:
    python scripts/serve_load_test.py --url http://127.0.0.1:8000 --clients 8 --requests 48

Or let the script start the server on 127.0.0.1, measure, and stop it:
    python scripts/serve_load_test.py --start local --max-batch-size 1 --clients 8     # one process, unbatched
    python scripts/serve_load_test.py --start local --max-batch-size 8 --clients 8     # batched
    python scripts/serve_load_test.py --start ray --replicas 2 --clients 8             # Ray Serve, 2 replicas

Failover (Ray only): kill -9 one model replica, or a whole node, a few seconds into the first row:
    python scripts/serve_load_test.py --start ray --replicas 2 --clients 8 --requests 400 --kill replica
    python scripts/serve_load_test.py --start ray-2node --clients 8 --requests 400 --kill node

`--start ray` runs `serve run` on a copy of serve_config.yaml in a new local cluster (RAY_ADDRESS=local, a
private Ray temp folder). `--start ray-2node` simulates two machines on this one with Ray's own multi-node test
utility: a head node (the ingress, Serve's proxy and one model replica) and a worker node (the other replica),
custom node resources placing one replica on each; `--kill node` kills every process of the worker node with
SIGKILL, and a fresh node joins at once (the machine's replacement), where Serve starts the lost replica again.

Every client sends greedy questions about the bundled easy-vqa examples, one after the other, until the
request budget or the time limit is spent. The table gives throughput, p50/p99 latency, the mean batch size
the server reports in `usage.vtw.batch_size`, and how many replicas answered. With --kill, a line follows:
the 5xx answers, the other failures, the re-runs the ingress reports (`x-vtw-retries`), the requests in flight
at the kill and the longest of them, and the seconds until a new replica answered.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

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
# One machine: Ray's own ports on the loopback address, no usage reports.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def body(index: int, method: str, max_tokens: int) -> dict:
    image, text = QUESTIONS[index % len(QUESTIONS)]
    url = "data:image/png;base64," + base64.b64encode((EXAMPLES / image).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "vtw": {"method": method}}  # fmt: skip


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def run_load(url: str, clients: int, requests: int, duration: float, method: str, max_tokens: int,
             headers: dict[str, str] | None = None,
             kill: tuple[float, Callable[[], str]] | None = None) -> dict:  # fmt: skip
    """One row. `kill`: (seconds into the row, a function that kills something and says what)."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    replicas: set[str] = set()
    errors: list[str] = []
    answers: list[tuple[float, float, str, int, int]] = []  # (start, end, replica, status, re-runs)
    counter = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + duration
    killed: dict[str, Any] = {}

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120, headers=headers) as http:
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
                        answers.append((start, time.perf_counter(), "", 0, 0))
                    continue
                replica = response.headers.get("x-vtw-replica", "single")
                with lock:
                    answers.append((start, start + elapsed, replica, response.status_code,
                                    int(response.headers.get("x-vtw-retries", 0))))  # fmt: skip
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {payload.get('error', {}).get('code')}")
                        continue
                    latencies.append(elapsed)
                    batch_sizes.append(payload["usage"]["vtw"]["batch_size"])
                    replicas.add(replica)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if kill is not None:  # in this (the main) thread: Ray starts a node from the main thread only
        after, act = kill
        time.sleep(after)
        with lock:
            killed["before"] = set(replicas)
        killed["at"] = time.perf_counter()
        killed["what"] = act()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    row = {
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
        "answers": answers,
    }
    if killed:
        row["kill"] = killed
    return row


def failover_report(row: dict, url: str, method: str, max_tokens: int, headers: dict[str, str] | None) -> str:
    """The failover figures of a row with a kill; waits (up to 120 s) for a new replica to answer if none has."""
    kill = row["kill"]
    at, before = kill["at"], kill["before"]
    answers = row["answers"]
    in_flight = [end - start for start, end, _, _, _ in answers if start <= at <= end]
    server_errors = sum(1 for *_, status, _ in answers if status >= 500)
    other_failures = sum(1 for *_, status, _ in answers if status == 0 or 400 <= status < 500)
    reruns = sum(reruns for *_, reruns in answers)
    new = [end for _, end, replica, status, _ in answers if status == 200 and end > at and replica not in before]
    if new:
        recovered = min(new) - at
    else:  # the row ended first: ask until a replica that was not there before the kill answers
        recovered = float("nan")
        with httpx.Client(base_url=url, timeout=60, headers=headers) as http:
            while time.perf_counter() - at < 120:
                try:
                    response = http.post("/v1/chat/completions", json=body(0, method, max_tokens))
                except httpx.HTTPError:
                    continue
                if response.status_code == 200 and response.headers.get("x-vtw-replica") not in before:
                    recovered = time.perf_counter() - at
                    break
                time.sleep(0.5)
    longest = max(in_flight, default=float("nan"))
    return (f"  {kill['what']}: 5xx {server_errors}, other failures {other_failures}, re-runs {reruns}, "
            f"{len(in_flight)} in flight at the kill (longest {longest:.2f} s), "
            f"a new replica answered {recovered:.1f} s after the kill")  # fmt: skip


def private_ray_tmpdir() -> str:
    """A Ray temp folder of our own: no cluster recorded in the machine's `ray_current_cluster` is joined, and
    ours is recorded nowhere else. Short, since Ray's socket paths live under it."""
    folder = tempfile.mkdtemp(prefix="vtwray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = folder
    return folder


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
    for deployment in application["deployments"]:
        if deployment["name"] == "VTWServer":
            deployment["num_replicas"] = args.replicas
    path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    path.write_text(yaml.safe_dump(config))
    env.update(RAY_ENV, RAY_ADDRESS="local")  # a new cluster of our own, whatever this machine runs
    serve = Path(sys.executable).parent / "serve"
    return subprocess.Popen([str(serve), "run", str(path)], cwd=ROOT, env=env), path


def kill_a_replica(root_pid: int) -> Callable[[], str]:
    """kill -9 of one model replica process among `root_pid`'s descendants (Ray names them by deployment)."""
    import psutil

    def act() -> str:
        for process in psutil.Process(root_pid).children(recursive=True):
            try:
                if "ServeReplica:vtw:VTWServer" in " ".join(process.cmdline()):
                    os.kill(process.pid, signal.SIGKILL)
                    return f"kill -9 of model replica pid {process.pid}"
            except psutil.Error:
                continue
        return "no model replica found to kill"

    return act


class TwoNodes:
    """A simulated two-machine Ray cluster in this process: head (ingress, proxy, a replica) and a worker node."""

    NODE: ClassVar[dict[str, Any]] = {"node_ip_address": "127.0.0.1", "object_store_memory": 100 * 2**20,
                                      "num_cpus": 1}  # fmt: skip

    def __init__(self, args: argparse.Namespace, port: int):
        os.environ.update(RAY_ENV)
        self.folder = private_ray_tmpdir()
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from vtw_core.serve.ray_app import VTWIngress, VTWServer

        self.cluster = Cluster(initialize_head=True, head_node_args={
            **self.NODE, "include_dashboard": False, "resources": {"vtw_head": 1, "vtw_model_slot": 1},
            "temp_dir": os.path.join(self.folder, "ray")})  # fmt: skip
        self.worker = self.cluster.add_node(**self.NODE, resources={"vtw_model_slot": 1})
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})  # fmt: skip
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        model = VTWServer.options(num_replicas=2, ray_actor_options={"num_cpus": 1,
                                                                     "resources": {"vtw_model_slot": 1}})  # fmt: skip
        ingress = VTWIngress.options(ray_actor_options={"num_cpus": 0, "resources": {"vtw_head": 1}})
        replica_args = {"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms}
        if args.model:
            replica_args["model"] = args.model
        serve.run(ingress.bind(model.bind(**replica_args)), name="vtw", route_prefix="/")

    def kill_node(self) -> str:
        self.cluster.remove_node(self.worker, allow_graceful=False)  # SIGKILL of the node's processes
        self.worker = self.cluster.add_node(**self.NODE, resources={"vtw_model_slot": 1})  # its replacement
        return "SIGKILL of the worker node (a new node joined at once)"

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self.cluster.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: the one --start launches)")
    parser.add_argument("--start", choices=["none", "local", "ray", "ray-2node"], default="none")
    parser.add_argument("--model", help="for --start: hub id or folder (default: the embedded default model)")
    parser.add_argument("--replicas", type=int, default=1, help="--start ray: number of model replicas")
    parser.add_argument("--max-batch-size", type=int, default=8, help="--start: requests per engine call")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=8765, help="--start: port on 127.0.0.1")
    parser.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent clients (one row each)")
    parser.add_argument("--requests", type=int, default=48, help="requests per row")
    parser.add_argument("--duration", type=float, default=120, help="time limit per row, seconds")
    parser.add_argument("--method", default="vtw:9")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--api-key", default=os.environ.get("VTW_API_KEY"), help="Bearer key (default: $VTW_API_KEY)")
    parser.add_argument("--kill", choices=["replica", "node"],
                        help="kill -9 a model replica (--start ray), or the worker node (ray-2node)")  # fmt: skip
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds into the first row")
    args = parser.parse_args()
    if args.start == "none" and not args.url:
        parser.error("pass --url, or --start local|ray|ray-2node")
    if args.kill and args.start not in ("ray", "ray-2node"):
        parser.error("--kill needs --start ray or --start ray-2node (the script must own the processes)")
    if args.kill == "node" and args.start != "ray-2node":
        parser.error("--kill node needs --start ray-2node")
    process, config, nodes, ray_tmp = None, None, None, None
    url = args.url or f"http://127.0.0.1:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        if args.start == "ray-2node":
            nodes = TwoNodes(args, args.port)
        elif args.start != "none":
            if args.start == "ray":
                ray_tmp = private_ray_tmpdir()
            process, config = start_server(args, args.port)
            try:
                wait_until_ready(url, process, timeout_s=300)
            except ServerNotReady as error:
                raise SystemExit(str(error)) from None
        run_load(url, 1, 2, 60, args.method, args.max_tokens, headers)  # warm-up: first-call costs are not load
        replicas = 2 if args.start == "ray-2node" else args.replicas
        setup = f"{args.start} server" + (f", {replicas} replica(s)" if args.start.startswith("ray") else "")
        print(f"{url} ({setup}, max batch {args.max_batch_size}), method {args.method}, "
              f"{args.max_tokens} max tokens, greedy")  # fmt: skip
        print("| clients | ok | errors | wall s | req/s | p50 s | p99 s | mean batch | replicas |")
        print("|---|---|---|---|---|---|---|---|---|")
        for number, clients in enumerate(args.clients):
            kill = None
            if args.kill and number == 0:
                owner = process.pid if process is not None else os.getpid()
                act = nodes.kill_node if args.kill == "node" else kill_a_replica(owner)
                kill = (args.kill_after, act)
            row = run_load(url, clients, args.requests, args.duration, args.method, args.max_tokens, headers, kill)
            print(f"| {row['clients']} | {row['ok']} | {row['errors']} | {row['wall_s']:.1f} | {row['rps']:.2f} "
                  f"| {row['p50_s']:.2f} | {row['p99_s']:.2f} | {row['mean_batch']:.2f} | {row['replicas']} |",
                  flush=True)  # fmt: skip
            if row["error_kinds"]:
                print(f"  errors: {', '.join(row['error_kinds'])}")
            if "kill" in row:
                print(failover_report(row, url, args.method, args.max_tokens, headers), flush=True)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)  # Ctrl-C: `serve run` then shuts Serve and its Ray cluster down
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if config is not None:
            config.unlink()
        if nodes is not None:
            nodes.close()
        if ray_tmp is not None:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
