"""Everyday training setups that must neither break nor fool gradwatch: fp16 with a loss
scaler, saving or copying a watched model, float64, sparse gradients, models that change
while they train, activation checkpointing, tied weights."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwatch

from .support import digits, mlp, train


def _alarms(watcher, code=None):
    return [
        f
        for f in watcher.findings
        if f.severity in ("warning", "error") and (code is None or f.code == code)
    ]


# -- fp16 with a loss scaler ----------------------------------------------------------


def _fp16_run(model, scaler, *, steps=45, poison=False, watch_scaler=True, every=5):
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(
        model, reporters=[], every_n_steps=every, scaler=scaler if watch_scaler else None
    )
    generator = torch.Generator().manual_seed(0)
    scales, checked = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x[idx])
            if poison:  # the model itself produces Inf/NaN, whatever the scale
                out = out * torch.log(torch.zeros(()))
            loss = nn.functional.cross_entropy(out.float(), y[idx])
        opt.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        true_norm = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
        watcher.step(optimizer=opt, loss=loss)
        if watcher.latest is not None and watcher.latest.step == len(scales):
            checked.append((watcher.latest.global_grad_norm, true_norm / scale))
        scales.append(scale)
        scaler.step(opt)
        scaler.update()
    watcher.close()
    return watcher, scales, checked


def test_fp16_loss_scaler_calibration_is_not_a_nan_error():
    # A large initial scale makes the scaler overflow, skip and halve for several steps,
    # as it does in real fp16 training: a normal part of AMP, not a broken model.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    watcher, scales, checked = _fp16_run(mlp(6, nn.ReLU, init="kaiming"), scaler)
    assert scales[0] > scales[-1]  # it did skip steps (the scale fell)
    assert _alarms(watcher) == []
    assert watcher.latest.loss_scale == scales[-1]
    # statistics are of the unscaled gradients
    finite = [(seen, true) for seen, true in checked if math.isfinite(true)]
    assert finite and all(seen == pytest.approx(true, rel=1e-3) for seen, true in finite)


def test_a_model_that_produces_nan_under_the_scaler_is_still_an_error():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    watcher, _, _ = _fp16_run(mlp(6, nn.ReLU, init="kaiming"), scaler, poison=True)
    errors = _alarms(watcher, "GW103")
    assert errors and errors[0].severity == "error" and errors[0].step == 0
    assert "loss" in errors[0].message


def test_a_collapsing_loss_scale_is_an_error_even_without_the_loss():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    model = mlp(4, nn.ReLU, init="kaiming")
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=5, scaler=scaler)
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x[:32]) * torch.log(torch.zeros(()))
            loss = nn.functional.cross_entropy(out.float(), y[:32])
        opt.zero_grad()
        scaler.scale(loss).backward()
        watcher.step(optimizer=opt)  # no loss=: only the scale tells
        scaler.step(opt)
        scaler.update()
    watcher.close()
    collapse = [f for f in _alarms(watcher, "GW103") if "loss scale" in f.message]
    assert collapse and collapse[0].severity == "error"
    assert collapse[0].evidence["loss_scale"] < 1


def test_without_the_scaler_the_same_run_shows_scaled_nan_gradients():
    # What gradwatch would say if it did not know the scaler: the Inf gradients of the
    # calibration look like a broken model. Knowing it is what keeps the run quiet.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    watcher, _, _ = _fp16_run(mlp(6, nn.ReLU, init="kaiming"), scaler, watch_scaler=False)
    assert _alarms(watcher, "GW103")


# -- saving and copying a watched model -----------------------------------------------


def test_a_watched_model_can_be_saved_pickled_and_copied_at_every_step():
    model = mlp(4, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=3, detail_every=1)
    saved = []

    def save(step):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        saved.append(len(pickle.dumps(model)))
        copy.deepcopy(model)

    train(model, watcher, steps=10, before_step=save)
    watcher.close()
    save(10)
    assert len(saved) == 11
    restored = pickle.loads(pickle.dumps(model))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in restored.modules())


def test_an_ema_copy_running_forward_never_reaches_the_watcher():
    model = mlp(4, nn.ReLU, init="kaiming")
    teacher = copy.deepcopy(model)  # e.g. an EMA teacher, made after watch() below
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=2, detail_every=1)
    teacher = copy.deepcopy(model)
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(8):
        out = model(x[:32])
        target = teacher(x[:32]).detach()  # the copy's forward, with gradients enabled
        loss = nn.functional.cross_entropy(out, y[:32]) + (out - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt)
        opt.step()
    monitored = list(watcher.history)
    watcher.close()
    assert [s.step for s in monitored] == [0, 2, 4, 6]
    assert all(s.layers[name].calls == 1 for s in monitored for name in ("0", "1", "6"))
    copied = copy.deepcopy(model)
    assert all(not m._forward_hooks for m in copied.modules())


def test_a_watched_model_can_be_scripted():
    model = mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    train(model, watcher, steps=2)
    scripted = torch.jit.script(model)  # hooks are armed right now, for the next step
    x, _ = digits()
    assert torch.allclose(scripted(x[:4]), model(x[:4]))
    watcher.close()


# -- dtypes and gradient layouts ------------------------------------------------------


def test_a_float64_model_is_measured():
    model = mlp(30, nn.Sigmoid).double()
    x, y = digits()
    watcher = gradwatch.watch(model, reporters=[])
    train(model, watcher, steps=46, lr=0.1, x=x.double(), y=y)
    watcher.close()
    assert watcher.disabled == {}
    first = watcher.latest.layers["0"]
    assert first.grad_norm is not None and first.grad_norm > 0  # float64 keeps it above 0
    finding = next(f for f in watcher.findings if f.code == "GW101")
    assert finding.layers[0] == "0"


class SparseBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16, sparse=True)
        self.head = nn.Linear(16, 10)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(1))


def test_sparse_embedding_gradients_are_measured():
    torch.manual_seed(0)
    model = SparseBag()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    sparse_opt = torch.optim.SparseAdam(list(model.embed.parameters()), lr=1e-2)
    dense_opt = torch.optim.Adam(list(model.head.parameters()), lr=1e-2)
    tokens = torch.randint(0, 30, (64, 8))
    labels = tokens[:, 0] % 10
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(tokens), labels)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        expected = float(model.embed.weight.grad.coalesce().values().norm())
        watcher.step()
        sparse_opt.step()
        dense_opt.step()
    watcher.close()
    assert watcher.disabled == {}
    embed = watcher.latest.layers["embed"]
    assert embed.grad_norm == pytest.approx(expected, rel=1e-5)
    detailed = [s for s in watcher.history if s.detail][-1].layers["embed"]
    # tokens 30-49 never occur: their 20 rows of 16 values have no gradient
    assert detailed.grad_zero_fraction == pytest.approx(20 / 50, abs=0.02)


def test_a_failure_message_is_one_short_line(monkeypatch):
    model = mlp(3)
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)

    def boom(*args, **kwargs):
        raise NotImplementedError("operator failed\n" + "dispatcher detail\n" * 500)

    monkeypatch.setattr(watcher._collector, "measure", boom)
    with pytest.warns(gradwatch.GradwatchWarning) as caught:
        train(model, watcher, steps=2)
    watcher.close()
    text = str(caught[0].message)
    assert "\n" not in text and len(text) < 300
    assert "operator failed" in text


# -- models that change while they train ----------------------------------------------


def test_freezing_and_unfreezing_mid_run_is_followed():
    model = mlp(4, nn.ReLU, init="kaiming")
    model[0].requires_grad_(False)  # frozen at first: not watched
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=5)
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    grad_at = {}
    for step in range(60):
        if step == 20:
            model[0].requires_grad_(True)  # unfreeze the first layer
        if step == 40:
            model[2].requires_grad_(False)  # freeze the second
            model[2].zero_grad(set_to_none=True)
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        watcher.step(optimizer=opt)
        opt.step()
        if watcher.latest is not None:
            grad_at[watcher.latest.step] = watcher.latest.layers.get("0")
    watcher.close()
    assert grad_at[15] is None or grad_at[15].grad_norm is None  # frozen: not measured
    assert grad_at[20].grad_norm > 0 and grad_at[55].grad_norm > 0  # measured once unfrozen
    assert _alarms(watcher) == []  # freezing is not "no gradient"


def test_a_replaced_head_is_watched_and_the_old_one_forgotten():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    notices = []

    class Notes(gradwatch.Reporter):
        def notice(self, text):
            notices.append(text)

    watcher = gradwatch.watch(model, reporters=[Notes()], every_n_steps=5)
    old_head = model[2]

    def replace(step):
        if step == 12:
            model[2] = nn.Linear(64, 10)

    train(model, watcher, steps=30, before_step=replace)
    watcher.close()
    assert model[2] is not old_head
    latest = watcher.latest.layers["2"]
    assert latest.grad_norm > 0 and latest.missing_grad == ()
    assert len(notices) == 1 and "replaced: 2" in notices[0]
    # The optimizer was built before the head was replaced: the new head is not in it.
    alarms = _alarms(watcher)
    assert [(f.code, f.layers) for f in alarms] == [("GW105", ("2",))]
    assert "2.weight (not in the optimizer)" in alarms[0].message


def test_the_terminal_says_once_that_the_watched_layers_changed():
    model = mlp(3, nn.ReLU, init="kaiming")
    model[0].requires_grad_(False)
    out = io.StringIO()
    watcher = gradwatch.watch(
        model, reporters=[gradwatch.TerminalReporter(file=out, summary=False)], every_n_steps=5
    )

    def unfreeze(step):
        if step == 7:
            model[0].requires_grad_(True)

    train(model, watcher, steps=30, before_step=unfreeze)
    watcher.close()
    lines = [line for line in out.getvalue().splitlines() if "watched layers changed" in line]
    assert lines == ["gradwatch: the watched layers changed at step 10 (unfrozen: 0)"]


def test_an_appended_block_is_watched():
    blocks = nn.ModuleList([nn.Linear(64, 64)])

    class Growing(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = blocks
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block(x))
            return self.head(x)

    model = Growing()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=5)

    def grow(step):
        if step == 8:
            blocks.append(nn.Linear(64, 64))

    train(model, watcher, steps=20, before_step=grow)
    watcher.close()
    assert watcher.latest.layers["blocks.1"].grad_norm > 0


# -- activation checkpointing, tied weights -------------------------------------------


class CheckpointedSigmoid(nn.Module):
    def __init__(self, depth=30, reentrant=True):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64), nn.Sigmoid())
            for i in range(depth - 1)
        )
        self.out = nn.Linear(64, 10)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant:
            x = x.requires_grad_()  # reentrant checkpointing needs an input that requires grad
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.out(x)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_keeps_the_forward_order(reentrant):
    model = CheckpointedSigmoid(reentrant=reentrant)
    watcher = gradwatch.watch(model, reporters=[])
    train(model, watcher, steps=46, lr=0.1)
    watcher.close()
    order = [s.name for s in watcher.latest.by_depth(with_gradient=True)]
    assert order[:3] == ["blocks.0.0", "blocks.1.0", "blocks.2.0"] and order[-1] == "out"
    finding = next(f for f in watcher.findings if f.code == "GW101")
    assert finding.layers[0] == "blocks.0.0"
    sigmoid = watcher.latest.layers["blocks.3.1"]
    assert sigmoid.calls == 1  # recomputation is not counted twice


def test_a_tied_weight_is_counted_once_in_the_global_norm():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 32)
            self.mix = nn.Linear(32, 32)
            self.out = nn.Linear(32, 40, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens):
            return self.out(torch.tanh(self.mix(self.embed(tokens))))

    model = Tied()
    watcher = gradwatch.watch(model, reporters=[], every_n_steps=1)
    tokens = torch.randint(0, 40, (16, 8))
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    true = math.sqrt(sum(float(p.grad.double().norm()) ** 2 for p in model.parameters()))
    watcher.step()
    watcher.close()
    stats = watcher.latest
    assert stats.global_grad_norm == pytest.approx(true, rel=1e-5)
    # both owners still show the shared gradient
    assert stats.layers["out"].grad_norm == pytest.approx(stats.layers["embed"].grad_norm)
