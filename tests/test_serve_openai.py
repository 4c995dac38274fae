"""The OpenAI-compatible server, started with its documented command and driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import free_port
from PIL import Image

from vtw_core.cli import main as cli_main
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.defaults import require_model
from vtw_core.models.prompts import assistant_message, user_message
from vtw_core.serve.readiness import wait_until_ready
from vtw_core.validation import MAX_TEXT_CHARS

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
QUESTIONS = {
    "easyvqa-0.png": "what is the red shape?",
    "easyvqa-1.png": "what is the color of the rectangle?",
    "easyvqa-2.png": "is there a rectangle?",
}
TOKENS = 10


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def question(name: str, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": data_url(EXAMPLES / name)}},
               {"type": "text", "text": text or QUESTIONS[name]}]  # fmt: skip
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """`python -m vtw_core serve` on the embedded default model, on a free local port; stopped at the end."""
    port = free_port()
    command = [sys.executable, "-m", "vtw_core", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--batch-wait-ms", "50"]  # fmt: skip
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as output:  # a file, not a pipe nobody reads: a full pipe would stall the server
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stdout=output,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, path="/health", timeout_s=120, log=log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager.load(require_model(None), device="cpu")


def ask(client: openai.OpenAI, messages: list[dict], method: str, **options):
    return client.chat.completions.create(
        model="default-model", messages=messages, max_tokens=TOKENS,
        extra_body={"vtw": {"method": method, "return_token_ids": True}}, **{"temperature": 0, **options},
    )  # fmt: skip


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [model.id for model in models] == ["default-model"]
    assert models[0].model_extra["vtw"]["num_layers"] == 16  # the default model's decoder


@pytest.mark.parametrize("method", ["baseline", "vtw:9"])
def test_greedy_answer_equals_the_cli(client, capsys, method):
    name = "easyvqa-0.png"
    reply = ask(client, question(name), method)
    code = cli_main(["generate", "--image", str(EXAMPLES / name), "--prompt", QUESTIONS[name],
                     "--max-new-tokens", str(TOKENS), "--method", method, "--json"])  # fmt: skip
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    choice = reply.choices[0]
    assert choice.model_extra["token_ids"] == expected["token_ids"]
    assert choice.message.content == expected["text"]
    usage = reply.usage.model_extra["vtw"]
    assert reply.usage.completion_tokens == len(expected["token_ids"]) == usage["new_tokens"]
    assert reply.usage.prompt_tokens == expected["stats"]["prompt_tokens"]
    for key in ("k", "prefill_flops", "kv_cache_bytes", "vision_tokens", "decode_flops"):
        assert usage[key] == expected["stats"][key], key
    assert usage["method"] == method and usage["ttft_s"] > 0
    assert choice.finish_reason == ("stop" if expected["stats"]["finish_reason"] == "eos" else "length")


def test_streamed_deltas_concatenate_to_the_answer(client):
    messages = question("easyvqa-1.png")
    whole = ask(client, messages, "vtw:9")
    chunks = list(ask(client, messages, "vtw:9", stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.model_extra["vtw"]["prefill_flops"] == whole.usage.model_extra["vtw"]["prefill_flops"]


def test_multi_turn_equals_the_manager(client, manager):
    name = "easyvqa-0.png"
    first = ask(client, question(name), "vtw:9").choices[0].message.content
    follow_up = "what color is it?"
    messages = [*question(name), {"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]
    reply = ask(client, messages, "vtw:9")
    conversation = [user_message(QUESTIONS[name]), assistant_message(first), user_message(follow_up, num_images=0)]
    image = Image.open(EXAMPLES / name)
    expected = manager.generate(conversation, [image], k=9, sampling=SamplingConfig(TOKENS))
    assert reply.choices[0].model_extra["token_ids"] == expected.token_ids
    assert reply.choices[0].message.content == expected.text


def test_concurrent_greedy_requests_get_their_own_answers(client, manager):
    """Requests arriving together may share a batch; each still gets the answer it would get alone."""
    names = list(QUESTIONS)
    with ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda name: ask(client, question(name), "vtw:9"), names))
    for name, reply in zip(names, replies, strict=True):
        expected = manager.generate([user_message(QUESTIONS[name])], [Image.open(EXAMPLES / name)], k=9,
                                    sampling=SamplingConfig(TOKENS))  # fmt: skip
        assert reply.choices[0].model_extra["token_ids"] == expected.token_ids


def test_bad_method_is_a_400_in_openai_format(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, question("easyvqa-0.png"), "vtw:999")
    assert caught.value.status_code == 400
    body = httpx.post(f"{server}/v1/chat/completions", json={"messages": question("easyvqa-0.png"),
                      "vtw": {"method": "vtw:999"}}).json()  # fmt: skip
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "999" in body["error"]["message"] and body["error"]["param"] == "vtw.method"
    assert body["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=question("easyvqa-0.png"))
    assert caught.value.body["code"] == "model_not_found"


def _status(server: str, body: dict) -> tuple[int, dict]:
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    return response.status_code, response.json().get("error", {})


def _png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
        ("data:image/png;base64,%%%not-base64", "invalid_image"),
        ("data:image/png," + "abc", "invalid_image"),
        ("http://127.0.0.1:9/image.png", "remote_images_disabled"),
        ("file:///etc/passwd", None),
    ],
)
def test_bad_images_are_400(server, url, code):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]
    status, error = _status(server, {"messages": [{"role": "user", "content": content}]})
    assert status == 400 and error["code"] == code and error["param"] == "messages[0].content[0]"


def test_a_decompression_bomb_is_refused_before_decoding(server):
    url = "data:image/png;base64," + base64.b64encode(_png_bytes((8000, 6000))).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]
    status, error = _status(server, {"messages": [{"role": "user", "content": content}]})
    assert status == 400 and "pixels" in error["message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -5}, "seed"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"vtw": {"method": "schedule:/etc/passwd"}}, "vtw.method"),
        ({"vtw": {"methd": "vtw:3"}}, "vtw"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_TEXT_CHARS + 1)}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": question("easyvqa-0.png")[0]["content"][:1] * 5 + [
            {"type": "text", "text": "hi"}]}]}, "messages"),
    ],
)  # fmt: skip
def test_the_app_limits_apply(server, change, param):
    status, error = _status(server, {"messages": question("easyvqa-0.png"), **change})
    assert status == 400 and error["param"] == param, error


def test_a_prompt_beyond_the_context_is_a_400(server):
    status, error = _status(server, {"messages": question("easyvqa-0.png", "a " * 1990)})
    assert status == 400 and "context" in error["message"]


def test_stop_sequences_cut_the_answer(client):
    whole = ask(client, question("easyvqa-0.png"), "baseline").choices[0].message.content
    stop = whole.split()[-1][:3]
    reply = ask(client, question("easyvqa-0.png"), "baseline", stop=[stop])
    assert reply.choices[0].message.content == whole[: whole.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = ask(client, question("easyvqa-0.png"), "baseline", stop=stop, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == reply.choices[0].message.content


def test_sampling_with_a_seed_equals_the_cli(client, capsys):
    name = "easyvqa-2.png"
    reply = ask(client, question(name), "vtw:9", temperature=1.5, top_p=0.9, seed=7)
    code = cli_main(["generate", "--image", str(EXAMPLES / name), "--prompt", QUESTIONS[name], "--max-new-tokens",
                     str(TOKENS), "--method", "vtw:9", "--sample", "--temperature", "1.5", "--top-p", "0.9",
                     "--seed", "7", "--json"])  # fmt: skip
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and reply.choices[0].model_extra["token_ids"] == expected["token_ids"]


def test_the_server_keeps_serving_after_errors(client):
    assert ask(client, question("easyvqa-2.png"), "baseline").choices[0].message.content


def test_the_app_answers_through_the_server_as_it_does_in_process(server, manager):
    """`python app.py --backend-url`: the chat's handlers on the server give the in-process answers and stats."""
    from app import search, session, turns
    from app.remote import RemoteManager

    remote = RemoteManager(server)
    assert remote.info.num_layers == manager.info.num_layers and remote.info.searched_k == manager.info.searched_k
    roots = [EXAMPLES]
    sampling = SamplingConfig(max_new_tokens=TOKENS)
    runs = {
        "local": (manager, "sequential", "vtw"),
        "remote": (remote, "sequential", "vtw"),
        "race": (remote, "race", "vtw"),
        "fastv": (remote, "sequential", "fastv:0.5"),
        "fastv-local": (manager, "sequential", "fastv:0.5"),
    }
    results = {}
    for name, (backend, mode, method) in runs.items():
        state = turns.add_turn(session.ChatState(), "what is the red shape?", [str(EXAMPLES / "easyvqa-0.png")],
                                  roots)  # fmt: skip
        for _ in turns.answer_last_turn(backend, state, 9, sampling, mode, method=method):
            pass
        results[name] = state.results
    for name, reference in (("remote", "local"), ("race", "local"), ("fastv", "fastv-local")):
        for side in session.SIDES:
            got, expected = results[name][side], results[reference][side]
            assert got["text"] == expected["text"] and got["token_ids"] == expected["token_ids"], (name, side)
            for key in ("prefill_flops", "kv_cache_bytes", "k", "prompt_tokens", "new_tokens"):
                assert got["stats"][key] == expected["stats"][key], (name, side, key)
    with pytest.raises(InputError, match="backend-url"):
        search.search_k_result(remote, [], 0.003)


def test_remote_image_urls_work_only_when_allowed(manager, tmp_path):
    """--allow-remote-images: the server reads http(s) URLs (here a file server on 127.0.0.1, which the public
    policy refuses: the test's policy lets loopback through)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from fastapi.testclient import TestClient

    from vtw_core.serve.openai_api import ChatService, build_app
    from vtw_core.serve.remote_images import READ_ERROR, RemoteImagePolicy

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(EXAMPLES))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    loopback = RemoteImagePolicy(allow_address=lambda address: address.is_loopback)
    services = {
        "public": ChatService(manager, model_id="default-model", allow_remote_images=True),
        "loopback": ChatService(manager, model_id="default-model", remote_policy=loopback),
    }
    try:
        with TestClient(build_app(services["loopback"])) as http, TestClient(build_app(services["public"])) as public:

            def ask_url(client, url: str):
                content = [{"type": "image_url", "image_url": {"url": url}},
                           {"type": "text", "text": QUESTIONS["easyvqa-0.png"]}]  # fmt: skip
                body = {"messages": [{"role": "user", "content": content}], "max_tokens": TOKENS,
                        "vtw": {"method": "vtw:9", "return_token_ids": True}}  # fmt: skip
                return client.post("/v1/chat/completions", json=body)

            fetched = ask_url(http, f"{base}/easyvqa-0.png")
            inline = ask_url(http, data_url(EXAMPLES / "easyvqa-0.png"))
            assert fetched.status_code == inline.status_code == 200
            assert fetched.json()["choices"][0]["token_ids"] == inline.json()["choices"][0]["token_ids"]
            for client, url in ((http, f"{base}/missing.png"), (public, f"{base}/easyvqa-0.png")):
                refused = ask_url(client, url)  # a 404, and 127.0.0.1 for the public policy: the same answer
                assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_image"
                assert refused.json()["error"]["message"] == READ_ERROR
    finally:
        files.shutdown()
        for service in services.values():
            service.close()


def test_without_temperature_the_answer_is_greedy(client, server):
    greedy = ask(client, question("easyvqa-1.png"), "vtw:9").choices[0].model_extra["token_ids"]
    body = {"messages": question("easyvqa-1.png"), "max_tokens": TOKENS,
            "vtw": {"method": "vtw:9", "return_token_ids": True}}  # fmt: skip
    reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert reply["choices"][0]["token_ids"] == greedy


def test_the_peer_benchmark_compares_methods_and_counts_batched_rows(server):
    """scripts/peer_bench.py against this server, as docs/peer-benchmark.md runs it against ours and vLLM: equal
    answers, a TTFT row per target with the ratio paired against the first, and each closed loop's rows per call."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, str(root / "scripts" / "peer_bench.py"), "--target", f"base={server}/v1@baseline",
               "--target", f"vtw={server}/v1@vtw:5", "--repeats", "2", "--warmup", "1", "--clients", "4",
               "--seconds", "3", "--rounds", "1", "--gap", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    lines = done.stdout.splitlines()
    assert "answers: all equal (leading and trailing spaces aside)" in lines, done.stdout
    ttft = {name: next(line for line in lines if line.startswith(f"| {name} | ")) for name in ("base", "vtw")}
    assert "| 1.00 [1.00-1.00] |" in ttft["base"] and "| vtw:5 |" in ttft["vtw"], done.stdout
    assert any(line.startswith("this client's CPU per request: ") for line in lines), done.stdout
    rows = next(line for line in lines if line.startswith("rows per engine call"))
    for name in ("base", "vtw"):
        mean = float(rows.split(f"{name} at 4 clients ")[1].split(";")[0])
        assert 1.0 <= mean <= 4.0, rows
