"""engine.per_model: a compiled function per model, without guards on its modules, never runs one model's graph for
another."""

from __future__ import annotations

import gc

import torch
from torch import nn

from vtw_core.engine.per_model import per_model


class Scaled(nn.Module):
    """A layer with a plain Python number the trace bakes into its graph (guarded on the module, so left unchecked)."""

    def __init__(self, width: int, scale: float):
        super().__init__()
        self.linear, self.scale = nn.Linear(width, width), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).relu() + 1


def test_each_model_runs_its_own_graph():
    compiled = per_model(run, dynamic=False)
    torch.manual_seed(0)
    models = [Scaled(4, 1.0), Scaled(4, 3.0), Scaled(6, 2.0)]  # the same class; other constants, other shapes
    with torch.no_grad():
        for _ in range(2):
            for model in models:
                x = torch.randn(2, model.linear.in_features)
                torch.testing.assert_close(compiled(model, x), run(model, x))
    assert len({id(f) for f in compiled._compiled.values()}) == 3


def test_the_guards_on_the_models_modules_are_left_out_and_a_model_that_goes_takes_its_graphs():
    compiled = per_model(run, dynamic=False)
    model = Scaled(4, 2.0)
    with torch.no_grad():
        compiled(model, torch.randn(2, 4))
        model.scale = 5.0  # a module attribute changed after the first call is not seen (the documented cost)
        x = torch.randn(2, 4)
        torch.testing.assert_close(compiled(model, x), (model.linear(x) * 2.0).relu() + 1)
    del model
    gc.collect()
    assert len(compiled._compiled) == 0


def test_threads_calling_first_at_once_share_one_copy(monkeypatch):
    import threading
    import time

    from vtw_core.engine import per_model as module

    made = []
    real = torch.compile

    def slow_compile(fn, **options):
        made.append(fn)
        time.sleep(0.05)  # a window for another thread's first call
        return real(fn, **options)

    monkeypatch.setattr(module.torch, "compile", slow_compile)
    compiled, model = per_model(run, dynamic=False), Scaled(4, 2.0)
    threads = [threading.Thread(target=compiled._for, args=(model,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len(compiled._compiled) == 1
