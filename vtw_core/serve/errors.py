"""Errors in the OpenAI error format: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Messages never show a server path (an absolute path becomes its file name), and each refusal leaves one log
line (`log_refusal`): the status, the route, the message and, for the operator only, a `detail` the client
does not see (why an image URL could not be read, say).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from vtw_core.errors import InputError, ResourceError, UnsupportedModelError

logger = logging.getLogger("vtw_core.serve")
# An absolute path (POSIX or Windows) inside a message: replaced by its file name before a client sees it.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/|[A-Za-z]:\\)(?:[^\s'\"`:,;()]+[/\\])+([^\s'\"`:,;()/\\]*)")


def without_paths(text: str) -> str:
    return ABSOLUTE_PATH.sub(lambda match: match[1] or "…", text)


class APIError(Exception):
    """A request that fails with an HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.detail = detail  # for the server's log only

    def body(self) -> dict[str, Any]:
        message = without_paths(self.message)
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str) -> APIError:
    """503, as OpenAI and vLLM answer when they cannot take more work now: the client may retry later."""
    return APIError(503, message, type="server_error", code="overloaded")


def from_exception(error: BaseException) -> APIError:
    """The API error for an exception raised while serving a request (validation, engine, device)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InputError | UnsupportedModelError):
        return bad_request(str(error))
    if isinstance(error, ResourceError):
        return APIError(503, str(error), type="server_error", code="out_of_memory")
    return APIError(500, f"internal error ({type(error).__name__})", type="server_error", code="internal_error")


def log_refusal(error: APIError, method: str, path: str) -> None:
    """One line per refused request: `POST /v1/chat/completions -> 400 invalid_image: message [detail]`."""
    detail = f" [{error.detail}]" if error.detail else ""
    code = f" {error.code}" if error.code else ""
    level = logging.ERROR if error.code == "internal_error" else logging.WARNING
    if error.status == 499:  # the client left: nothing was wrong with the request
        level = logging.INFO
    message = _one_line(without_paths(error.message) + detail)
    logger.log(level, "%s %s -> %d%s: %s", method, _one_line(path), error.status, code, message)


def _one_line(text: str, limit: int = 500) -> str:
    """A client's text inside a log line: no line breaks (a forged line), at most `limit` characters."""
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "…"
