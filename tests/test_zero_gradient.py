"""GW108 zero-gradient on real small training runs: every gradient exactly 0 while the
loss is not, with the place where the gradient stops; silent where a zero gradient is
right (a loss of exactly 0), on frozen parts, and on steps a GradScaler skips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from tests import zoo
from tests.support import digits, mlp


def _train(model, loss_fn, *, steps=46, lr=0.05, x=None, y=None, pass_loss=True, every=5,
           optimizer="sgd", **watch):
    torch.manual_seed(0)
    if x is None:
        x, y = digits()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    )
    watcher = gradwatch.watch(model, every_n_steps=every, reporters=[], **watch)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt, loss=loss if pass_loss else None)
        opt.step()
        losses.append(float(loss.detach()))
    watcher.close()
    return watcher, losses


def _found(watcher, code="GW108"):
    return [f for f in watcher.findings if f.code == code and f.severity != "info"]


def _one_hot_bce(out, labels):
    targets = (labels[:, None] == torch.arange(10)).float()
    return nn.functional.binary_cross_entropy(out, targets)


def _sigmoid_net():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Sigmoid())


def test_saturated_sigmoid_under_bceloss_stops_the_gradient_at_the_sigmoid():
    x, y = digits(standardize=False)  # raw pixels 0..16: the output saturates at once
    watcher, losses = _train(_sigmoid_net(), _one_hot_bce, x=x * 16, y=y, lr=0.5)
    found = _found(watcher)
    assert found, watcher.findings
    finding = found[0]
    assert finding.severity == "error"
    assert finding.layers == ("3",)  # the nn.Sigmoid: its output gets a gradient, passes none
    assert finding.evidence["stops_at"] == "3"
    assert finding.evidence["loss"] > 1.0
    assert "saturated" in finding.message and "BCEWithLogitsLoss" in finding.hint
    assert watcher.latest.global_grad_norm == 0.0 and min(losses[-10:]) > 1.0


def _rounded_mse(out, labels):
    return nn.functional.mse_loss(torch.round(out).squeeze(1), labels.float())


def test_round_between_the_model_and_the_loss_stops_the_gradient_at_the_output():
    model = mlp(3, nn.ReLU, outputs=1, init="kaiming")
    watcher, _ = _train(model, _rounded_mse)
    found = _found(watcher)
    assert found, watcher.findings
    assert found[0].evidence["stops_at"] == "output"
    assert found[0].layers == ("4",)  # the last module to run
    assert "round" in found[0].hint


def test_a_mask_that_zeroes_the_loss_input_later_asks_for_a_closer_look():
    # The mask turns on after the first three monitored steps (the only detail steps by
    # schedule, before detail_every): the zeros themselves must ask for the backward
    # signal, or where the gradient stops would stay unknown.
    calls = []

    def masked(out, labels):
        calls.append(None)
        mask = torch.zeros_like(out) if len(calls) > 50 else torch.ones_like(out)
        return nn.functional.cross_entropy(out * mask, labels)

    watcher, _ = _train(mlp(3, nn.ReLU, init="kaiming"), masked, steps=106, every=15)
    found = _found(watcher)
    assert found, watcher.findings
    assert found[0].evidence["stops_at"] == "output" and found[0].step == 90
    assert found[0].evidence["seen_at_step"] > 50


def test_gradients_cleared_before_step_are_told_apart():
    model = mlp(3, nn.ReLU, init="kaiming")
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    for step in range(16):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        watcher.step(loss=loss)  # too late: the gradients are zeros by now
    watcher.close()
    found = _found(watcher)
    assert found and found[0].evidence["stops_at"] == "4"
    assert "before optimizer.zero_grad()" in found[0].hint


def test_without_the_loss_a_gradient_zero_from_the_first_step_is_still_found():
    watcher, _ = _train(mlp(3, nn.ReLU, outputs=1, init="kaiming"), _rounded_mse,
                        pass_loss=False)
    found = _found(watcher)
    assert found and found[0].evidence["loss"] is None


def test_without_the_loss_a_gradient_stopped_inside_the_model_is_still_found():
    # step 0 learns (and ruins the weights); from then on the loss sends a huge gradient
    # to the saturated sigmoid and nothing passes it: no optimum looks like that
    x, y = digits(standardize=False)
    watcher, _ = _train(_sigmoid_net(), _one_hot_bce, x=x * 16, y=y, lr=0.5, pass_loss=False)
    found = _found(watcher)
    assert found and found[0].evidence["stops_at"] == "3"
    assert "not passed" in found[0].message


def _separable(n=256):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g) + 6.0 * (labels[:, None].float() * 2 - 1)
    return x, labels


@pytest.mark.parametrize("pass_loss", [True, False])
def test_silent_when_the_loss_reaches_exactly_zero(pass_loss):
    # a hinge loss on separable data: every margin met, loss and gradient exactly 0
    x, y = _separable()
    watcher, losses = _train(nn.Linear(2, 2), nn.MultiMarginLoss(), x=x, y=y, steps=60,
                             lr=0.1, pass_loss=pass_loss)
    assert losses[-1] == 0.0 and watcher.latest.global_grad_norm == 0.0
    assert not _found(watcher), watcher.findings


def test_silent_on_frozen_parts():
    watcher, _ = _train(zoo.FrozenBackbone(), nn.functional.cross_entropy, steps=60)
    assert not _found(watcher)
    assert {f.code for f in watcher.findings} == set()


def test_silent_on_steps_a_grad_scaler_skips():
    # fp16 autocast on the CPU with a scale far too large: the scaler skips the first
    # steps (Inf/NaN gradients) and halves its scale until the gradients fit
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    model = mlp(3, nn.ReLU, init="kaiming")
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[], scaler=scaler)
    skipped = 0
    for step in range(24):
        idx = torch.arange(step * 64, step * 64 + 64) % len(x)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        watcher.step(optimizer=opt, loss=loss)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < before
    watcher.close()
    assert skipped >= 3  # the scaler really skipped steps (Inf gradients)
    assert not _found(watcher), watcher.findings


def test_a_loss_the_host_cannot_read_at_once_comes_from_the_every_step_check(monkeypatch):
    # On CUDA the watcher does not read a loss tensor (that would wait for the GPU); the
    # every-step check copies it without blocking, and the monitored step takes it there.
    import gradwatch.watcher as watcher_module

    monkeypatch.setattr(watcher_module, "_loss_value", lambda loss: None)
    watcher, losses = _train(mlp(3, nn.ReLU, outputs=1, init="kaiming"), _rounded_mse)
    found = _found(watcher)
    assert found and found[0].evidence["loss"] == pytest.approx(losses[found[0].step])
    assert watcher.latest.loss == pytest.approx(losses[watcher.latest.step])
