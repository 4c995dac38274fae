"""`python -m vtw_core serve`: the OpenAI-compatible server in one process, on one device, with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import warnings
from collections.abc import Iterable

from vtw_core.errors import VTWError
from vtw_core.generation.generate import COMPILED_ENGINES
from vtw_core.generation.manager import ModelManager
from vtw_core.runtime import cpu_ranges, cpu_threads, release_openmp_threads
from vtw_core.serve.auth import LOOPBACK_NAMES
from vtw_core.serve.errors import logger
from vtw_core.serve.limits import DEFAULT_BATCH_FILL_MS
from vtw_core.serve.openai_api import MAX_DECODING, ChatService, build_app, source_name
from vtw_core.serve.protocol import DEFAULT_LIMITS, RequestLimits
from vtw_core.serve.remote_images import RemoteImagePolicy


def model_id_of(source: str, name: str | None = None) -> str:
    """The id clients pass as `model`: the given name, "default-model" for the embedded one, else the hub id or
    the local folder's name."""
    return name or source_name(source)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound now (before the model loads): a port in use fails at once, with a message."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT, not one in use
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
    except OSError as error:
        raise VTWError(f"cannot serve on {host}:{port} ({error.strerror or error}); pick another --port") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_to_stderr() -> None:
    """One line per refused request on stderr: `WARNING POST /v1/chat/completions -> 400 ...`."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(
    manager: ModelManager,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    method: str = "default",
    max_batch_size: int = 8,
    batch_wait_ms: float = 0.0,
    batch_fill_ms: float = DEFAULT_BATCH_FILL_MS,
    max_queue: int = 64,
    allow_remote_images: bool = False,
    allowed_media_domains: Iterable[str] = (),
    limits: RequestLimits = DEFAULT_LIMITS,
    max_decoding: int = MAX_DECODING,
    max_image_memory: int | None = None,
    api_key: str | None = None,
    allowed_origins: Iterable[str] = (),
    docs: bool = False,
    allowed_hosts: Iterable[str] | None = None,
    compute_cpus: frozenset[int] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM); `sock`: the address bound beforehand (`bind_socket`);
    `compute_cpus`: the cores the computing thread is pinned to (vtw_core.runtime.resolve_cpus; None: any).

    `allowed_hosts`: names the `Host` header may carry besides this machine's (`localhost`, `127.0.0.1`, `[::1]`),
    "*" for any; None: this machine's names on a loopback address (no DNS rebinding), any name on others."""
    import torch
    import uvicorn

    # transformers repeats one deprecation notice per decoder layer and request: noise in a server's log.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    _log_to_stderr()
    domains = frozenset(allowed_media_domains)
    policy = None
    if allow_remote_images:
        policy = RemoteImagePolicy(allowed_domains=domains, max_bytes=limits.max_image_bytes)
    service = ChatService(
        manager,
        model_id=model_id_of(manager.info.source, model_id),
        default_method=method,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        batch_fill_ms=batch_fill_ms,
        max_queue=max_queue,
        limits=limits,
        max_decoding=max_decoding,
        max_image_memory=max_image_memory,
        remote_policy=policy,
        compute_cpus=compute_cpus,
    )
    sock = sock or bind_socket(host, port)
    if manager.prefill_engine in COMPILED_ENGINES:
        ks = (None, service.resolve_method(service.default_method).k)
        batches = max_batch_size > 1
        print(f"compiling the prefill and the decode step for the baseline and the default method"
              f"{', alone and in batches' * batches} (minutes the first time)...", flush=True)  # fmt: skip
        manager.warm_up(ks, batches=batches)
    release_openmp_threads()  # the batcher's thread computes from now on (vtw_core.runtime)
    key = "API key required" if api_key else "no API key"
    threads = cpu_threads(torch.get_num_threads())
    if compute_cpus:
        threads += f" on core{'s' * (len(compute_cpus) != 1)} {cpu_ranges(compute_cpus)}"
    print(f"serving {service.model_id} ({manager.info.describe()}) on http://{host}:{port}/v1, default method "
          f"{service.default_method}, {threads}, {key}", flush=True)  # fmt: skip
    if api_key is None and not is_loopback(host):
        print(f"warning: {host} takes requests from the network and no --api-key is set: anyone who reaches the "
              "port can use the model", file=sys.stderr, flush=True)  # fmt: skip
    if allowed_hosts is not None:
        allowed_hosts = LOOPBACK_NAMES | frozenset(allowed_hosts)
    elif is_loopback(host):
        allowed_hosts = LOOPBACK_NAMES
    app = build_app(service, api_key=api_key, allowed_origins=allowed_origins, docs=docs, allowed_hosts=allowed_hosts)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
