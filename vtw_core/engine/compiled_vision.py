"""The vision tower through torch.compile, for the compiled engine's callers only.

The default model's CLIP tower (577 tokens of width 64, three layers) spends most of its ~5.5 ms at one thread
on small operators (layer norms, quick-GELU, residual adds, each one pass over memory); compiled, inductor fuses
them and the tower takes ~4.4 ms, ~29 against ~39 ms for a batch of eight (bf16). The matmuls and the attention
stay on the same library kernels, so the image features agree with the stock tower's to the last bit or two.

With `tuned_kernels` (the tuned engine's choice), the tower's graph is compiled with engine.tuned_kernels' options
instead: its matmuls become inductor's GEMM templates on frozen weights (one image 3.6 against 4.3 ms, eight 23.5
against 24.6 ms; the features within 1e-4 of the stock tower's in float32, where the compiled tower's are within
1e-5: the templates sum in another order).

The tower is called from inside the stock multimodal model (vtw_core.engine.embed runs it up to its decoder), so
it cannot simply be handed a compiled function. Instead its `forward` becomes a router: inside `compiled_vision`
the calling thread gets the compiled graph, every other call (other threads, other engines, the training code)
the stock forward, unchanged. The router is a method bound to the tower, so `copy.deepcopy` rebinds it to the
copy. Only `model.model.vision_tower`s whose inputs are whole images or tiles of one size are compiled (CLIP and
SigLIP: LLaVA-1.5, LLaVA-NeXT's tiles, LLaVA-NeXT-Video, LLaVA-OneVision); the others stay stock: towers that cut
images into variable grids (Qwen2-VL's `visual`, InternVL, Idefics3), where tracing would break on data-dependent
shapes, and Video-LLaVA's separate image and video towers.
"""

from __future__ import annotations

import contextlib
import threading
import types
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from vtw_core.engine.per_model import per_model
from vtw_core.engine.tuned_kernels import run_tuned, tuned

# The tower classes compiled; by class name, as transformers defines them.
COMPILED_TOWERS = frozenset({"CLIPVisionModel", "SiglipVisionModel"})

_inside = threading.local()  # .active: this thread is inside `compiled_vision`; .tuned: with tuned kernels


def _stock_forward(tower: nn.Module, *args, **kwargs):
    return type(tower).forward(tower, *args, **kwargs)


# Symbolic batch (one graph for every number of images or tiles beyond one), called from C++ as the layer loop is.
# Per tower (engine.per_model): no guards on its modules before each call.
_compiled_forward = per_model(_stock_forward, dynamic=True, options={"cpp_wrapper": True})
_tuned_forward = tuned(per_model(_stock_forward, dynamic=True, options={"cpp_wrapper": True}))  # graphs of its own


_failed: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # towers that did not compile: stock from then on


def _routed_forward(self: nn.Module, *args, **kwargs):
    if getattr(_inside, "active", False) and self not in _failed:
        try:
            if getattr(_inside, "tuned", False):  # falls back to the compiled tower where tuned kernels cannot run
                return run_tuned(self, _tuned_forward, _compiled_forward, *args, **kwargs)[0]
            return _compiled_forward(self, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:  # a compiler failure costs speed, not the answer
            _failed.add(self)
            warnings.warn(f"the vision tower did not compile ({type(error).__name__}); it runs uncompiled",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
    return _stock_forward(self, *args, **kwargs)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The model's vision tower when it is one that `compiled_vision` compiles, else None."""
    tower = getattr(getattr(model, "model", None), "vision_tower", None)
    if isinstance(tower, nn.Module) and type(tower).__name__ in COMPILED_TOWERS:
        return tower
    return None


@contextlib.contextmanager
def compiled_vision(model: nn.Module, tuned_kernels: bool = False) -> Iterator[None]:
    """Within the block, this thread's calls of the model's vision tower run compiled (others' stay stock), with
    `tuned_kernels` on the tuned engine's options; nothing changes for towers not in COMPILED_TOWERS."""
    tower = vision_tower(model)
    if tower is not None and "forward" not in vars(tower):
        tower.forward = types.MethodType(_routed_forward, tower)
    if tower is None or getattr(vars(tower)["forward"], "__func__", None) is not _routed_forward:
        yield  # not compiled: no such tower, or its forward is someone else's wrapper (accelerate's offload hooks)
        return
    was = getattr(_inside, "active", False), getattr(_inside, "tuned", False)
    _inside.active, _inside.tuned = True, tuned_kernels
    try:
        yield
    finally:
        _inside.active, _inside.tuned = was
