"""The server facing untrusted clients: the API key, CORS, the docs pages, refusals that stay one log line and
keep the connection, cancellation of requests whose client left, and what http(s) image URLs may reach.

The remote-image checks run as units (a resolver and a transport injected) and against a local HTTP server,
which the public policy refuses (127.0.0.1): those tests inject a policy that lets loopback through.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from conftest import free_port

from vtw_core.serve.errors import APIError
from vtw_core.serve.readiness import process_usage, wait_until_ready
from vtw_core.serve.remote_images import READ_ERROR, RemoteImagePolicy, fetch_image, is_public_address

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = (EXAMPLES / "easyvqa-0.png").read_bytes()


def question(text: str = "what is the red shape?", image: bool = True, **options) -> dict:
    content = [{"type": "text", "text": text}]
    if image:
        url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **options}


# A sampled 400-token request: temperature 50 makes the reply almost uniform over the vocabulary, and seed 0
# draws no end token (checked below), so it costs the full 400 decode steps.
LONG = {"max_tokens": 400, "temperature": 50, "seed": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m vtw_core serve --api-key KEY --threads 1` on the default model: (url, pid, log)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "vtw_core", "serve", "--port", str(port), "--api-key", KEY, "--threads", "1"]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, path="/health", timeout_s=120, log=log)
        yield url, process.pid, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_start_line_names_the_threads_and_the_key(server):
    _, _, log = server
    line = next(line for line in log.read_text().splitlines() if line.startswith("serving "))
    assert ", 1 CPU thread, " in line and "API key required" in line


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/v1/models", {}),
        ("GET", "/v1/models", {"Authorization": "Bearer wrong"}),
        ("GET", "/v1/models", {"Authorization": f"Basic {KEY}"}),
        ("GET", "/v1/models", {"Authorization": KEY}),
        ("GET", f"/v1/models?api_key={KEY}", {}),
        ("POST", "/v1/chat/completions", {}),
        ("GET", "/v1/unknown", {}),
        ("GET", "/docs", {}),
        ("GET", "/openapi.json", {}),
    ],
)
def test_every_route_but_health_needs_the_key(server, method, path, headers):
    url, _, _ = server
    response = httpx.request(method, url + path, headers=headers, json=question() if method == "POST" else None)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error" and KEY not in str(error)


def test_with_the_key_the_routes_answer_and_the_docs_are_off(server):
    url, _, _ = server
    assert httpx.get(f"{url}/health").status_code == 200  # load balancers carry no key
    models = httpx.get(f"{url}/v1/models", headers=AUTH)
    assert models.status_code == 200
    assert models.json()["data"][0]["vtw"]["source"] == "default-model" and str(ROOT) not in models.text
    reply = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=question(), timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(url + path, headers=AUTH).status_code == 404, path


def test_a_page_that_rebinds_its_name_to_loopback_is_refused(server):
    """DNS rebinding: a page whose own host name now resolves to 127.0.0.1 sends requests with `Host: its name`. A
    server on loopback answers only this machine's names, whatever the key (here given, as a stolen one would be)."""
    url, _, log = server
    port = url.rsplit(":", 1)[1]
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "0.0.0.0"):
            refused = client.get("/v1/models", headers={"Host": host})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host", host
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert "-> 400 invalid_host" in log.read_text()


def test_host_names_and_the_allowed_hosts_switch(tiny_manager):
    from fastapi.testclient import TestClient

    from vtw_core.cli import main
    from vtw_core.serve.auth import host_name
    from vtw_core.serve.openai_api import ChatService, build_app

    assert [host_name(h) for h in ("[::1]:8000", "A.Example:80", "localhost", " x ")] == [
        "::1",
        "a.example",
        "localhost",
        "x",
    ]
    service = ChatService(tiny_manager, model_id="tiny")
    try:
        cases = [(["api.example.com"], "api.example.com:443", 200), (["api.example.com"], "b.example", 400),
                 (["*"], "b.example", 200), (None, "b.example", 200)]  # fmt: skip
        for allowed, host, status in cases:
            with TestClient(build_app(service, allowed_hosts=allowed)) as client:
                assert client.get("/v1/models", headers={"Host": host}).status_code == status, (allowed, host)
    finally:
        service.close()
    for bad in ("https://a.example", "a.example/x", ","):
        with pytest.raises(SystemExit) as exit:  # argparse's own refusal
            main(["serve", "--allowed-hosts", bad, "--port", "1"])
        assert exit.value.code == 2


def test_cross_origin_browser_requests_do_not_run(server):
    url, _, _ = server
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
    # A "simple request" (text/plain) needs no preflight: the server refuses to read it.
    simple = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(question()), headers={
        **AUTH, "Origin": "https://evil.example", "Content-Type": "text/plain"})  # fmt: skip
    assert simple.status_code == 415 and simple.json()["error"]["code"] == "unsupported_media_type"
    assert "access-control-allow-origin" not in simple.headers


def test_a_client_that_trickles_its_body_gets_408_and_others_are_served(tiny_manager, monkeypatch):
    """Slowloris on the body: a client that sends a byte now and then is cut off after the body deadline with a
    408 (in OpenAI's format), and the server answers the next client meanwhile and after."""
    import select
    import socket

    import uvicorn

    from vtw_core.serve import openai_api

    monkeypatch.setattr(openai_api, "BODY_SECONDS", 1.0)
    service = openai_api.ChatService(tiny_manager, model_id="tiny")
    config = uvicorn.Config(openai_api.build_app(service), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{")  # fmt: skip
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/v1/models").status_code == 200  # served while the slow body is pending
            reply = b""
            while not reply.rstrip().endswith(b"}"):
                if not reply:
                    slow.sendall(b" ")  # a byte every 0.2 s: the connection never idles
                if select.select([slow], [], [], 0.2)[0]:
                    chunk = slow.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                assert time.monotonic() - started < 10, reply
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply, reply
            assert client.get("/v1/models").status_code == 200
    finally:
        slow.close()
        server.should_exit = True
        thread.join(timeout=10)
        service.close()


def _local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_refusals_are_one_log_line_and_keep_the_connection(server):
    """Engine refusals (a prompt beyond the context) and a 100,000-deep JSON body: a 4xx, one log line, no
    traceback, and the same keep-alive connection answers the next request."""
    url, _, log = server
    before = len(log.read_text().splitlines())
    json_type = {"content-type": "application/json"}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        beyond = client.post("/v1/chat/completions", json=question("a " * 1990))
        assert beyond.status_code == 400 and "context" in beyond.json()["error"]["message"]
        nested = client.post("/v1/chat/completions", content=b"[" * 100_000, headers=json_type)
        assert nested.status_code == 400 and "nested" in nested.json()["error"]["message"]
        good = client.post("/v1/chat/completions", json=question())
        assert good.status_code == 200
        assert _local_port(beyond) == _local_port(nested) == _local_port(good)  # one connection throughout
    lines = log.read_text().splitlines()[before:]
    assert "Traceback" not in "\n".join(lines) and "Exception in ASGI" not in "\n".join(lines)
    refusals = [line for line in lines if "-> 400" in line]
    assert len(refusals) == 2 and "context" in refusals[0] and "nested" in refusals[1], lines


def test_requests_whose_client_left_never_start_or_stop_at_once(server):
    """Non-streaming requests: the server watches the connection while the request waits or runs.

    1. A long request holds the device; three long ones queue behind it and their clients leave (timeout 0.5 s).
       Once the first ends, the server idles: the three never run.
    2. A long request whose client leaves after 1 s stops at the next decode step: it costs far less CPU than
       the full request, and the next request is answered at once.
    """
    url, pid, _ = server
    first: dict = {}

    def blocker() -> None:
        first.update(httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=question(**LONG), timeout=120).json())

    cpu_start = _settled_cpu(pid)
    thread = threading.Thread(target=blocker)
    thread.start()
    time.sleep(0.5)  # the first request holds the device
    for seed in (1, 2, 3):  # sampled requests run one at a time: each would cost a full 400-token run
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=question(**{**LONG, "seed": seed}), timeout=0.5)
    thread.join()
    full_cpu = process_usage(pid)[0] - cpu_start  # the first request's 400 steps (the others cost parsing only)
    assert first["usage"]["completion_tokens"] == 400, first["usage"]
    time.sleep(1.5)
    idle_cpu = process_usage(pid)[0] - cpu_start - full_cpu
    assert idle_cpu < 0.3, idle_cpu  # a queued request that ran would take the whole 1.5 s

    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        cpu_start = process_usage(pid)[0]
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/chat/completions", json=question(**LONG), timeout=1.0)
        cancelled_cpu = _settled_cpu(pid) - cpu_start
        start = time.perf_counter()
        next_reply = client.post("/v1/chat/completions", json=question())
        assert next_reply.status_code == 200 and time.perf_counter() - start < 10
        assert next_reply.json()["usage"]["vtw"]["queue_s"] < 0.5
    print(f"CPU seconds: a full 400-token request {full_cpu:.2f}, one left after 1 s {cancelled_cpu:.2f}, "
          f"three left while queued {idle_cpu:.2f}")  # fmt: skip
    assert cancelled_cpu < 0.5 * full_cpu


def _settled_cpu(pid: int, quiet_s: float = 0.5, timeout_s: float = 30) -> float:
    """The server's CPU seconds once it has been idle for `quiet_s` (it gains < 0.05 s in that time)."""
    deadline = time.monotonic() + timeout_s
    last = process_usage(pid)[0]
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = process_usage(pid)[0]
        if now - last < 0.05:
            return now
        last = now
    return last


def test_the_app_sends_the_backend_key(server, monkeypatch):
    from app.media import is_default_model
    from app.remote import RemoteManager
    from vtw_core.errors import InputError
    from vtw_core.serve.auth import api_key_from

    url, _, _ = server
    monkeypatch.delenv("VTW_API_KEY", raising=False)
    with pytest.raises(InputError, match="--backend-api-key"):
        RemoteManager(url, api_key=api_key_from(None))
    monkeypatch.setenv("VTW_API_KEY", KEY)  # what app.py reads when --backend-api-key is not given
    remote = RemoteManager(url, api_key=api_key_from(None))
    assert remote.info.num_layers == 16 and is_default_model(remote)  # "default-model": the app's own copy


@pytest.fixture(scope="module")
def tiny_manager(tiny_model_path):
    from vtw_core.generation.manager import ModelManager

    return ModelManager.load(str(tiny_model_path("llava", 4)), device="cpu")


def test_docs_and_allowed_origins_are_opt_in(tiny_manager):
    from fastapi.testclient import TestClient

    from vtw_core.serve.openai_api import ChatService, build_app

    service = ChatService(tiny_manager, model_id="tiny")
    origin = "https://app.example.com"
    try:
        with TestClient(build_app(service, api_key=KEY, allowed_origins=[origin], docs=True)) as client:
            assert client.get("/docs").status_code == 401 and client.get("/docs", headers=AUTH).status_code == 200
            assert client.get("/openapi.json", headers=AUTH).status_code == 200
            preflight = client.options("/v1/chat/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
            assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
            other = client.options("/v1/chat/completions", headers={
                "Origin": "https://other.example.com", "Access-Control-Request-Method": "POST"})  # fmt: skip
            assert other.status_code == 400
    finally:
        service.close()


def test_a_bug_is_a_500_in_openai_format_and_nothing_reaches_the_server(tiny_manager, monkeypatch, caplog):
    """An exception a route lets through is answered and logged here: the test client would re-raise anything
    that reached the server (which prints a traceback and drops the keep-alive connection)."""
    from fastapi.testclient import TestClient

    from vtw_core.serve.openai_api import ChatService, build_app

    service = ChatService(tiny_manager, model_id="tiny")
    monkeypatch.setattr(service, "models", lambda: 1 / 0)
    try:
        with TestClient(build_app(service)) as client, caplog.at_level("INFO", logger="vtw_core.serve"):
            response = client.get("/v1/models")
            assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
            assert "ZeroDivisionError" in response.json()["error"]["message"]
            assert client.get("/health").status_code == 200
    finally:
        service.close()
    assert [record.levelname for record in caplog.records] == ["ERROR", "ERROR"]  # the traceback, the line


# Remote images --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "169.254.170.2", "100.100.100.200",
     "100.64.0.1", "192.0.0.192", "168.63.129.16", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1",
     "198.18.0.1", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "::ffff:127.0.0.1",
     "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"],
)  # fmt: skip
def test_private_and_metadata_addresses_are_refused(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001::200e"])
def test_public_addresses_are_allowed(address):
    assert is_public_address(ipaddress.ip_address(address))


PUBLIC = "93.184.216.34"
DNS = {
    "images.example.com": [PUBLIC],
    "internal.example.com": ["10.0.0.7"],
    "mixed.example.com": [PUBLIC, "127.0.0.1"],
    "metadata.example.com": ["169.254.169.254"],
    "v6metadata.example.com": ["fd00:ec2::254"],
    "mapped.example.com": ["::ffff:127.0.0.1"],
}


class FakeNetwork:
    """An injected resolver and transport: records every lookup and every request that would go out."""

    def __init__(self, answers: dict[str, list[list[str]]] | None = None):
        self.lookups: list[str] = []
        self.requests: list[httpx.Request] = []
        self.answers = answers or {}

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host in self.answers:
            return self.answers[host].pop(0)
        return list(DNS.get(host, []))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path.startswith("/to/"):  # /to/<url>: a redirect there
            return httpx.Response(302, headers={"Location": path.removeprefix("/to/")})
        if path == "/loop":
            return httpx.Response(302, headers={"Location": "/loop"})
        if path == "/gzip":
            return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"\x1f\x8b" + bytes(100))
        if path == "/big":
            return httpx.Response(200, content=bytes(5_000))
        if path == "/image.png":
            return httpx.Response(200, content=IMAGE)
        return httpx.Response(404)

    def policy(self, **options) -> RemoteImagePolicy:
        return RemoteImagePolicy(resolve=self.resolve, transport=httpx.MockTransport(self.handle), max_bytes=4_000,
                                 **options)  # fmt: skip


def fetch(url: str, policy: RemoteImagePolicy) -> bytes:
    return asyncio.run(fetch_image(url, policy, param="messages[0].content[0]"))


def test_a_public_host_is_fetched_from_the_address_that_was_checked():
    network = FakeNetwork()
    policy = network.policy()
    assert fetch("http://images.example.com/image.png", policy) == IMAGE
    sent = network.requests[-1]
    assert sent.url.host == PUBLIC and sent.headers["host"] == "images.example.com"
    fetch("https://images.example.com:8443/image.png", policy)
    sent = network.requests[-1]
    assert sent.url.host == PUBLIC and sent.url.scheme == "https" and sent.headers["host"] == "images.example.com:8443"
    assert sent.extensions["sni_hostname"] == "images.example.com"  # TLS verifies the name, not the address


def test_a_dns_answer_that_changes_after_the_check_is_not_followed():
    network = FakeNetwork(answers={"rebind.example.com": [[PUBLIC], ["127.0.0.1"]]})
    assert fetch("http://rebind.example.com/image.png", network.policy()) == IMAGE
    assert network.lookups == ["rebind.example.com"] and network.requests[-1].url.host == PUBLIC


@pytest.mark.parametrize(
    ("url", "reaches_network"),
    [
        ("http://internal.example.com/image.png", False),
        ("http://mixed.example.com/image.png", False),
        ("http://metadata.example.com/latest/meta-data/", False),
        ("http://v6metadata.example.com/", False),
        ("http://mapped.example.com/", False),
        ("http://169.254.169.254/latest/meta-data/", False),
        ("http://[fd00:ec2::254]/latest/meta-data/", False),
        ("http://2130706433/", False),  # 127.0.0.1 as one number
        ("http://nowhere.example.com/image.png", False),  # no address
        ("http://user:pw@images.example.com/image.png", False),
        ("http://images.example.com/to/http://internal.example.com/image.png", True),
        ("http://images.example.com/to/http://169.254.169.254/latest/meta-data/", True),
        ("http://images.example.com/to/file:///etc/passwd", True),
        ("http://images.example.com/loop", True),
        ("http://images.example.com/missing.png", True),
        ("http://images.example.com/gzip", True),
        ("http://images.example.com/big", True),
    ],
)
def test_refused_urls_get_one_message_and_reach_no_refused_address(url, reaches_network):
    network = FakeNetwork()
    with pytest.raises(APIError) as caught:
        fetch(url, network.policy())
    error = caught.value
    assert error.status == 400 and error.message == READ_ERROR and error.code == "invalid_image"
    assert error.param == "messages[0].content[0]" and error.detail  # the reason, for the server's log only
    assert all(request.url.host == PUBLIC for request in network.requests)
    assert bool(network.requests) == reaches_network
    if url.endswith("/loop"):
        assert len(network.requests) == 4  # the first request and 3 redirects


def test_the_domain_allowlist_refuses_other_hosts_before_resolving_them():
    network = FakeNetwork()
    policy = network.policy(allowed_domains=frozenset({"images.example.com"}))
    assert fetch("http://images.example.com/image.png", policy) == IMAGE
    for url in ("http://other.example.org/image.png", "http://images.example.com/to/http://cdn.example.net/x.png"):
        with pytest.raises(APIError, match=READ_ERROR):
            fetch(url, policy)
    assert network.lookups == ["images.example.com", "images.example.com"]


class Files(BaseHTTPRequestHandler):
    """A local image server: redirect chains, a trickle, a body over the limit; records the Host headers."""

    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        Files.hosts.append(self.headers["Host"])
        if self.path.startswith("/hop/"):
            left = int(self.path.removeprefix("/hop/"))
            self._send(302, b"", {"Location": f"/hop/{left - 1}" if left > 1 else "/image.png"})
        elif self.path == "/image.png":
            self._send(200, IMAGE, {"Content-Type": "image/png"})
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):  # a byte every 0.25 s: each read is quick, the whole would take 250 s
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.25)
        elif self.path == "/big":
            self._send(200, bytes(IMAGE_LIMIT + 1), {})
        else:
            self._send(404, b"not found", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


IMAGE_LIMIT = 50_000


@pytest.fixture(scope="module")
def files():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def loopback_policy(**options) -> RemoteImagePolicy:
    """The test's policy: loopback allowed (the public one refuses it), "images.test" resolving to 127.0.0.1."""

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "images.test" else []

    return RemoteImagePolicy(allow_address=lambda address: address.is_loopback, resolve=resolve,
                             max_bytes=IMAGE_LIMIT, **options)  # fmt: skip


def test_fetch_mechanics_against_a_local_server(files):
    policy = loopback_policy(timeout_s=1.5)
    Files.hosts.clear()
    assert fetch(f"http://images.test:{files}/hop/3", policy) == IMAGE  # 3 redirects: the most followed
    assert Files.hosts == [f"images.test:{files}"] * 4  # connected to the checked address, the name in Host
    assert RemoteImagePolicy().allow_address(ipaddress.ip_address("127.0.0.1")) is False
    messages = set()
    for url in (f"http://images.test:{files}/hop/4", f"http://images.test:{files}/big",
                f"http://images.test:{files}/missing.png", f"http://images.test:{free_port()}/image.png"):  # fmt: skip
        with pytest.raises(APIError) as caught:
            fetch(url, policy)
        messages.add(caught.value.message)
    start = time.perf_counter()
    with pytest.raises(APIError) as caught:
        fetch(f"http://images.test:{files}/trickle", policy)
    elapsed = time.perf_counter() - start
    messages.add(caught.value.message)
    assert 1.4 < elapsed < 2.5, elapsed  # cut at the total limit, not at a per-read one
    assert messages == {READ_ERROR}  # a redirect chain, a size, a 404, a closed port, a trickle: one answer


def test_the_key_check_sees_the_path_within_the_application():
    """Mounted under a prefix (a proxy's root path, Ray Serve's route prefix), /health is still the open route and
    every other route still asks for the key."""
    from vtw_core.serve.openai_api import AccessMiddleware, route_path

    assert route_path({"path": "/vtw/health", "root_path": "/vtw"}) == "/health"
    assert route_path({"path": "/vtw", "root_path": "/vtw"}) == "/"
    assert route_path({"path": "/v1/models", "root_path": ""}) == "/v1/models"
    assert route_path({"path": "/other/health", "root_path": "/vtw"}) == "/other/health"

    def answer(path: str) -> object:
        """What the middleware does with an unkeyed GET: "app" (passed on) or the status it answered."""
        outcome = []

        async def app(scope, receive, send):
            outcome.append("app")

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            if message["type"] == "http.response.start":
                outcome.append(message["status"])

        scope = {"type": "http", "method": "GET", "path": path, "root_path": "/vtw", "headers": []}
        asyncio.run(AccessMiddleware(app, api_key="secret")(scope, receive, send))
        return outcome[0]

    assert answer("/vtw/health") == "app"
    assert answer("/vtw/v1/models") == 401
