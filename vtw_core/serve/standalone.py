"""`python -m vtw_core serve`: the OpenAI-compatible server in one process, on one device, with uvicorn."""

from __future__ import annotations

import warnings
from pathlib import Path

from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import default_model
from vtw_core.serve.openai_api import ChatService, build_app


def model_id_of(source: str, name: str | None = None) -> str:
    """The id clients pass as `model`: the given name, "default-model" for the embedded one, else the source."""
    if name:
        return name
    if source == default_model():
        return "default-model"
    return source.rstrip("/") if not Path(source).is_dir() else Path(source).name


def serve(
    manager: ModelManager,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_id: str | None = None,
    method: str = "default",
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    max_queue: int = 64,
    allow_remote_images: bool = False,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    # transformers repeats one deprecation notice per decoder layer and request: noise in a server's log.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")

    service = ChatService(
        manager,
        model_id=model_id_of(manager.info.source, model_id),
        default_method=method,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        max_queue=max_queue,
        allow_remote_images=allow_remote_images,
    )
    print(f"serving {service.model_id} ({manager.info.describe()}) on http://{host}:{port}/v1, "
          f"default method {service.default_method}", flush=True)  # fmt: skip
    uvicorn.run(build_app(service), host=host, port=port, log_level="warning")
