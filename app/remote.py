"""The app's model manager on another machine: an OpenAI-compatible VTW server (`python -m vtw_core serve`, or
the Ray Serve deployment), reached over HTTP. `python app.py --backend-url http://127.0.0.1:8000` uses it.

It offers what the chat needs from `ModelManager` (info, stream, generate, race) with the same events, so the
handlers do not know the difference. Images travel as PNG data URLs; the method as the server's `vtw`
extension (VTW's K, or a schedule inline); the stats come back in `usage.vtw`. The K search and the
attention analysis need the model's internals and are refused with a message.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import httpx
from PIL import Image

from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError, ResourceError, VTWError
from vtw_core.generation.concurrent import interleave
from vtw_core.generation.manager import ModelInfo
from vtw_core.generation.types import GenerationResult, GenerationStats, SamplingConfig, StreamEvent
from vtw_core.models.defaults import default_model
from vtw_core.models.prompts import Message

STATS_FIELDS = {field.name for field in fields(GenerationStats)}
LOCAL_ONLY = "the K search and the attention analysis need the model in this process; run the app without --backend-url"


class RemoteManager:
    """A ModelManager stand-in whose answers come from an OpenAI-compatible VTW server."""

    takes_video = False  # the chat completions API carries images only: the app hides its video input

    def __init__(self, base_url: str, timeout_s: float = 600.0, api_key: str | None = None):
        """`api_key`: sent as `Authorization: Bearer KEY`, for servers started with --api-key."""
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.lock = threading.Lock()  # held by nobody: the server orders the work on its devices
        entry = self._get("/v1/models")["data"][0]
        meta = entry.get("vtw") or {}
        self.model_id = entry["id"]
        source = meta.get("source", entry["id"])
        if source == "default-model" and default_model() is not None:  # the server names no paths: this one's copy
            source = default_model()
        self.info = ModelInfo(
            source=source,
            family=meta.get("family", "llava"),
            num_layers=int(meta["num_layers"]),
            device=f"{meta.get('device', '?')} at {self.base_url}",
            dtype=meta.get("dtype", "?"),
            attention=meta.get("attention", "?"),
            random_weights=bool(meta.get("random_weights", False)),
            searched_k=meta.get("searched_k"),
        )

    @property
    def processor(self) -> Any:
        raise InputError(LOCAL_ONLY)

    @property
    def model(self) -> Any:
        raise InputError(LOCAL_ONLY)

    def _get(self, path: str) -> dict[str, Any]:
        try:
            response = httpx.get(self.base_url + path, headers=self.headers, timeout=30)
        except httpx.HTTPError as error:
            raise VTWError(f"cannot reach the server at {self.base_url} ({type(error).__name__})") from error
        _raise_for_error(response.status_code, response.text)
        return response.json()

    def stream(
        self,
        messages: list[Message],
        images: list[Image.Image],
        *,
        k: int | None = None,
        position_mode: str = "original",
        sampling: SamplingConfig = SamplingConfig(),
        stop_event: threading.Event | None = None,
        engine: str = "auto",
        schedule: Schedule | None = None,
    ) -> Iterator[StreamEvent]:
        """Stream one answer from the server; Stop closes the connection, which ends the server's work."""
        if position_mode != "original" or engine != "auto":
            raise InputError("the server runs the original positions with its own decode engine")
        body = request_body(self.model_id, messages, images, k, schedule, sampling)
        stats = GenerationStats(k=k, num_layers=self.info.num_layers)
        text, token_ids = "", []
        try:
            with httpx.stream("POST", f"{self.base_url}/v1/chat/completions", json=body, headers=self.headers,
                              timeout=self.timeout_s) as response:  # fmt: skip
                if response.status_code != 200:
                    _raise_for_error(response.status_code, response.read().decode("utf-8", "replace"))
                for payload in _events(response):
                    if "error" in payload:
                        _raise_for_error(500, json.dumps(payload))
                    if payload.get("usage"):
                        vtw = payload["usage"].get("vtw", {})
                        stats = GenerationStats(**{key: value for key, value in vtw.items() if key in STATS_FIELDS})
                    for choice in payload.get("choices", []):
                        delta = choice.get("delta", {}).get("content") or ""
                        token_ids = choice.get("token_ids", token_ids)
                        if delta:
                            text += delta
                            yield StreamEvent(delta, text, list(token_ids), stats)
                    if stop_event is not None and stop_event.is_set():
                        stats.finish_reason = "stopped"
                        break
        except httpx.HTTPError as error:
            raise VTWError(f"the server at {self.base_url} failed: {type(error).__name__}") from error
        yield StreamEvent("", text, list(token_ids), stats, finished=True)

    def generate(self, messages: list[Message], images: list[Image.Image], **options: Any) -> GenerationResult:
        last = None
        for event in self.stream(messages, images, **options):
            last = event
        assert last is not None and last.finished
        return GenerationResult(last.text, last.token_ids, last.stats)

    def race(self, requests: dict[str, dict[str, Any]]) -> Iterator[tuple[str, StreamEvent]]:
        """Several streams at once (the server may run them together); yields (name, event) as they come."""

        def starter(options: dict[str, Any]):
            return lambda stop: self.stream(stop_event=stop, **options)

        streams = {}
        for name, options in requests.items():
            options = dict(options)
            stop = options.pop("stop_event", None)
            streams[name] = (starter(options), stop)
        yield from interleave(streams)


def request_body(
    model_id: str,
    messages: list[Message],
    images: list[Image.Image],
    k: int | None,
    schedule: Schedule | None,
    sampling: SamplingConfig,
) -> dict[str, Any]:
    """The OpenAI request for one answer: the image slots of `messages` filled in order from `images`."""
    remaining = iter(images)
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        parts = []
        for item in content:
            if item.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": _data_url(next(remaining))}})
            else:
                parts.append({"type": "text", "text": item.get("text", "")})
        converted.append({"role": message["role"], "content": parts})
    vtw: dict[str, Any] = {"return_token_ids": True}
    if schedule is not None:
        vtw["schedule"] = {"keep": list(schedule.keep), "ranking": schedule.ranking, "name": schedule.name}
    else:
        vtw["method"] = "baseline" if k is None else f"vtw:{k}"
    body: dict[str, Any] = {
        "model": model_id,
        "messages": converted,
        "max_tokens": sampling.max_new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "vtw": vtw,
        "temperature": sampling.temperature if sampling.do_sample else 0,
    }
    if sampling.do_sample:
        body.update({"top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed})
    return body


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server sees the pixels the app loaded
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)


def _raise_for_error(status: int, text: str) -> None:
    """The server's OpenAI error as the exception the app already explains: input, out of memory, other."""
    if status == 200:
        return
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    if status == 401:
        raise InputError(f"the server refused the API key: {message}; pass --backend-api-key or set VTW_API_KEY")
    if 400 <= status < 500:
        raise InputError(message)
    if status == 503:
        raise ResourceError(message)
    raise VTWError(f"the server answered HTTP {status}: {message}")
