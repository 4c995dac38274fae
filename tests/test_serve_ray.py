"""The server as a Ray Serve application: a private local Ray cluster, an ingress and two model replicas.

The cluster is the test's own whatever the machine holds: `address="local"` starts a new one (never a cluster
found through RAY_ADDRESS or the `ray_current_cluster` file of an earlier `ray start`), in a private temp folder
where the fixture leaves a stale `ray_current_cluster` on purpose. Its node lives on 127.0.0.1 only. The last
test kills a model replica with SIGKILL while requests are in flight.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml
from conftest import free_port
from PIL import Image

from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.defaults import require_model
from vtw_core.models.prompts import user_message

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
QUESTIONS = [
    ("easyvqa-0.png", "what is the red shape?", "vtw:9"),
    ("easyvqa-1.png", "what is the color of the rectangle?", "baseline"),
    ("easyvqa-2.png", "is there a rectangle?", "vtw:9"),
    ("easyvqa-0.png", "what color is the shape?", "vtw:6"),
]
TOKENS = 10
# Before Ray is first imported (it reads them then): a cluster on 127.0.0.1 only, not on the machine's network
# address, and no usage reports.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def load_config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def test_the_request_limits_reach_the_replicas_and_the_ingress_body_limit():
    from vtw_core.serve.limits import DEFAULT_LIMITS
    from vtw_core.serve.ray_app import build

    application = build({"max_image_mb": 2, "max_images_per_request": 1, "max_pixels_per_request": 1_000_000,
                         "threads": 1})  # fmt: skip
    ingress = application._bound_deployment  # VTWIngress.bind(VTWServer.bind(**replica), **ingress)
    ingress_kwargs, replica_kwargs = ingress.init_kwargs, ingress.init_args[0]._bound_deployment.init_kwargs
    limits = replica_kwargs["limits"]
    assert (limits.max_images, limits.max_image_bytes, limits.max_pixels) == (1, 2 * 2**20, 1_000_000)
    assert ingress_kwargs["max_request_bytes"] == limits.max_request_bytes < DEFAULT_LIMITS.max_request_bytes
    assert replica_kwargs["threads"] == 1


def test_the_shipped_config_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from vtw_core.serve.ray_app import build

    config = ServeDeploySchema.model_validate(load_config())
    application = config.applications[0]
    assert application.import_path == "vtw_core.serve.ray_app:build"
    assert {deployment.name for deployment in application.deployments} == {"VTWIngress", "VTWServer"}
    assert build(application.args) is not None  # the builder takes the config's arguments
    assert build({**application.args, "api_key": "k", "docs": "true", "max_attempts": 2}) is not None
    with pytest.raises(ValueError, match="unknown arguments"):
        build({"modle": "x"})
    with pytest.raises(ValueError, match="max_attempts"):
        build({"max_attempts": 0})


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def ray_temp():
    """Ray's temp folder for this module, with a stale `ray_current_cluster` (an address nobody listens on)."""
    from ray._common.utils import get_ray_address_file

    folder = tempfile.mkdtemp(prefix="vtwray", dir="/tmp")  # short: Ray's socket paths live under it
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder  # the folder Ray reads when it looks for "the" cluster of this machine
    stale = Path(get_ray_address_file(None))
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text(f"127.0.0.1:{free_port()}")
    try:
        yield {"folder": folder, "ray_dir": str(stale.parent), "stale_file": stale}
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_url(ray_temp):
    """A new local Ray cluster on 127.0.0.1 (whatever RAY_ADDRESS or a `ray_current_cluster` file say), Serve's
    proxy on a free local port, the app with two model replicas."""
    import ray
    from ray import serve

    from vtw_core.serve.ray_app import build

    port = free_port()
    ray.init(address="local", num_cpus=3, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, _temp_dir=ray_temp["ray_dir"],
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                                       "OMP_NUM_THREADS": "1"}})  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {**load_config()["applications"][0]["args"], "num_replicas": 2, "num_cpus": 1}
        serve.run(build(args), name="vtw", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager.load(require_model(None), device="cpu")


def test_a_stale_cluster_file_does_not_capture_the_tests(ray_temp, ray_url):
    import ray

    stale = ray_temp["stale_file"]
    assert stale.exists(), "the stale file must still be there for this check to mean anything"
    assert ray.get_runtime_context().gcs_address != stale.read_text()
    # The naive call reads that file, takes the dead address for a running cluster, and fails at once.
    naive = "import ray; ray.init(num_cpus=1)"
    env = {**os.environ, "RAY_TMPDIR": ray_temp["folder"]}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", naive], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "When connecting to an existing cluster" in result.stderr


def test_two_replicas_answer_concurrent_questions_without_cross_talk(ray_url, manager):
    from ray import serve

    deployments = serve.status().applications["vtw"].deployments
    assert deployments["VTWServer"].replica_states == {"RUNNING": 2}
    assert deployments["VTWIngress"].replica_states == {"RUNNING": 1}
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(item: tuple[str, str, str]):
        image, text, method = item
        content = [{"type": "image_url", "image_url": {"url": data_url(EXAMPLES / image)}},
                   {"type": "text", "text": text}]  # fmt: skip
        return client.chat.completions.with_raw_response.create(
            model="default-model", messages=[{"role": "user", "content": content}], max_tokens=TOKENS,
            temperature=0, extra_body={"vtw": {"method": method, "return_token_ids": True}},
        )  # fmt: skip

    requests = QUESTIONS * 2
    with ThreadPoolExecutor(len(requests)) as pool:
        raw = list(pool.map(ask, requests))
    replicas = {response.headers["x-vtw-replica"] for response in raw}
    assert 1 <= len(replicas) <= 2
    for (image, text, method), response in zip(requests, raw, strict=True):
        reply = response.parse()
        k = None if method == "baseline" else int(method.split(":")[1])
        expected = manager.generate([user_message(text)], [Image.open(EXAMPLES / image)], k=k,
                                    sampling=SamplingConfig(TOKENS))  # fmt: skip
        assert reply.choices[0].model_extra["token_ids"] == expected.token_ids
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.model_extra["vtw"]["k"] == k


def test_errors_keep_the_openai_format_through_ray(ray_url):
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="default-model", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"vtw": {"method": "vtw:999"}})  # fmt: skip
    assert caught.value.body["param"] == "vtw.method"
    assert [model.id for model in client.models.list().data] == ["default-model"]
    assert httpx.get(f"{ray_url}/docs").status_code == 404  # docs are off unless `docs: true`
    assert httpx.get(f"{ray_url}/health").json() == {"status": "ok"}


def test_the_app_can_run_against_the_deployment(ray_url, manager):
    """`python app.py --backend-url`: the app's manager stand-in gets the in-process answer from the replicas."""
    from app.remote import RemoteManager

    remote = RemoteManager(ray_url)
    image, text, _ = QUESTIONS[0]
    conversation = [user_message(text)]
    got = remote.generate(conversation, [Image.open(EXAMPLES / image)], k=9, sampling=SamplingConfig(TOKENS))
    expected = manager.generate(conversation, [Image.open(EXAMPLES / image)], k=9, sampling=SamplingConfig(TOKENS))
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.stats.prefill_flops == expected.stats.prefill_flops and got.stats.k == 9


def listening_sockets() -> dict[int, list[tuple[str, int]]]:
    """{pid: [(address, port)]} of the TCP ports this test's Ray processes listen on (all its descendants)."""
    ours = {process.pid: process for process in psutil.Process().children(recursive=True)}
    found: dict[int, list[tuple[str, int]]] = {}
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.pid in ours:
            found.setdefault(connection.pid, []).append((connection.laddr.ip, connection.laddr.port))
    return found


def test_every_port_of_the_cluster_is_on_the_loopback_address(ray_url):
    """GCS, raylet, workers, dashboard agent, Serve's proxy and the replicas' own gRPC ports: none on the network."""
    sockets = listening_sockets()
    everything = [(pid, address, port) for pid, pairs in sockets.items() for address, port in pairs]
    assert len(everything) >= 10, everything
    assert [entry for entry in everything if entry[1] not in LOOPBACK] == []
    replicas = [pid for pid in sockets if "ServeReplica" in " ".join(psutil.Process(pid).cmdline())]
    assert len(replicas) == 3  # the ingress and the two model replicas, each with its two gRPC ports
    assert all(len(sockets[pid]) >= 2 for pid in replicas)


def replica_pids() -> dict[str, int]:
    """{replica id: pid} of the model replicas (asked through a handle until both answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("VTWServer", "vtw")
    found: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(found) < 2 and time.monotonic() < deadline:
        who = handle.whoami.remote().result(timeout_s=30)
        found[who["replica"]] = who["pid"]
    assert len(found) == 2, found
    return found


def body_for(index: int, *, stream: bool) -> dict:
    """Greedy questions, and long seeded samples (temperature 50: about 100 tokens, 2 s on a CPU)."""
    image, text, method = QUESTIONS[index % len(QUESTIONS)]
    content = [{"type": "image_url", "image_url": {"url": data_url(EXAMPLES / image)}}, {"type": "text", "text": text}]
    body: dict = {"messages": [{"role": "user", "content": content}], "vtw": {"method": method}, "stream": stream}
    if stream:
        body.update(temperature=50, seed=index, max_tokens=96)
    else:
        body.update(max_tokens=TOKENS)
    return body


def ask(http: httpx.Client, body: dict) -> tuple[int, str, str, dict]:
    """(status, text, replica, facts) of one request; facts: retries, the stream's ids, role chunks, errors."""
    if not body["stream"]:
        response = http.post("/v1/chat/completions", json=body)
        text = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else response.text
        facts = {"retries": int(response.headers.get("x-vtw-retries", 0))}
        return response.status_code, text, response.headers.get("x-vtw-replica", ""), facts
    text, facts = "", {"ids": set(), "roles": 0, "errors": []}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                facts["errors"].append(chunk["error"])
                continue
            facts["ids"].add(chunk["id"])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            facts["roles"] += "role" in delta
            text += delta.get("content") or ""
        return response.status_code, text, response.headers.get("x-vtw-replica", ""), facts


def kill_while_streaming(url: str, pids: dict[str, int]) -> tuple[str, float, str]:
    """Stream a long seeded answer and kill -9 its replica once the first words are out: (victim, when, text)."""
    text, killed = "", None
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body_for(1, stream=True)) as response,
    ):
        victim = response.headers["x-vtw-replica"]
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            piece = (chunk["choices"][0]["delta"].get("content") or "") if chunk["choices"] else ""
            if piece and killed is None:
                os.kill(pids[victim], signal.SIGKILL)
                killed = time.monotonic()
            text += piece
    assert killed is not None
    time.sleep(3)  # the load goes on over the survivor
    return victim, killed, text


def test_a_replica_killed_mid_request_costs_no_error_and_no_answer_changes(ray_url):
    """kill -9 of a model replica while it streams a long seeded answer and greedy requests are in flight."""
    from ray import serve

    pids = replica_pids()
    keys = [(0, False), (1, False), (2, False), (3, False), (1, True), (2, True)]  # greedy, and seeded streams
    with httpx.Client(base_url=ray_url, timeout=120) as http:
        expected = {key: ask(http, body_for(key[0], stream=key[1]))[1] for key in keys}
    results: list[tuple[tuple[int, bool], tuple[int, str, str, dict]]] = []
    lock, stop = threading.Lock(), threading.Event()

    def load(index: int, stream: bool) -> None:
        with httpx.Client(base_url=ray_url, timeout=120) as http:
            while not stop.is_set():
                outcome = ask(http, body_for(index, stream=stream))
                with lock:
                    results.append(((index, stream), outcome))

    clients = [threading.Thread(target=load, args=key, daemon=True) for key in keys]
    for client in clients:
        client.start()
    try:
        victim, killed, text = kill_while_streaming(ray_url, pids)
    finally:
        stop.set()
    for client in clients:
        client.join(timeout=120)
    assert text == expected[(1, True)]
    assert len(results) >= 6
    failures = [(key, outcome) for key, outcome in results if outcome[0] != 200 or outcome[3].get("errors")]
    assert failures == []
    assert [key for key, outcome in results if outcome[1] != expected[key]] == []
    streams = [outcome[3] for (_, stream), outcome in results if stream]
    assert all(len(facts["ids"]) == 1 and facts["roles"] == 1 for facts in streams)
    # Serve replaces the dead replica; the ingress keeps using the survivor meanwhile.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        states = serve.status().applications["vtw"].deployments["VTWServer"].replica_states
        if states == {"RUNNING": 2}:
            break
        time.sleep(0.5)
    assert states == {"RUNNING": 2}
    assert victim not in replica_pids()
    retried = sum(outcome[3].get("retries", 0) for _, outcome in results)
    print(f"{len(results)} answers, none failed, {retried} non-streamed re-runs; replacement running "
          f"{time.monotonic() - killed:.1f} s after the kill")  # fmt: skip
