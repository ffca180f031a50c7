"""Older steps of the history keep their layers packed, and read back the same."""

from __future__ import annotations

import gc

import torch
from torch.nn import functional as F

import gradwatch
from gradwatch.history import RECENT_STEPS
from gradwatch.packed_layers import PackedLayers
from gradwatch.stats import LayerStats, StepStats

from .support import digits, mlp


def test_older_steps_read_back_what_was_measured() -> None:
    torch.manual_seed(0)
    x, y = digits()
    x, y = x[:64], y[:64]
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, reporters=[], optimizer=opt, every_n_steps=1)
    measured: list[dict] = []
    for step in range(RECENT_STEPS + 8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        watcher.step(step, loss=loss)
        opt.step()
        measured.append(watcher.latest.to_dict())
    history = list(watcher.history)
    packed = [s for s in history if isinstance(s.layers, PackedLayers)]
    assert len(packed) == len(history) - RECENT_STEPS == 8
    assert all(isinstance(s.layers, dict) for s in history[-RECENT_STEPS:])
    gc.collect()
    # what the garbage collector no longer walks: each layer's row, the index of names
    assert not any(gc.is_tracked(row) for s in packed for row in s.layers._rows)
    assert not any(gc.is_tracked(s.layers._index) for s in packed)
    # every field of every layer, masks included, and the order, as measured
    assert [s.to_dict() for s in history] == measured[-len(history):]
    old = packed[0]
    some = next(iter(old))
    assert isinstance(some, LayerStats) and old.layers[some.name] is some
    assert [s.name for s in old.by_depth()] == list(history[-1].layers)
    assert any(s.active_units is not None for s in old)
    assert StepStats.from_dict(old.to_dict()).to_dict() == old.to_dict()
