"""The OpenAI-compatible server as a Ray Serve application: a light ingress, and model replicas on one device each.

    serve run serve_config.yaml                    # RAY_ADDRESS's cluster, the one `ray start` recorded, or a new one
    serve run vtw_core.serve.ray_app:build num_replicas=2
    serve deploy serve_config.yaml                 # onto a running cluster (`ray start --head` first)

Two deployments. `VTWIngress` (no model, no CPU reserved) checks the API key, reads the body and forwards it
through a `DeploymentHandle` to `VTWServer`, whose replicas each load their own copy of the weights and run
the same `ChatService` as `python -m vtw_core serve` (with its in-replica batcher). When a model replica dies
mid-request, the ingress re-runs idempotent requests on another replica (`vtw_core.serve.ray_ingress`).
`num_replicas`, autoscaling and `ray_actor_options` (num_cpus, num_gpus) come from the config file; on GPU
machines give each model replica `num_gpus: 1`, so Ray hands it its own GPU (CUDA_VISIBLE_DEVICES) and "auto"
picks it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import require_model
from vtw_core.runtime import THREADS_ENV, configure_process, release_openmp_threads
from vtw_core.serve.auth import api_key_from
from vtw_core.serve.errors import from_exception
from vtw_core.serve.limits import DEFAULT_BATCH_FILL_MS, DEFAULT_LIMITS, MAX_REQUEST_BYTES, RequestLimits
from vtw_core.serve.openai_api import MAX_DECODING, ChatService
from vtw_core.serve.ray_ingress import DEFAULT_MAX_ATTEMPTS, Relay, ingress_app
from vtw_core.serve.remote_images import RemoteImagePolicy, parse_domains
from vtw_core.serve.standalone import model_id_of

logger = logging.getLogger("ray.serve")

# Builder arguments for each model replica's constructor, for the ingress's, and deployment options.
REPLICA_ARGS = ("model", "served_model_name", "method", "max_batch_size", "batch_wait_ms", "batch_fill_ms", "max_queue",
                "allow_remote_images", "allowed_media_domains", "device", "dtype", "attention", "trust_remote_code",
                "threads", "max_decoding", "max_image_memory_mb")  # fmt: skip
# The request limits, as `python -m vtw_core serve` names them; the ingress's body limit follows from them.
LIMIT_ARGS = ("max_images_per_request", "max_image_mb", "max_pixels_per_request")
INGRESS_ARGS = ("api_key", "docs", "max_attempts")
DEPLOYMENT_ARGS = ("num_replicas", "num_cpus", "num_gpus")
# A replica being stopped (Ctrl-C, scale-down, redeploy) gets this long to finish its requests before it is
# killed; the ingress re-runs the idempotent ones that were cut off. Serve's default, 20 s, made Ctrl-C slow.
SHUTDOWN_S = 5.0
PASSED_HEADERS = ("retry-after",)  # model-replica response headers the ingress passes on


def _boolean(value: Any) -> bool:
    """`serve run ... allow_remote_images=true` passes text; YAML passes a bool."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


def bind_replica_port_to_node_address() -> bool:
    """Bind this replica's inter-deployment gRPC port to the node's address instead of every interface.

    Ray Serve opens that port on "[::]:0" (all interfaces) while Ray's own ports follow the node's address
    (127.0.0.1 on a cluster started with `--node-ip-address 127.0.0.1` or RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
    Serve's routers dial the port at the node's address, so binding it there keeps it reachable to them and
    nobody else. Call in the replica's constructor: Serve opens the port after the constructor returns.
    Returns whether the binding applies (False if this Ray version opens the port elsewhere).
    """
    try:
        from ray.serve._private import replica as serve_replica
    except ImportError:
        return False
    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None:
        return False
    if getattr(original, "vtw_node_address", None) is not None:
        return True
    node_ip = ray.util.get_node_ip_address()
    try:
        host = f"[{node_ip}]" if ipaddress.ip_address(node_ip).version == 6 else node_ip
    except ValueError:
        return False

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return original(server, address)

    add_port.vtw_node_address = host  # type: ignore[attr-defined]
    serve_replica.add_port_to_grpc_server = add_port
    return True


@serve.deployment(name="VTWServer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  graceful_shutdown_timeout_s=SHUTDOWN_S, graceful_shutdown_wait_loop_s=0.5)  # fmt: skip
class VTWServer:
    """One model replica: loads the model on its device and answers the bodies the ingress forwards."""

    def __init__(
        self,
        model: str | None = None,
        served_model_name: str | None = None,
        method: str = "default",
        max_batch_size: int = 8,
        batch_wait_ms: float = 0.0,
        batch_fill_ms: float = DEFAULT_BATCH_FILL_MS,
        max_queue: int = 64,
        allow_remote_images: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        trust_remote_code: bool = False,
        allowed_media_domains: str | list[str] | None = None,
        threads: int | None = None,
        max_decoding: int = MAX_DECODING,
        max_image_memory_mb: float | None = None,
        limits: RequestLimits = DEFAULT_LIMITS,
    ):
        bind_replica_port_to_node_address()
        # vtw_core.runtime's rule: $VTW_THREADS, else the CPUs Ray gave this replica (num_cpus), at least one.
        assigned = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        if threads is None and not os.environ.get(THREADS_ENV, "").strip():
            threads = max(1, int(assigned))
        configure_process(None if threads is None else int(threads))
        domains = allowed_media_domains
        if isinstance(domains, list | tuple):
            domains = ",".join(domains)
        policy = RemoteImagePolicy(allowed_domains=parse_domains(domains), max_bytes=limits.max_image_bytes)
        manager = ModelManager.load(require_model(model), device=device, dtype=dtype, attention=attention,
                                    trust_remote_code=_boolean(trust_remote_code))  # fmt: skip
        self.service: ChatService | None = ChatService(
            manager,
            model_id=model_id_of(manager.info.source, served_model_name),
            default_method=method,
            max_batch_size=int(max_batch_size),
            batch_wait_ms=float(batch_wait_ms),
            batch_fill_ms=float(batch_fill_ms),
            max_queue=int(max_queue),
            allow_remote_images=_boolean(allow_remote_images),
            limits=limits,
            max_decoding=int(max_decoding),
            max_image_memory=None if max_image_memory_mb is None else int(float(max_image_memory_mb) * 2**20),
            remote_policy=policy,
        )
        release_openmp_threads()  # the batcher's thread computes from now on (vtw_core.runtime)
        # Which replica answered: a response header, so clients and tests can see the load spread.
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def respond(self, body: Any) -> AsyncIterator[dict[str, Any] | str]:
        """A head ({status, replica} and the JSON `body`, or no body: a stream follows), then the stream's events."""
        assert self.service is not None, "the replica is shutting down"
        try:
            response = await self.service.chat_completions(body)
        except Exception as error:  # APIError: the client's mistake, a full queue, ...
            api_error = from_exception(error)
            yield {"status": api_error.status, "body": _json_bytes(api_error.body()), "replica": self.replica}
            return
        headers = {name: response.headers[name] for name in PASSED_HEADERS if name in response.headers}
        if not isinstance(response, StreamingResponse):
            yield {"status": response.status_code, "body": bytes(response.body), "replica": self.replica,
                   "headers": headers}  # fmt: skip
            return
        yield {"status": response.status_code, "replica": self.replica, "headers": headers}
        events = response.body_iterator
        try:
            async for item in events:
                yield item if isinstance(item, str) else bytes(item).decode()
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()  # the stream's own cleanup: the engine stops the row, the queue slot is freed

    def models(self) -> dict[str, Any]:
        assert self.service is not None, "the replica is shutting down"
        return self.service.models()

    def whoami(self) -> dict[str, Any]:
        """The replica's process and node (tests and the failover measurements kill them)."""
        return {"replica": self.replica, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def __del__(self) -> None:
        # Serve calls this when it stops the replica, after its requests drained (or SHUTDOWN_S passed). Closing
        # the batcher waits for its batch: in a thread, so that the replica reports its shutdown at once.
        service, self.service = getattr(self, "service", None), None
        if service is not None:
            threading.Thread(target=service.close, name="vtw-close", daemon=True).start()


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode()


@serve.deployment(name="VTWIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512,
                  graceful_shutdown_timeout_s=SHUTDOWN_S, graceful_shutdown_wait_loop_s=0.5)  # fmt: skip
@serve.ingress()
class VTWIngress:
    """The HTTP routes: API key, body, and failover over the model replicas (vtw_core.serve.ray_ingress)."""

    def __init__(
        self,
        model: DeploymentHandle,
        api_key: str | None = None,
        docs: bool = False,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ):
        bind_replica_port_to_node_address()
        self.max_request_bytes = int(max_request_bytes)
        self.api_key = api_key_from(None if api_key is None else str(api_key))
        self.docs = _boolean(docs)
        self.relay = Relay(model, max_attempts=int(max_attempts))
        if self.api_key is None:
            logger.warning("no API key (api_key, or $VTW_API_KEY): whoever reaches the HTTP proxy can use the API")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self.relay, api_key=self.api_key, docs=self.docs, max_bytes=self.max_request_bytes)


def request_limits(args: dict[str, Any]) -> RequestLimits:
    """The per-request caps the config names (max_images_per_request, max_image_mb, max_pixels_per_request)."""
    given = {name: args[name] for name in LIMIT_ARGS if args.get(name) is not None}
    return RequestLimits(
        max_images=int(given.get("max_images_per_request", DEFAULT_LIMITS.max_images)),
        max_image_bytes=int(float(given.get("max_image_mb", DEFAULT_LIMITS.max_image_bytes / 2**20)) * 2**20),
        max_pixels=int(given.get("max_pixels_per_request", DEFAULT_LIMITS.max_pixels)),
    )


def build(args: dict[str, Any]) -> Application:
    """The application builder `serve run` / `serve deploy` call with the config's `args`.

    `num_replicas`, `num_cpus` and `num_gpus` are the model deployment's defaults; a `deployments:` entry in the
    config file overrides them (that is where autoscaling goes). `api_key` (else $VTW_API_KEY where the
    ingress runs), `docs` and `max_attempts` go to the ingress.
    """
    known = (*REPLICA_ARGS, *LIMIT_ARGS, *INGRESS_ARGS, *DEPLOYMENT_ARGS)
    unknown = set(args) - set(known)
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {', '.join(known)}")
    options: dict[str, Any] = {"num_replicas": int(args.get("num_replicas", 1))}
    actor = {"num_cpus": float(args.get("num_cpus", 1))}
    if args.get("num_gpus") is not None:
        actor["num_gpus"] = float(args["num_gpus"])
    options["ray_actor_options"] = actor
    replica = {name: args[name] for name in REPLICA_ARGS if args.get(name) is not None}
    limits = request_limits(args)
    replica["limits"] = limits
    ingress = {name: args[name] for name in INGRESS_ARGS if args.get(name) is not None}
    ingress["max_request_bytes"] = limits.max_request_bytes
    if int(ingress.get("max_attempts", DEFAULT_MAX_ATTEMPTS)) < 1:
        raise ValueError("max_attempts must be at least 1")
    return VTWIngress.bind(VTWServer.options(**options).bind(**replica), **ingress)
