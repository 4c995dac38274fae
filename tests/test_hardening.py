"""Every input a stranger can send gets a clear, early answer, and the app keeps serving.

Each case names an entry point, what is sent, and the message it must get. `PYTHONPATH=. python tests/test_hardening.py`
prints the same cases as a table with each message and the time it took.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app import attention, errors, search, turns
from app.session import ChatState
from vtw_core.cli import main as cli_main
from vtw_core.errors import InputError, VTWError
from vtw_core.generation.manager import ModelManager
from vtw_core.testing.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
HUGE = 2**70
NAN, INF = math.nan, math.inf


def handler_cases(manager: ModelManager, image: str) -> list[tuple[str, object, str]]:
    """(what is sent, a call, the message it must get) for the handlers behind the UI and /compare."""
    num_layers = manager.info.num_layers

    def compare(question="What?", k=2, tokens=4):
        return lambda: turns.compare_once(manager, image, question, k, tokens)

    def answer(k):
        def run():
            state = turns.add_turn(ChatState(), "What?", [image], [Path(image).parent])
            return list(turns.answer_last_turn(manager, state, k, turns.sampling_config(4, False, 1, 1, 0)))

        return run

    def sampling(**overrides):
        values = {"max_new_tokens": 8, "sample": True, "temperature": 0.7, "top_p": 0.9, "seed": 0, **overrides}
        return lambda: turns.sampling_config(**values)

    return [
        ("/compare question of 100,000 characters", compare("x" * 100_000), "at most 4,000 are accepted"),
        ("/compare question of 3,500 emoji (14,000 bytes)", compare("😀" * 3_500), "at most 12,000 are accepted"),
        ("/compare empty question", compare("   "), "question is empty"),
        ("/compare question that is not text", compare(12), "question must be text"),
        ("/compare K = NaN", compare(k=NAN), "K must be a finite number"),
        ("/compare K = Infinity", compare(k=INF), "K must be a finite number"),
        ("/compare K = None", compare(k=None), f"K must be a whole number from 0 to {num_layers}"),
        ("/compare K = 2**70", compare(k=HUGE), f"K must be a whole number from 0 to {num_layers}"),
        ("/compare K = 3.5", compare(k=3.5), f"K must be a whole number from 0 to {num_layers}"),
        ("/compare K = -1", compare(k=-1), f"K must be a whole number from 0 to {num_layers}"),
        ("/compare K = 'x'", compare(k="x"), "K must be a number"),
        ("/compare max_new_tokens = NaN", compare(tokens=NAN), "max_new_tokens must be a finite number"),
        ("/compare max_new_tokens = 0", compare(tokens=0), "max_new_tokens must be a whole number from 1 to 4096"),
        ("/compare max_new_tokens = 10**9", compare(tokens=10**9), "max_new_tokens must be a whole number"),
        ("answer K = NaN", answer(NAN), "K must be a finite number"),
        ("answer K = None", answer(None), "K must be a whole number"),
        ("sampling temperature = NaN", sampling(temperature=NAN), "temperature must be a finite number"),
        ("sampling temperature = 0", sampling(temperature=0), "temperature must be > 0 when sampling"),
        ("sampling top_p = 0", sampling(top_p=0), r"top_p must be in \(0, 1\]"),
        ("sampling seed = 2**70", sampling(seed=HUGE), "seed must be a whole number from 0 to"),
        ("sampling seed = -1", sampling(seed=-1), "seed must be a whole number from 0 to"),
        ("Search K eta = 'x'", lambda: search.search_k_result(manager, [], "x"), "eta must be a number"),
        ("Search K eta = Infinity", lambda: search.search_k_result(manager, [], INF), "eta must be a finite"),
        ("Search K eta = -1", lambda: search.search_k_result(manager, [], -1), r"eta must be in \[0, 100\]"),
        ("attention K = NaN", lambda: attention.attention_report(manager, ChatState(), "vtw", NAN), "K must be a"),
        ("method with a server path", lambda: turns.accelerated_method("schedule:/srv/x/s.json", 2, num_layers),
         "cannot read the method 'schedule:s.json'"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def manager(tiny_model_path) -> ModelManager:
    return ModelManager.load(str(tiny_model_path("llava", 4)), device="cpu")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("uploads") / "red.png"
    Image.new("RGB", (40, 40), "red").save(path)
    return str(path)


def test_every_bad_handler_input_gets_its_message(manager, image):
    for what, call, message in handler_cases(manager, image):
        with pytest.raises(InputError) as caught:
            call()
        shown = errors.error_message(caught.value)  # what the user reads
        assert re.search(message, shown), (what, shown)
        assert not shown.startswith("Unexpected") and "/srv/" not in shown, what
    # The same manager still answers.
    assert turns.compare_once(manager, image, "What?", 2, 3)["vtw"]["k"] == 2


def test_a_refused_request_logs_one_line(manager, image, caplog):
    with caplog.at_level("WARNING", logger="vtw_chat"), pytest.raises(InputError) as caught:
        turns.compare_once(manager, image, "What?", NAN, 4)
    errors.log_failure(caught.value, "/compare")
    records = [record for record in caplog.records if record.name == "vtw_chat"]
    assert len(records) == 1 and records[0].exc_info is None and "K must be" in records[0].getMessage()


ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10, max_value=8),
    st.integers(min_value=2**31),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=st.one_of(st.text(max_size=30), st.integers()), k=ANYTHING, tokens=ANYTHING)
def test_compare_never_fails_unexpectedly(manager, image, question, k, tokens):
    try:
        result = turns.compare_once(manager, image, question, k, tokens)
    except VTWError as error:
        assert not errors.error_message(error).startswith("Unexpected")
    else:
        assert result["vtw"]["k"] == k and 1 <= result["vtw"]["stats"]["new_tokens"] <= tokens


@settings(max_examples=80, deadline=None)
@given(tokens=ANYTHING, sample=ANYTHING, temperature=ANYTHING, top_p=ANYTHING, seed=ANYTHING, eta=ANYTHING)
def test_parameter_panel_never_fails_unexpectedly(tokens, sample, temperature, top_p, seed, eta):
    for call in (
        lambda: turns.sampling_config(tokens, sample, temperature, top_p, seed),
        lambda: search.check_eta(eta),
    ):
        try:
            call()
        except VTWError as error:
            assert not errors.error_message(error).startswith("Unexpected")


def call_raw(url: str, api: str, body: str) -> str:
    """POST a raw JSON body (NaN and Infinity literals included, as any HTTP client can send) to a Gradio API
    route and return the server-sent events of its answer."""
    import httpx

    posted = httpx.post(f"{url}gradio_api/call/{api}", content=body, headers={"content-type": "application/json"})
    if posted.status_code != 200:
        return posted.text
    return httpx.get(f"{url}gradio_api/call/{api}/{posted.json()['event_id']}", timeout=60).text


def test_served_compare_survives_hostile_parameters(served_app, tmp_path, capfd):
    import httpx
    from gradio_client import Client, handle_file

    _, url = served_app
    image = tmp_path / "shape.png"
    Image.new("RGB", (40, 40), "green").save(image)
    with image.open("rb") as file:
        uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("shape.png", file, "image/png")}).json()[0]
    sent = f'{{"path": "{uploaded}", "meta": {{"_type": "gradio.FileData"}}}}'
    for question, k, tokens, message in [
        ('"What?"', "NaN", "4", "K must be a finite number"),
        ('"What?"', "Infinity", "4", "K must be a finite number"),
        ('"What?"', str(HUGE), "4", "K must be a whole number from 0 to 8"),
        ('"What?"', "0.5", "4", "K must be a whole number"),
        ('"What?"', "null", "4", "K must be a whole number"),
        ('"What?"', '"x"', "4", "K must be a number"),
        ('"' + "x" * 20_000 + '"', "2", "4", "question is 20,000 characters long"),
        ('"What?"', "2", "NaN", "max_new_tokens must be a finite number"),
    ]:
        events = call_raw(url, "compare", f'{{"data": [{sent}, {question}, {k}, {tokens}]}}')
        assert "event: error" in events and message in events, (k, tokens, events[-300:])
    for eta, criterion, calibration, message in [
        ("Infinity", '"prompt"', '"bundled"', "eta must be a finite number"),
        ("NaN", '"prompt"', '"bundled"', "eta must be a finite number"),
        ('"x"', '"prompt"', '"bundled"', "eta must be a number"),
        ("-1", '"prompt"', '"bundled"', "eta must be in [0, 100]"),
        ("0.003", '"everything"', '"bundled"', "criterion must be one of prompt, reply"),
        ("0.003", '"prompt"', '"/etc/passwd"', "calibration must be one of easy-vqa, bundled"),
        ("0.003", "null", "null", "criterion must be one of"),
    ]:  # eta, criterion, calibration: every input is checked before a calibration set is read
        events = call_raw(url, "search_k", f'{{"data": [{eta}, {criterion}, {calibration}]}}')
        assert "event: error" in events and message in events, (eta, criterion, calibration, events[-300:])
    events = call_raw(url, "search_k", '{"data": [Infinity]}')  # one input of three
    assert "event: error" in events and "/search_k takes 3 inputs (eta, criterion, calibration), got 1" in events
    assert "Traceback" not in capfd.readouterr().err  # one log line per refusal, no traceback
    client = Client(url, verbose=False)
    result = client.predict(handle_file(str(image)), "What?", 8, 3, api_name="/compare")  # still serving
    assert result["vtw"]["k"] == 8


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    """A config without weights, truncated weights, and no tokenizer: each a copy of a tiny checkpoint."""
    source = tiny_model_path("llava", 4)
    folders = {}
    for name in ("no-weights", "truncated", "no-tokenizer"):
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(source, folder, dirs_exist_ok=True)
        folders[name] = folder
    (folders["no-weights"] / "model.safetensors").unlink()
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for path in folders["no-tokenizer"].glob("tokenizer*"):
        path.unlink()
    return folders


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "foo"], "device 'foo' is not a device name"),
        (["--device", "cuda:abc"], "device 'cuda:abc' is not a device name"),
        (["--device", "mps"], "mps (Apple GPU) was requested but is not available"),
        (["--device", "meta"], "device 'meta' cannot run a model here"),
        (["--device", "cuda"], "CUDA was requested but no GPU is available"),
        (["--attention", "flash_attention_2"], "flash_attention_2 runs on CUDA only"),
        (["--attention", "magic"], "attention must be one of"),
        (["--temperature", "nan", "--sample"], "temperature must be a finite number"),
        (["--seed", str(HUGE), "--sample"], "seed must be a whole number from 0 to"),
        (["--max-new-tokens", "0"], "max_new_tokens must be a whole number from 1 to 4096"),
    ],
)
def test_cli_refuses_bad_options_with_status_2(capsys, tiny_model_path, options, message):
    code = cli_main(["generate", "--model", str(tiny_model_path("llava", 4)), "--prompt", "Hi", *options])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {message}" in err.replace("\r", "\n") and "Traceback" not in err


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("no-weights", "cannot load the model weights from"),
        ("truncated", "cannot load the model weights from"),
        ("no-tokenizer", "cannot load the tokenizer and image processor of"),
    ],
)
def test_cli_refuses_broken_checkpoints_with_status_2(capsys, broken_models, broken, message):
    code = cli_main(["generate", "--model", str(broken_models[broken]), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {message}" in err.replace("\r", "\n") and "Traceback" not in err


def run_app(*options: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", *options], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "99999"], "port must be between 1 and 65535"),
        (["--device", "meta"], "error: device 'meta' cannot run a model here"),
        (["--attention", "flash_attention_2"], "error: flash_attention_2 runs on CUDA only"),
    ],
)
def test_app_refuses_bad_start_options_with_status_2(options, message):
    result = run_app(*options)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_app_on_a_port_in_use_exits_with_status_2(tiny_model_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_app("--model", str(tiny_model_path("llava", 4)), "--port", str(port))
    assert result.returncode == 2 and "error: cannot serve on 127.0.0.1" in result.stderr
    assert "Traceback" not in result.stderr


def run_serve(*options: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtw_core", "serve", *options], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--port", "99999"], "argument --port: port must be between 1 and 65535, got 99999"),
        (["--port", "0"], "argument --port: port must be between 1 and 65535, got 0"),
        (["--port", "http"], "argument --port: 'http' is not a port number"),
        (["--max-batch-size", "0"], "argument --max-batch-size: must be 1 or more, got 0"),
        (["--batch-wait-ms", "-1"], "argument --batch-wait-ms: must be a finite number >= 0, got -1"),
        (["--batch-wait-ms", "nan"], "argument --batch-wait-ms: must be a finite number >= 0, got nan"),
        (["--batch-wait-ms", "inf"], "argument --batch-wait-ms: must be a finite number >= 0, got inf"),
        (["--batch-fill-ms", "-5"], "argument --batch-fill-ms: must be a finite number >= 0, got -5"),
        (["--batch-fill-ms", "nan"], "argument --batch-fill-ms: must be a finite number >= 0, got nan"),
        (["--batch-fill-ms", "1e9"], "argument --batch-fill-ms: must be at most 1000 ms, got 1e9"),
        (["--max-queue", "0"], "argument --max-queue: must be 1 or more, got 0"),
        (["--threads", "0"], "argument --threads: must be 1 or more, got 0"),
        (["--max-images-per-request", "-1"], "argument --max-images-per-request: must be 0 or more, got -1"),
        (["--max-image-bytes", "0"], "argument --max-image-bytes: must be a number of MB > 0, got 0"),
        (["--max-pixels-per-request", "0"], "argument --max-pixels-per-request: must be 1 or more, got 0"),
        (["--max-decoding", "0"], "argument --max-decoding: must be 1 or more, got 0"),
        (["--allowed-origins", "example.com"], "'example.com' is not an origin such as https://app.example.com"),
        (["--allowed-media-domains", "https://a.example/x"], "'https://a.example/x' is not a domain name"),
        (["--allowed-media-domains", "a.example"], "error: --allowed-media-domains needs --allow-remote-images"),
        (["--max-image-memory", "10"], "error: --max-image-memory must hold one request at the image limits"),
    ],
)
def test_serve_refuses_bad_options_with_status_2_before_loading(capsys, options, message):
    try:
        code = cli_main(["serve", *options])
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "error: " in err and "Traceback" not in err, err


def test_serve_with_a_port_out_of_range_exits_with_status_2():
    result = run_serve("--port", "99999", timeout=60)
    assert result.returncode == 2 and "port must be between 1 and 65535, got 99999" in result.stderr
    assert "Traceback" not in result.stderr and ":99999" not in result.stdout


def test_serve_on_a_port_in_use_exits_with_status_2_before_loading_the_model():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--port", str(port), timeout=60)
    assert result.returncode == 2 and f"error: cannot serve on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stderr


def test_serve_reads_the_api_key_from_the_environment_and_sets_the_threads(monkeypatch):
    """--api-key, else $VTW_API_KEY (vtw_core.serve.auth.api_key_from); --threads N sets torch's threads."""
    import torch

    import vtw_core.serve.standalone as standalone

    calls = []

    def serve(manager, **options) -> None:
        calls.append(options)
        options["sock"].close()

    monkeypatch.setattr(standalone, "serve", serve)
    monkeypatch.setattr("vtw_core.cli.serve.load_model", lambda args, **options: None)
    threads = torch.get_num_threads()
    port = str(_free_port())
    monkeypatch.setenv("VTW_API_KEY", "from-env")
    try:
        assert cli_main(["serve", "--port", port, "--threads", "1"]) == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert cli_main(["serve", "--port", port, "--api-key", "from-flag"]) == 0
    monkeypatch.setenv("VTW_API_KEY", "  ")
    assert cli_main(["serve", "--port", port]) == 0
    assert [call["api_key"] for call in calls] == ["from-env", "from-flag", None]  # blank: no key


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def print_table() -> None:
    """The handler cases as a Markdown table: what is sent, the message, and the time it took."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        manager = ModelManager.load(str(build_tiny_model("llava", Path(folder) / "tiny", num_layers=4)), device="cpu")
        image = str(Path(folder) / "red.png")
        Image.new("RGB", (40, 40), "red").save(image)
        print("| input | message | ms |\n|---|---|---|")
        for what, call, _ in handler_cases(manager, image):
            start = time.perf_counter()
            try:
                call()
                outcome = "(accepted)"
            except Exception as error:
                outcome = errors.error_message(error)
            print(f"| {what} | {outcome[:110]} | {(time.perf_counter() - start) * 1000:.1f} |")


if __name__ == "__main__":
    print_table()
