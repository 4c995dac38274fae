"""torch.compile'd functions kept per model, so a call does not re-check the model's modules.

Before each call of a compiled graph, dynamo checks the guards of everything the trace read. For a function that
walks a model, most are on the model's modules (each module's hooks, type and attributes, each weight's metadata):
~3,300 for the default model's layer loop, ~0.45 ms at every call, which is more than the matmuls of a decode step.
`per_model(fn)` gives each model a copy of `fn` of its own (its own code object, so its own cache of graphs) and
compiles it with the guards on modules left out: a copy is only ever called with the model it was made for.

What is then not seen: a module replaced or a module's attribute changed after the model's first call (load the
model again instead). Weights changed in place are still read, as before, except by the tuned engine's frozen graphs
(engine.tuned_kernels). The guards on the other arguments (their shapes, K, which are None) stay.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class PerModel:
    """`torch.compile(fn, **options)` for each model passed as the first argument, without guards on its modules."""

    def __init__(self, fn: Callable[..., Any], **options: Any):
        self.fn, self.options = fn, options
        self._compiled: weakref.WeakKeyDictionary[nn.Module, Callable[..., Any]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # two threads' first calls with one model make one copy

    def _for(self, model: nn.Module) -> Callable[..., Any]:
        compiled = self._compiled.get(model)
        if compiled is not None:
            return compiled
        with self._lock:
            compiled = self._compiled.get(model)
            if compiled is not None:
                return compiled
            fn = self.fn
            code = fn.__code__.replace()  # a new code object: dynamo keeps compiled graphs per code object
            copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
            options = {**self.options.get("options", {}),
                       "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}  # fmt: skip
            compiled = torch.compile(copy, **{**self.options, "options": options})
            self._compiled[model] = compiled
        return compiled

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._for(model)(model, *args, **kwargs)


def per_model(fn: Callable[..., Any], **options: Any) -> PerModel:
    """`fn(model, ...)` compiled with `torch.compile(..., **options)`, one copy per model (see the module's note)."""
    return PerModel(fn, **options)
