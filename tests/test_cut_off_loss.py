"""A loss cut off from the model (every .grad stays None) is reported as such, not as a
misplaced watcher.step(); a step that really runs before backward() keeps that wording."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


def _train(cut: bool, hooked: bool, step_before_backward: bool = False) -> tuple[str, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, optimizer=opt if hooked else None, every_n_steps=2)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            logits = model(x)
            if cut:
                logits = logits.detach().requires_grad_()
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            if step_before_backward:
                watcher.step(loss=loss)
            loss.backward()
            if not step_before_backward:
                watcher.step(loss=loss)
            opt.step()
        summary = watcher.summary() if hasattr(watcher, "summary") else None
        watcher.close()
    text = " ".join(str(w.message) for w in caught)
    return text + " " + str(summary), [f.code for f in watcher.findings]


@pytest.mark.parametrize("hooked", [False, True])
def test_detached_logits_blame_the_loss_not_the_step(hooked: bool) -> None:
    text, codes = _train(cut=True, hooked=hooked)
    assert codes == ["GW104"]  # once: the model does not train
    assert "the loss does not reach them" in text
    assert "requires_grad_()" in text
    assert "seems to run before loss.backward()" not in text


def test_step_before_backward_keeps_the_placement_wording() -> None:
    text, codes = _train(cut=False, hooked=False, step_before_backward=True)
    assert codes == []
    assert "seems to run before loss.backward()" in text
    assert "does not reach" not in text


def test_healthy_loop_says_nothing_about_gradients() -> None:
    text, codes = _train(cut=False, hooked=True)
    assert codes == []
    assert "no gradient" not in text and "does not reach" not in text
