"""Exceptions with messages meant for the end user (the CLI prints them, the app shows them)."""


class VTWError(Exception):
    """Base class of every error vtw_core raises on purpose."""


class InputError(VTWError, ValueError):
    """The request is invalid: bad image, empty prompt, K out of range, prompt too long, ..."""


class UnsupportedModelError(VTWError):
    """The model's family is not one the engine knows how to run."""


class ResourceError(VTWError):
    """The device ran out of memory (or another resource) while serving a valid request."""
