"""Wait until a server started in a subprocess answers (the load-test script and the serving tests start one),
and read what it costs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer within the time allowed; the message carries its log when known."""


def wait_until_ready(
    url: str,
    process: subprocess.Popen,
    *,
    path: str = "/v1/models",
    timeout_s: float = 120.0,
    log: Path | None = None,
) -> None:
    """Poll GET `url + path` until it answers 200; raise ServerNotReady if `process` exits or time runs out.

    `/v1/models` is answered by both the standalone server and the Ray Serve application.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise ServerNotReady(f"the server exited with status {process.returncode}{_log_text(log)}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > deadline:
            raise ServerNotReady(f"the server did not answer within {timeout_s:.0f} s{_log_text(log)}")
        time.sleep(0.3)


def _log_text(log: Path | None) -> str:
    return f":\n{log.read_text()}" if log is not None and log.exists() else ""


def process_usage(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, resident bytes now, peak resident bytes) of a process, read from /proc (Linux only).

    The serving tests read a server subprocess's costs with it: CPU seconds do not depend on what else the
    machine runs, unlike wall time.
    """
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(stat[11]) + int(stat[12])) / ticks  # utime + stime
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return cpu_s, _kib(status["VmRSS"]) * 1024, _kib(status["VmHWM"]) * 1024


def _kib(field: str) -> int:
    return int(field.split()[0])
