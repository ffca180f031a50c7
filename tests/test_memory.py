"""Memory stays flat however long training runs."""

import gc
import tracemalloc

import torch
from torch import nn

import gradwatch

from .support import mlp


def test_memory_does_not_grow_over_10000_steps():
    model = mlp(3, nn.ReLU, width=16, inputs=8, outputs=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    watcher = gradwatch.watch(model, every_n_steps=2, history=64, reporters=[], optimizer=opt)

    def run(steps):
        for _ in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            watcher.step()
            opt.step()

    run(1000)  # fill the history and any caches
    gc.collect()
    tracemalloc.start()
    run(1000)
    gc.collect()
    early, _ = tracemalloc.get_traced_memory()
    run(8000)
    gc.collect()
    late, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    watcher.close()
    assert watcher.latest.step == 9998
    assert len(watcher.history) == 64
    assert late - early < 64 * 1024, f"grew by {late - early} bytes over 8,000 steps"
