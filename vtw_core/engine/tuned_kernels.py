"""Tuned kernels: the compiled engine's graphs with their matmuls as inductor's CPU GEMM templates on packed weights.

The compiled engine (compiled_prefill, fast_decode.compiled_decode_step) leaves every matmul to torch's library
call, which for bfloat16 on a CPU goes through oneDNN with the weight in torch's layout: each call reorders the
weight into oneDNN's blocked layout first. For one to a few dozen rows (every decode step, VTW's text-only layers)
that reorder is most of the call: 54 us for a 256 x 256 weight at 12 rows, 126 us for 256 x 1,024 (default model,
one thread). Tuned, inductor freezes the weights into the graph (packed once, at compile time) and generates each
matmul from its C++ GEMM template (AMX or AVX-512 micro-kernels, blocked for the shapes it sees). On the default
model at one thread in bfloat16 (interleaved, 25 runs each): the prefill at K=5 0.83x the compiled engine's time,
the baseline's 0.93x, a decode step 0.5x. Matmuls that read the same input (a layer's q, k and v projections, its
gate and up projections) run as one grouped GEMM, with SwiGLU's SiLU and product in its epilogue, so the activations
are read once and the gate's and up's outputs never reach memory (the prefill at two threads 0.92x the ungrouped
templates' time). Over thousands of rows the templates lose (a batch of eight prompts' prefill: 1.22x; grouped,
1.02x), so a batch's prefill keeps the library's matmuls for its layers over every token; under VTW its
layers from K, over the kept tokens (a few dozen rows), run tuned (compiled_prefill; a batch of eight at K=5: 0.97x).

The cost:
- compiling takes ~2x longer (~55 s per graph on two cores);
- the weights are constants of the graph: a change made to them in place after the first call is not seen (load
  the model again instead), and each graph holds its own packed copy of the weights;
- the GEMM templates are CPU code: on other devices the engine runs as the plain compiled one;
- where inductor cannot build them (a compiler without the CPU's instructions, say), the model warns once and runs
  the plain compiled graphs from then on.

Only the templates compete (no library matmul): with both, inductor's timing picked oneDNN's packed matmul for the
588-row layers, which in the model's sequence ran at half the speed of its isolated benchmark. A matmul the
templates cannot take (a weight that is not constant, a symbolic width) stays the library call.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch import nn

TUNED_OPTIONS: dict[str, Any] = {
    "freezing": True,  # weights become constants, packed once
    "max_autotune": True,  # matmuls from templates
    "max_autotune_gemm_backends": "CPP",
    # Matmuls of one input (q, k, v; gate and up) as one grouped GEMM, SwiGLU in its epilogue: one pass over the
    # activations instead of three (one prompt's prefill 0.92x, its first token 0.95x at two threads).
    "cpp.enable_grouped_gemm_template": True,
}


def tuned(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled` (a torch.compile'd function) called with the tuned options in force: they must hold while dynamo
    traces and while inductor compiles (freezing bakes the weights into the graph, so each model needs graphs of
    its own: engine.per_model gives them). Give it a compiled function of its own (its own `per_model`): compiled
    graphs are cached per function."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with inductor_config.patch(TUNED_OPTIONS):
            return compiled(*args, **kwargs)

    return run


def tuned_kernels_apply(device: torch.device) -> bool:
    """Whether the tuned kernels exist for `device` (inductor's GEMM templates are CPU code)."""
    return device.type == "cpu"


_failed: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose tuned graphs did not compile


def run_tuned(
    model: nn.Module, tuned_fn: Callable[..., Any], plain_fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[Any, bool]:
    """`tuned_fn(model, *args, **kwargs)` where the tuned kernels apply to `model` (a model or one of its modules),
    else `plain_fn(model, *args, **kwargs)`; returns the result and whether the tuned graph ran. A compiler failure
    (dynamo's or inductor's errors) costs speed, not the answer: it warns once and the model runs `plain_fn` from
    then on."""
    if model not in _failed and tuned_kernels_apply(next(model.parameters()).device):
        try:
            return tuned_fn(model, *args, **kwargs), True
        except torch._dynamo.exc.TorchDynamoException as error:
            _failed.add(model)
            warnings.warn(f"the tuned kernels did not compile ({type(error).__name__}: {str(error)[:200]}); the "
                          "compiled engine's graphs run instead", RuntimeWarning, stacklevel=2)  # fmt: skip
    return plain_fn(model, *args, **kwargs), False
