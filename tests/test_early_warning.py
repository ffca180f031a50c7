"""Fast failures are found at the step they start, by the every-step sentinel, and healthy
runs with noisy or fast-moving losses stay quiet."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch

from .support import digits, mlp


class ResidualReLU(nn.Module):
    """A deep residual ReLU MLP without normalisation: nothing bounds its growth."""

    def __init__(self, depth: int = 16, width: int = 64):
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        for block in self.blocks:
            h = h + torch.relu(block(h))
        return self.out(h)


def _loop(model, watcher, *, steps, lr_at, batch=64, optimizer="sgd", momentum=0.9,
          poison_at=None, x=None, y=None, stop_at_nan=True):
    """Train; return the first step whose gradients are not finite (or None)."""
    if x is None:
        x, y = digits()
    params = list(model.parameters())
    opt = (
        torch.optim.Adam(params, lr=lr_at(0))
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr_at(0), momentum=momentum)
    )
    generator = torch.Generator().manual_seed(0)
    first_nan = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        inputs = x[idx].clone()
        if step == poison_at:
            inputs[3, 5] = float("nan")  # one bad value in one sample of one batch
        loss = nn.functional.cross_entropy(model(inputs), y[idx])
        opt.zero_grad()
        loss.backward()
        finite = all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        if not finite and first_nan is None:
            first_nan = step
        watcher.step(optimizer=opt, loss=loss)
        if first_nan is not None and stop_at_nan:
            break
        opt.step()
    watcher.close()
    return first_nan


def _first(watcher, code):
    found = [f for f in watcher.findings if f.code == code and f.status == "new"]
    return found[0] if found else None


def test_a_diverging_residual_net_gets_exploding_gradient_before_the_first_nan():
    # It trains for ten steps while the learning rate ramps up (a missing warmup), then
    # the gradient grows ~1000x within three steps, overflows, and is NaN at step 15.
    model = ResidualReLU()
    watcher = gradwatch.watch(model, reporters=[])
    first_nan = _loop(model, watcher, steps=40, lr_at=lambda s: 0.002 + 0.998 * min(1, s / 20))
    assert first_nan is not None and first_nan <= 15  # no monitored step in between
    finding = _first(watcher, "GW102")
    assert finding is not None and finding.step < first_nan
    surge = [f for f in watcher.findings if f.code == "GW102" and "jumped" in f.message]
    assert surge and surge[0].step < first_nan
    assert surge[0].evidence["factor"] > 20
    assert surge[0].evidence["largest_growth_layer"] in surge[0].layers


def test_the_same_run_without_the_sentinel_sees_only_the_nan():
    model = ResidualReLU()
    watcher = gradwatch.watch(model, reporters=[], sentinel=False)
    first_nan = _loop(
        model, watcher, steps=40, lr_at=lambda s: 0.002 + 0.998 * min(1, s / 20),
        stop_at_nan=False,
    )
    early = [f for f in watcher.findings if f.code == "GW102" and f.step < first_nan]
    assert early == []


def test_nan_in_one_input_batch_is_found_at_that_step_and_not_blamed_on_the_weights():
    model = mlp(4, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[])
    _loop(model, watcher, steps=60, lr_at=lambda s: 0.05, poison_at=40, stop_at_nan=False)
    finding = _first(watcher, "GW103")
    assert finding is not None
    assert finding.step == 40  # not 45, the next monitored step
    assert finding.layers[0] == "0"  # the first layer the bad input reached
    assert "first_nonfinite_weights" not in finding.evidence
    assert finding.evidence["weights_finite"] is True
    assert "batch" in finding.hint


def test_a_nan_loss_is_named():
    model = mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[])
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(20):
        loss = nn.functional.cross_entropy(model(x[:32]), y[:32])
        if step == 7:
            loss = loss * torch.log(torch.zeros(()))  # -inf: a broken loss term
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt, loss=loss)
        if step == 7:
            break
    watcher.close()
    finding = _first(watcher, "GW103")
    assert finding.step == 7 and "loss" in finding.message
    assert math.isnan(finding.evidence["loss"]) or math.isinf(finding.evidence["loss"])


# -- healthy runs stay quiet ----------------------------------------------------------


def _quiet(watcher):
    return [f for f in watcher.findings if f.severity in ("warning", "error")]


@pytest.mark.parametrize("batch", [2, 8])
def test_noisy_small_batch_training_is_quiet(batch):
    model = mlp(6, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[])
    _loop(model, watcher, steps=300, lr_at=lambda s: 0.02, batch=batch, momentum=0.0)
    assert _quiet(watcher) == []


def test_warmup_and_cosine_restarts_are_quiet():
    def schedule(step):
        if step < 50:
            return 0.03 * step / 50  # linear warmup
        cycle = (step - 50) % 60  # restarts every 60 steps, back to the peak
        return 0.03 * 0.5 * (1 + math.cos(math.pi * cycle / 60))

    model = mlp(8, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[])
    _loop(model, watcher, steps=300, lr_at=schedule, momentum=0.9)
    assert _quiet(watcher) == []


def test_fine_tuning_at_a_tiny_learning_rate_is_quiet():
    model = mlp(6, nn.GELU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[])
    _loop(model, watcher, steps=200, lr_at=lambda s: 1e-5, optimizer="adam", batch=16)
    assert _quiet(watcher) == []


def test_a_loss_that_falls_by_orders_of_magnitude_is_quiet():
    # Two well separated classes: the loss falls from ~0.7 to ~1e-5, the gradient with it.
    x, y = digits()
    keep = y < 2
    x, y = x[keep], y[keep]
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    watcher = gradwatch.watch(model, reporters=[])
    _loop(model, watcher, steps=400, lr_at=lambda s: 0.5, momentum=0.9, x=x, y=y, batch=32)
    assert watcher.latest.loss < 1e-3
    assert _quiet(watcher) == []
