"""Who may call the server: an API key, as vLLM's `--api-key`, and the host names it answers to.

The key (`Authorization: Bearer KEY` on every route but the health check) comes from `--api-key` (or the Ray
config's `api_key`), else from the environment variable `VTW_API_KEY`; none of them set means no key (the server
then listens on 127.0.0.1 by default). Keys are compared in constant time, and the answer to a wrong or missing
key never says which it was.

A server on 127.0.0.1 answers only requests whose `Host` names this machine (`localhost`, `127.0.0.1`, `[::1]`,
or `--allowed-hosts`). Without that, a web page could point a host name of its own at 127.0.0.1 (DNS rebinding)
and its scripts would reach the keyless server as the same origin, past the browser's cross-origin checks.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping

from vtw_core.serve.errors import APIError

API_KEY_ENV = "VTW_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # load balancers and readiness checks carry no key
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def api_key_from(value: str | None) -> str | None:
    """The key to require: the explicit value, else $VTW_API_KEY, else None (no key). Blank counts as unset."""
    key = value if value is not None else os.environ.get(API_KEY_ENV)
    key = key.strip() if key is not None else None
    return key or None


def unauthorized() -> APIError:
    """401 with OpenAI's error body (`invalid_api_key`), whatever was wrong with the key."""
    return APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                    type="invalid_request_error", code="invalid_api_key")  # fmt: skip


def check_api_key(key: str | None, path: str, headers: Mapping[str, str]) -> None:
    """Raise a 401 unless `key` is None, `path` is open, or the headers carry `Authorization: Bearer <key>`."""
    if key is None or path in OPEN_PATHS:
        return
    scheme, _, sent = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), key.encode()):
        raise unauthorized()


def host_name(header: str) -> str:
    """The name in a `Host` header, lower case, without its port: `[::1]:8000` -> `::1`, `A.b:80` -> `a.b`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0]


def host_allowlist(names: Iterable[str] | None) -> frozenset[str] | None:
    """Configured host names as `host_name` gives them (lower case, an IPv6 address without brackets); None, or a
    "*" among them: any host."""
    if names is None:
        return None
    allowed = frozenset(name.strip().lower().removeprefix("[").removesuffix("]") for name in names)
    return None if "*" in allowed else allowed


def check_host(allowed: frozenset[str] | None, headers: Mapping[str, str]) -> None:
    """Raise a 400 unless `allowed` is None (any host) or the request's `Host` names one of `allowed`."""
    if allowed is None:
        return
    name = host_name(headers.get("host") or "")
    if name not in allowed:
        raise APIError(400, "this server does not answer to that host name (see --allowed-hosts)",
                       code="invalid_host")  # fmt: skip
