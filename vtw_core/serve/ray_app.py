"""The OpenAI-compatible server as a Ray Serve application: one model manager per replica, one device each.

    serve run serve_config.yaml                    # a local Ray cluster, or the one RAY_ADDRESS names
    serve run vtw_core.serve.ray_app:build num_replicas=2
    serve deploy serve_config.yaml                 # onto a running cluster (`ray start --head` first)

Each replica loads its own copy of the weights and runs the same `ChatService` as `python -m vtw_core serve`
(with its in-replica batcher); Ray's proxy spreads requests over the replicas. `num_replicas`, autoscaling
and `ray_actor_options` (num_cpus, num_gpus) come from the config file; on GPU machines give each replica
`num_gpus: 1`, so Ray hands it its own GPU (CUDA_VISIBLE_DEVICES) and "auto" picks it.
"""

# No `from __future__ import annotations` here: Ray Serve rebuilds the routes of the class in each replica
# and FastAPI must see `Request` as a class there, not as a string to resolve.
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve import Application

from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import require_model
from vtw_core.serve.openai_api import ChatService, install_error_handlers, read_json
from vtw_core.serve.standalone import model_id_of

api = FastAPI(title="VTW Chat OpenAI-compatible API (Ray Serve)")
install_error_handlers(api)

# Builder arguments that go to each replica's constructor; the others are deployment options.
REPLICA_ARGS = ("model", "served_model_name", "method", "max_batch_size", "batch_wait_ms", "max_queue",
                "allow_remote_images", "device", "dtype", "attention", "trust_remote_code")  # fmt: skip


def _boolean(value: Any) -> bool:
    """`serve run ... allow_remote_images=true` passes text; YAML passes a bool."""
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")


@serve.deployment(name="VTWServer", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
@serve.ingress(api)
class VTWServer:
    """One replica: loads the model on its device and answers the OpenAI routes."""

    def __init__(
        self,
        model: str | None = None,
        served_model_name: str | None = None,
        method: str = "default",
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 64,
        allow_remote_images: bool = False,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        trust_remote_code: bool = False,
    ):
        manager = ModelManager.load(require_model(model), device=device, dtype=dtype, attention=attention,
                                    trust_remote_code=trust_remote_code)  # fmt: skip
        self.service = ChatService(
            manager,
            model_id=model_id_of(manager.info.source, served_model_name),
            default_method=method,
            max_batch_size=int(max_batch_size),
            batch_wait_ms=float(batch_wait_ms),
            max_queue=int(max_queue),
            allow_remote_images=_boolean(allow_remote_images),
        )
        # Which replica answered: a response header, so clients and tests can see the load spread.
        self.replica = serve.get_replica_context().replica_id.unique_id

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return self.service.models()

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        response = await self.service.chat_completions(await read_json(request))
        response.headers["x-vtw-replica"] = self.replica
        return response

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok", "replica": self.replica}

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def build(args: dict[str, Any]) -> Application:
    """The application builder `serve run` / `serve deploy` call with the config's `args`.

    `num_replicas`, `num_cpus` and `num_gpus` here are defaults; a `deployments:` entry in the config file
    overrides them (that is where autoscaling goes).
    """
    unknown = set(args) - set(REPLICA_ARGS) - {"num_replicas", "num_cpus", "num_gpus"}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {', '.join(REPLICA_ARGS)}, num_replicas, "
                         "num_cpus, num_gpus")  # fmt: skip
    options: dict[str, Any] = {"num_replicas": int(args.get("num_replicas", 1))}
    actor = {"num_cpus": float(args.get("num_cpus", 1))}
    if args.get("num_gpus") is not None:
        actor["num_gpus"] = float(args["num_gpus"])
    options["ray_actor_options"] = actor
    replica = {name: args[name] for name in REPLICA_ARGS if args.get(name) is not None}
    return VTWServer.options(**options).bind(**replica)
