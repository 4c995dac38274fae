"""An OpenAI chat-completions request body -> what the model manager takes, with every limit of the app.

Choices where the OpenAI API leaves room (documented in docs/serving.md):
- `temperature` 0 or absent means greedy decoding (like the CLI and the app; OpenAI's own default is 1);
  above 0 the reply is sampled with `temperature`, `top_p`, `top_k` (an extension, as in vLLM) and `seed`.
- `max_completion_tokens` (or the older `max_tokens`) defaults to 128 new tokens, the CLI's default.
- The method is an extension field: `{"vtw": {"method": "vtw:9"}}` (the openai client sends it with
  `extra_body`), or an inline schedule `{"vtw": {"schedule": {"keep": [...], "ranking": "last"}}}`.
- Images are `image_url` parts with data URLs; http(s) URLs only on servers started to allow them.

A request is read in two steps, so that a server can refuse it before spending memory on it:
`plan_chat_request` checks the structure, the texts, the number of images and, for data URLs, each image's
header (its size: no pixel is decoded) and the pixels of the whole request; `decode_images` then decodes the
pixels (the server does that under its admission control). `parse_chat_request` does both at once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from vtw_core import validation
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.images import image_header_size, load_image
from vtw_core.models.prompts import Message
from vtw_core.serve.errors import bad_request
from vtw_core.serve.limits import (  # noqa: F401  (MAX_REQUEST_BYTES, SERVER_MAX_IMAGE_BYTES: re-exported)
    DECODED_BYTES_PER_PIXEL,
    DEFAULT_LIMITS,
    IMAGE_FORMATS,
    MAX_ASPECT_RATIO,
    MAX_IMAGES_PER_MESSAGE,
    MAX_IMAGES_PER_REQUEST,
    MAX_MESSAGES,
    MAX_PARTS_PER_MESSAGE,
    MAX_REQUEST_BYTES,
    MAX_SCHEDULE_LAYERS,
    MAX_SCHEDULE_NAME_CHARS,
    SERVER_MAX_IMAGE_BYTES,
    RequestLimits,
    base64_length,
)

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_METHOD_CHARS = 200
DEFAULT_MAX_TOKENS = 128
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
VTW_FIELDS = {"method", "schedule", "return_token_ids"}
UNSUPPORTED = {  # fields whose non-default values would change the answer: refused rather than ignored
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ["text"]),
}

Fetch = Callable[[str], bytes]


@dataclass
class ImageInput:
    """One image of a request: its URL, then its encoded bytes and header size once read, then its pixels."""

    param: str
    url: str
    data: bytes | None = None
    size: tuple[int, int] | None = None

    @property
    def remote(self) -> bool:
        return not self.url.startswith("data:")

    @property
    def pixels(self) -> int:
        return 0 if self.size is None else self.size[0] * self.size[1]


@dataclass
class ChatRequest:
    model: str | None
    messages: list[Message]
    images: list[Image.Image]  # decoded, in order; empty until `decode_images` (or `parse_chat_request`)
    sampling: SamplingConfig
    method: str | None = None  # None: the server's default
    schedule: Schedule | None = None
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    return_token_ids: bool = False
    image_inputs: list[ImageInput] = field(default_factory=list)

    def image_memory(self, limits: RequestLimits) -> int:
        """Bytes the images may hold: encoded plus decoded RGB; for URLs not read yet, the most they may hold."""
        unread = [image for image in self.image_inputs if image.data is None and image.size is None]
        encoded = sum(len(image.data or b"") for image in self.image_inputs) + len(unread) * limits.max_image_bytes
        pixels = limits.max_pixels if unread else sum(image.pixels for image in self.image_inputs)
        return encoded + DECODED_BYTES_PER_PIXEL * pixels


def parse_chat_request(body: Any, *, fetch: Fetch | None = None, limits: RequestLimits = DEFAULT_LIMITS) -> ChatRequest:
    """Check and convert a request body, images decoded; `fetch` reads http(s) image URLs (None: refused)."""
    request = plan_chat_request(body, limits, remote_images=fetch is not None)
    for image in request.image_inputs:
        if image.remote:
            assert fetch is not None
            accept_image_bytes(request, image, fetch(image.url), limits)
    decode_images(request, limits)
    return request


def plan_chat_request(body: Any, limits: RequestLimits = DEFAULT_LIMITS, *, remote_images: bool = False) -> ChatRequest:
    """Everything that costs no pixel: the structure, texts, sampling, method, the number of images, and for
    data URLs their bytes and header sizes (the request's pixels summed). http(s) images are read later."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise bad_request("only n = 1 is supported", param="n", code="unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    messages, image_inputs = _messages(body.get("messages"), limits, remote_images)
    stream = _flag(body.get("stream"), "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    extension = _extension(body.get("vtw"))
    request = ChatRequest(
        model=model,
        messages=messages,
        images=[],
        sampling=_sampling(body),
        method=extension["method"],
        schedule=extension["schedule"],
        stream=stream,
        include_usage=stream and _flag(options.get("include_usage"), "stream_options.include_usage"),
        stop=_stop(body.get("stop")),
        return_token_ids=extension["return_token_ids"],
        image_inputs=image_inputs,
    )
    for image in image_inputs:  # every cheap check above has passed: now the images' bytes and headers
        if not image.remote:
            accept_image_bytes(request, image, _data_url_bytes(image.url, image.param, limits), limits)
    return request


def accept_image_bytes(request: ChatRequest, image: ImageInput, data: bytes, limits: RequestLimits) -> None:
    """Keep an image's encoded bytes after checking them and their header (no pixel decoded) against the limits."""
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"the image is larger than {_megabytes(limits.max_image_bytes)}", param=image.param,
                          code="invalid_image")  # fmt: skip
    try:
        size = image_header_size(data, limits.image_pixels, name="the image", formats=IMAGE_FORMATS,
                                 max_aspect_ratio=MAX_ASPECT_RATIO)  # fmt: skip
    except InputError as error:
        raise bad_request(str(error), param=image.param, code="invalid_image") from None
    others = sum(other.pixels for other in request.image_inputs if other is not image)
    if others + size[0] * size[1] > limits.max_pixels:
        raise bad_request(f"the request's images have more than {limits.max_pixels:,} pixels together "
                          f"(this one is {size[0]}x{size[1]})", param=image.param, code="too_many_pixels")  # fmt: skip
    image.data, image.size = data, size


def decode_images(request: ChatRequest, limits: RequestLimits = DEFAULT_LIMITS) -> None:
    """Decode every image (each read and checked by `accept_image_bytes`), dropping the encoded bytes."""
    images = []
    for image in request.image_inputs:
        if image.data is None:
            raise bad_request("the image was not read", param=image.param, code="invalid_image")
        try:
            images.append(load_image(image.data, limits.image_pixels))
        except InputError as error:
            raise bad_request(str(error), param=image.param, code="invalid_image") from None
        image.data = None
    request.images = images


def _megabytes(size: int) -> str:
    return f"{size / 2**20:g} MB"


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", param=name)
    return value


def _checked(check: Callable[..., Any], value: Any, param: str, *args: Any, **kwargs: Any) -> Any:
    """A vtw_core.validation check whose InputError becomes a 400 naming the OpenAI parameter."""
    try:
        return check(value, *args, **kwargs)
    except InputError as error:
        raise bad_request(str(error), param=param) from None


def _sampling(body: dict[str, Any]) -> SamplingConfig:
    tokens_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    tokens = body.get(tokens_param)
    max_new_tokens = DEFAULT_MAX_TOKENS
    if tokens is not None:
        max_new_tokens = _checked(validation.check_max_new_tokens, tokens, tokens_param)
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else _checked(validation.check_float, temperature, "temperature",
                                                           "temperature", 0, 100)  # fmt: skip
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else _checked(validation.check_float, top_p, "top_p", "top_p", 0, 1,
                                               low_inclusive=False)  # fmt: skip
    top_k = body.get("top_k")
    top_k = 0 if top_k in (None, -1) else _checked(validation.check_int, top_k, "top_k", "top_k", 0, 1_000_000)
    seed = _checked(validation.check_seed, body.get("seed"), "seed")
    if temperature == 0:  # greedy, as vLLM reads temperature 0; the other knobs do not apply
        return SamplingConfig(max_new_tokens=max_new_tokens)
    return SamplingConfig(max_new_tokens, True, temperature, top_p, top_k, seed)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", param="stop")
    for stop in stops:
        if not isinstance(stop, str) or not stop or len(stop) > validation.MAX_TEXT_CHARS:
            raise bad_request("each stop sequence must be a non-empty string", param="stop")
    return stops


def _extension(value: Any) -> dict[str, Any]:
    """The `vtw` extension object: method (spec string), schedule (inline), return_token_ids."""
    result: dict[str, Any] = {"method": None, "schedule": None, "return_token_ids": False}
    if value is None:
        return result
    if not isinstance(value, dict) or not set(value) <= VTW_FIELDS:
        raise bad_request(f"vtw must be an object with the fields {', '.join(sorted(VTW_FIELDS))}", param="vtw")
    method, schedule = value.get("method"), value.get("schedule")
    if method is not None and schedule is not None:
        raise bad_request("pass vtw.method or vtw.schedule, not both", param="vtw")
    if method is not None:
        if not isinstance(method, str) or not method.strip() or len(method) > MAX_METHOD_CHARS:
            raise bad_request("vtw.method must be a method name such as baseline or vtw:9", param="vtw.method")
        result["method"] = method.strip()
    if schedule is not None:
        if not isinstance(schedule, dict) or not isinstance(schedule.get("keep"), list):
            raise bad_request("vtw.schedule must be an object with a keep list", param="vtw.schedule")
        if len(schedule["keep"]) > MAX_SCHEDULE_LAYERS:
            raise bad_request(f"vtw.schedule.keep has more than {MAX_SCHEDULE_LAYERS} layers", param="vtw.schedule")
        name = schedule.get("name", "schedule")
        if not isinstance(name, str) or len(name) > MAX_SCHEDULE_NAME_CHARS:
            raise bad_request(f"vtw.schedule.name must be a string of at most {MAX_SCHEDULE_NAME_CHARS} characters",
                              param="vtw.schedule")  # fmt: skip
        try:
            keep = tuple(_checked(validation.check_float, share, "vtw.schedule", "keep share", 0, 1)
                         for share in schedule["keep"])  # fmt: skip
            result["schedule"] = Schedule(keep, schedule.get("ranking", "text"), name)
        except InputError as error:
            raise bad_request(str(error), param="vtw.schedule") from None
    result["return_token_ids"] = _flag(value.get("return_token_ids"), "vtw.return_token_ids")
    return result


def _messages(value: Any, limits: RequestLimits, remote_images: bool) -> tuple[list[Message], list[ImageInput]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty list", param="messages")
    if len(value) > MAX_MESSAGES:
        raise bad_request(f"at most {MAX_MESSAGES} messages are accepted", param="messages")
    messages: list[Message] = []
    images: list[ImageInput] = []
    for index, message in enumerate(value):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_request(f"{param} must have a role: system, developer, user or assistant", param=param)
        role = ROLES[message["role"]]
        if message.get("tool_calls") or message.get("function_call"):
            raise bad_request("tool calls are not supported", param=param, code="unsupported_parameter")
        content, message_images = _content(message.get("content"), role, f"{param}.content", remote_images)
        messages.append({"role": role, "content": content})
        images.extend(message_images)
        if len(images) > limits.max_images:  # counted before a single image is read
            raise bad_request(f"at most {limits.max_images} images per request are accepted", param="messages",
                              code="too_many_images")  # fmt: skip
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must come from the user", param="messages")
    return messages, images


def _content(value: Any, role: str, param: str, remote_images: bool) -> tuple[list[dict], list[ImageInput]]:
    """Content items in the order given, as vtw_core.models.prompts writes them; images only located here."""
    parts = [{"type": "text", "text": value}] if isinstance(value, str) else value
    if not isinstance(parts, list) or not parts:
        raise bad_request(f"{param} must be a string or a non-empty list of parts", param=param)
    if len(parts) > MAX_PARTS_PER_MESSAGE:
        raise bad_request(f"{param} has more than {MAX_PARTS_PER_MESSAGE} parts", param=param)
    items: list[dict] = []
    images: list[ImageInput] = []
    for index, part in enumerate(parts):
        part_param = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            items.append({"type": "text", "text": _text(part.get("text"), role, part_param)})
        elif kind == "image_url":
            if role != "user":
                raise bad_request("only user messages can hold images", param=part_param)
            images.append(ImageInput(part_param, _image_url(part.get("image_url"), part_param, remote_images)))
            items.append({"type": "image"})
        else:
            raise bad_request(f"{part_param} must be a text or image_url part", param=part_param)
    texts = "\n".join(item["text"] for item in items if item["type"] == "text")
    if role == "user" and not texts.strip():
        raise bad_request(f"{param} has no question text", param=param)
    if texts.strip():
        _checked(validation.check_text, texts, param, param)  # the limits hold for the whole message too
    return items, images


def _text(value: Any, role: str, param: str) -> str:
    # Earlier answers may be empty (a stopped reply); questions may not. Both obey the app's length limits.
    if role == "assistant" and isinstance(value, str) and not value.strip():
        return value
    checked = _checked(validation.check_text, value, param, param)
    return value if role == "assistant" else checked


def _image_url(value: Any, param: str, remote_images: bool) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise bad_request(f"{param}.image_url must hold a url", param=param)
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        if not remote_images:
            raise bad_request(
                "image URLs are off on this server (it was not started with --allow-remote-images); "
                "send the image as a data URL: data:image/png;base64,...",
                param=param,
                code="remote_images_disabled",
            )
        return url
    raise bad_request("an image URL must be a data: URL (or http(s) where the server allows it)", param=param)


def _data_url_bytes(url: str, param: str, limits: RequestLimits) -> bytes:
    header, separator, payload = url.partition(",")
    if not separator or not header.endswith(";base64"):
        raise bad_request("a data URL must be base64: data:image/png;base64,...", param=param, code="invalid_image")
    if len(payload) > base64_length(limits.max_image_bytes):  # before decoding: base64 is 4/3 of the bytes
        raise bad_request(f"the image is larger than {_megabytes(limits.max_image_bytes)}", param=param,
                          code="invalid_image")  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data URL is not valid base64", param=param, code="invalid_image") from None
