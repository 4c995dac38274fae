"""The app's public API as a caller meets it: the "Use via API" snippets, `/search_k`'s defaults and answer, and
the one log line of a refused call."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from app.media import example_files, is_default_model
from app.search import search_settings

ROOT = Path(__file__).resolve().parent.parent


def api_info(url: str) -> dict:
    """What the API page shows: Gradio serves it at /gradio_api/info, snippets included."""
    return httpx.get(url.rstrip("/") + "/gradio_api/info", timeout=30).json()["named_endpoints"]


def run_snippet(code: str, tmp_path: Path) -> str:
    """Run a snippet as shown, from the repository's root, offline (no proxy, hub lookups off)."""
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, f"the snippet failed:\n{code}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_api_page_snippets_run_offline_as_shown(served_app, tmp_path):
    manager, url = served_app
    endpoints = api_info(url)
    compare = endpoints["/compare"]["code_snippets"]["python"]
    # The page's first example for the model, a bundled image sent with handle_file, and its question; no remote
    # photo, no "Hello!!".
    image, question = example_files(is_default_model(manager))[0]
    assert f"handle_file('{image.relative_to(ROOT).as_posix()}')" in compare and f'"{question}"' in compare
    assert "http" not in compare.replace(url.rstrip("/"), "") and "Hello" not in compare
    output = run_snippet(compare, tmp_path)
    assert "'baseline'" in output and "'vtw'" in output and "'token_ids'" in output
    search = endpoints["/search_k"]["code_snippets"]["python"]
    assert 'criterion="prompt"' in search and 'calibration="bundled"' in search and "eta=0.003" in search
    output = run_snippet(search, tmp_path)
    assert "'calibration': 'bundled'" in output and "'criterion': 'prompt'" in output and "'k':" in output


def test_search_k_defaults_are_the_pages_for_the_loaded_model(served_app):
    manager, url = served_app
    page = search_settings(manager)
    parameters = {p["parameter_name"]: p for p in api_info(url)["/search_k"]["parameters"]}
    assert parameters["eta"]["parameter_default"] == page.eta
    assert parameters["criterion"]["parameter_default"] == page.criterion
    assert parameters["calibration"]["parameter_default"] == page.calibration[0][1]
    # Another set and criterion when asked, and the answer names them.
    result = Client(url, verbose=False).predict(0.5, "reply", "easy-vqa", api_name="/search_k")
    assert (result["calibration"], result["criterion"], result["eta"]) == ("easy-vqa", "reply", 0.5)


@pytest.fixture(scope="module")
def default_app():
    """The app on the embedded default model, served: the page and /search_k must agree on its K."""
    from conftest import free_port

    from app.ui import build_demo, launch_options
    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.defaults import require_model

    manager = ModelManager.load(require_model(None), device="cpu")
    demo = build_demo(manager)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    yield manager, f"http://127.0.0.1:{port}/"
    demo.close()


def test_search_k_on_the_default_model_gives_the_pages_and_shipped_k(default_app):
    manager, url = default_app
    shipped = json.loads((Path(manager.info.source) / "vtw.json").read_text(encoding="utf-8"))
    result = Client(url, verbose=False).predict(shipped["kl_threshold"], api_name="/search_k")
    assert result["k"] == shipped["k"] == manager.info.searched_k  # the page starts at this K
    assert result["calibration"] == "easy-vqa" and result["criterion"] == shipped["kl_over"]


def refused_calls(url: str, tmp_path: Path) -> list[str]:
    """Calls the app must refuse, each a way Gradio or our checks turn an API call down; their names."""
    client = Client(url, verbose=False)
    shape = handle_file(str(ROOT / "assets/examples/easyvqa-0.png"))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    calls = {
        "not an image": lambda: client.predict(handle_file(str(not_image)), "What?", 2, 4, api_name="/compare"),
        # An unreachable URL (what the old example sent, offline): Gradio fails to download it.
        "a URL": lambda: client.predict(handle_file("http://127.0.0.1:9/x.png"), "What?", 2, 4, api_name="/compare"),
        "bad K": lambda: client.predict(shape, "What?", 99, 4, api_name="/compare"),
        "bad criterion": lambda: client.predict(0.1, "everything", "bundled", api_name="/search_k"),
        "bad calibration": lambda: client.predict(0.1, "prompt", "my-photos", api_name="/search_k"),
        "bad eta": lambda: client.predict(-1, api_name="/search_k"),
    }
    for call in calls.values():
        with pytest.raises(Exception):  # noqa: B017  (the client's error type varies; the server's log is tested)
            call()
    # Over plain HTTP: a path on the server instead of an upload, too few inputs.
    base = url.rstrip("/") + "/gradio_api/call/"
    bodies = {
        "a server path": ("compare", [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "What?", 2, 4]),
        "too few inputs": ("compare", ["What?"]),
    }
    for endpoint, data in bodies.values():
        event = httpx.post(base + endpoint, json={"data": data}, timeout=30).json()["event_id"]
        reply = httpx.get(f"{base}{endpoint}/{event}", timeout=60).text
        assert "event: error" in reply and '"error": null' not in reply, reply  # the caller gets a reason
    return [*calls, *bodies]


def test_a_refused_api_call_logs_one_line_and_no_traceback(served_app, tmp_path, caplog, capfd):
    _, url = served_app
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="vtw_chat"):
        names = refused_calls(url, tmp_path)
    refusals = [record for record in caplog.records if "refused" in record.getMessage()]
    assert len(refusals) == len(names), [record.getMessage() for record in refusals]
    assert all(record.exc_info is None and "\n" not in record.getMessage() for record in refusals)
    logged = capfd.readouterr()
    assert "Traceback" not in logged.err + logged.out
    messages = " | ".join(record.getMessage() for record in refusals)
    for reason in ("is not an image (PNG, JPEG", "could not be downloaded", "criterion must be one of",
                   "calibration must be one of", "names a path on the server", "takes 4 inputs"):  # fmt: skip
        assert reason in messages, messages
