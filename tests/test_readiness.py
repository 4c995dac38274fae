"""Waiting for a server started in a subprocess: ready when it answers, a clear error when it dies or hangs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import free_port

from vtw_core.serve.readiness import ServerNotReady, wait_until_ready


def test_a_server_that_answers_is_ready(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process, path="/", timeout_s=30)
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_server_that_exits_raises_with_its_status_and_log(tmp_path):
    log = tmp_path / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('model weights are broken'); sys.exit(3)"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    process.wait(timeout=30)
    with pytest.raises(ServerNotReady, match=r"(?s)status 3.*model weights are broken"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}", process, timeout_s=30, log=log)


def test_a_server_that_never_answers_times_out():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(ServerNotReady, match="did not answer within 1 s"):
            wait_until_ready(f"http://127.0.0.1:{free_port()}", process, timeout_s=1)
    finally:
        process.kill()
        process.wait(timeout=10)
