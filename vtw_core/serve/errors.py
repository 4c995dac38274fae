"""Errors in the OpenAI error format: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from typing import Any

from vtw_core.errors import InputError, ResourceError, UnsupportedModelError


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
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
