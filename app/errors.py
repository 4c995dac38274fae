"""What a user reads when a request fails, and the log line it leaves; the app keeps serving either way."""

from __future__ import annotations

import logging
import re

from vtw_core.errors import InputError, ResourceError, VTWError

logger = logging.getLogger("vtw_chat")
# An absolute path (POSIX or Windows) inside a message: replaced by its file name before a user sees it.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/|[A-Za-z]:\\)(?:[^\s'\"`:,;()]+[/\\])+([^\s'\"`:,;()/\\]*)")


class Cancelled(InputError):
    """Stop was pressed (or the page was closed) while a long action ran."""


def error_message(error: BaseException) -> str:
    """What the user reads when a request fails (no server paths); the app keeps serving."""
    if isinstance(error, ResourceError):
        text = f"Out of memory: {error}"
    elif isinstance(error, VTWError):
        text = str(error)
    else:
        text = f"Unexpected error ({type(error).__name__}): {error}"
    return ABSOLUTE_PATH.sub(lambda match: match[1] or "…", text)


def log_failure(error: BaseException, where: str) -> str:
    """One log line for a request that did not complete; returns the user's message.

    A user's Stop (`Cancelled`) is no failure: "stopped", at info level. A refused request is a warning, and
    only a real bug leaves a traceback.
    """
    message = error_message(error)
    if isinstance(error, Cancelled):
        logger.info("%s stopped: %s", where, message)
    elif isinstance(error, VTWError):
        logger.warning("%s refused: %s", where, message)
    else:
        logger.error("%s failed", where, exc_info=error)
    return message
