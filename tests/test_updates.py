"""The update: the update-to-weight ratio per layer, and the rules judged from it (GW105
not-updated, GW106 diverging, GW109 tiny-updates, and GW102 under Adam). Real, small
training runs on the digits."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import gradwatch
from gradwatch.cli import main as cli_main
from gradwatch.report import print_report, value_text
from gradwatch.reporters.jsonl import read_record
from gradwatch.reporters.metrics import DEFAULT_STATS, LayerSelection

from .support import digits, mlp

UPDATE_CODES = ("GW105", "GW106", "GW109")


def _alarms(watcher):
    return [f for f in watcher.findings if f.severity != "info" and f.status != "resolved"]


def _codes(watcher):
    return sorted({f.code for f in _alarms(watcher)})


def _run(
    model,
    make_optimizer,
    *,
    steps,
    every=5,
    batch=64,
    schedule=None,
    tell=True,
    loss_scale=1.0,
    data=None,
    before_step=None,
    seed=0,
):
    """Train on digits with watcher.step(loss=) between backward and the optimizer step;
    the optimizer's zero_grad() clears only its own parameters, as in most loops."""
    x, y = digits() if data is None else data
    optimizer = make_optimizer(model)
    scheduler = schedule(optimizer) if schedule is not None else None
    watcher = gradwatch.watch(
        model, every_n_steps=every, reporters=[], optimizer=optimizer if tell else None
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        if before_step is not None:
            x, y = before_step(step, x, y)
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) * loss_scale
        optimizer.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    watcher.close()
    return watcher, losses


def _model(depth=4, seed=0, **options):
    torch.manual_seed(seed)
    return mlp(depth, init="kaiming", **options)


# -- the ratio itself ------------------------------------------------------------------


def test_update_ratio_is_the_optimizer_step_over_the_weights():
    # SGD moves the weights by lr x gradient: the ratio measured from a sample of the
    # weights must match |lr g| / |w| computed on the whole weight matrices.
    model = _model(3, width=256)
    x, y = digits()
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    expected = {}
    for step in range(6):
        optimizer.zero_grad()
        batch = slice(step * 64, step * 64 + 64)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        watcher.step()
        if step == 0:
            assert all(s.update_ratio is None for s in watcher.latest)  # no step seen yet
        if step == 4:  # the step whose update the monitored step 5 measures
            for name in ("0", "2", "4"):
                weight = model.get_submodule(name).weight  # a module's largest tensor
                expected[name] = float((lr * weight.grad).norm() / weight.detach().norm())
        optimizer.step()
    watcher.close()
    assert watcher.latest.step == 5
    for name, ratio in expected.items():
        measured = watcher.latest.layers[name].update_ratio
        # a strided sample of at most 2,048 entries per tensor: a few percent off at most
        assert measured == pytest.approx(ratio, rel=0.1), name
        assert 1e-5 < measured < 1.0
    assert watcher.latest.layers["1"].update_ratio is None  # a ReLU has no weights


def test_steps_measured_back_to_back_each_see_their_own_update():
    # Every step monitored: each step's sample of the weights is both what its own
    # measurement reads and the "before" of the next one. A learning rate that changes
    # at every step makes each step's ratio its own: one step's sample taken for another
    # would show. Layers of at most 2,048 weights are sampled whole: the ratio is exact.
    model = _model(3, width=32)
    x, y = digits()
    rates = [0.05, 0.4, 0.01, 0.2, 0.1, 0.3]
    optimizer = torch.optim.SGD(model.parameters(), lr=rates[0])
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    expected: dict[int, float] = {}
    measured: dict[int, float] = {}
    for step, lr in enumerate(rates):
        optimizer.zero_grad()
        batch = slice(step * 64, step * 64 + 64)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        watcher.step()
        if step > 0:  # what this step measured: the update of the step before
            measured[step] = watcher.latest.layers["2"].update_ratio
        weight = model.get_submodule("2").weight
        expected[step + 1] = float((lr * weight.grad).norm() / weight.detach().norm())
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    watcher.close()
    assert len(measured) == len(rates) - 1
    for step, ratio in measured.items():
        assert ratio == pytest.approx(expected[step], rel=1e-4), step


def test_the_update_ratio_travels_to_metrics_records_and_the_report(tmp_path):
    model = _model()
    path = tmp_path / "run.jsonl"
    x, y = digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    watcher = gradwatch.watch(
        model, every_n_steps=5, reporters=[gradwatch.JsonlRecorder(path)], optimizer=optimizer
    )
    for step in range(21):
        optimizer.zero_grad()
        batch = slice(step * 32, step * 32 + 32)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        watcher.step()
        optimizer.step()
    watcher.close()
    latest = watcher.latest
    ratio = latest.layers["0"].update_ratio
    assert ratio is not None and 1e-5 < ratio < 0.1
    assert "update_ratio" in DEFAULT_STATS
    metrics = LayerSelection(DEFAULT_STATS, None).metrics(latest, "gradwatch")
    assert metrics["gradwatch/update_ratio/0"] == ratio
    recorded = read_record(path)
    assert recorded.steps[-1].layers["0"].update_ratio == pytest.approx(ratio)
    assert recorded.steps[0].layers["0"].update_ratio is None  # the first step: no update yet
    out = io.StringIO()
    print_report(recorded, path, Console(file=out, width=160))
    text = out.getvalue()
    assert "update / weight ratio" in text
    assert value_text(ratio) in text.split("update / weight ratio", 1)[1]


@pytest.mark.parametrize("code", UPDATE_CODES)
def test_explain_covers_the_update_rules(capsys, code):
    assert cli_main(["explain", code]) == 0
    out = capsys.readouterr().out
    assert code in out and "When it stays silent" in out


# -- divergence under any optimizer ---------------------------------------------------


def _ramp(optimizer, steps=100):
    """A warm-up that overshoots: the lr grows 1000x over 100 steps up to its setting."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, 1e-3 * 1000 ** (s / steps))
    )


@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda m: torch.optim.Adam(m.parameters(), lr=1.0), id="adam"),
        pytest.param(lambda m: torch.optim.AdamW(m.parameters(), lr=3.0), id="adamw"),
        pytest.param(lambda m: torch.optim.SGD(m.parameters(), lr=5.0), id="sgd"),
    ],
)
def test_divergence_is_found_before_the_loss_peaks(make_optimizer):
    watcher, losses = _run(_model(), make_optimizer, steps=110, schedule=_ramp)
    finite = [v if math.isfinite(v) else math.inf for v in losses]
    peak = max(range(len(finite)), key=lambda i: finite[i])
    assert finite[peak] > 3 * finite[0]  # it did diverge
    found = [f for f in _alarms(watcher) if f.code == "GW106"]
    assert found, _codes(watcher)
    assert found[0].step < peak
    at = next(s for s in watcher.history.last(1000) if s.step == found[0].step)
    lr_now = at.optimizer.lr
    assert f"lr={lr_now:g}" in found[0].hint  # the user's own learning rate


# -- parameters the optimizer never updates ---------------------------------------------


def _head_replaced(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model[6] = nn.Linear(64, 10)  # after the optimizer was built: not in it
    return optimizer


@pytest.mark.parametrize(
    ("make_optimizer", "tell", "reason"),
    [
        pytest.param(_head_replaced, True, "6.weight (not in the optimizer)", id="head-replaced"),
        pytest.param(
            lambda m: torch.optim.Adam(m[:6].parameters(), lr=1e-3),
            True,
            "6.bias (not in the optimizer)",
            id="optimizer-on-the-backbone",
        ),
        pytest.param(
            lambda m: torch.optim.SGD(
                [{"params": m[:6].parameters()}, {"params": m[6].parameters(), "lr": 0.0}],
                lr=0.05,
            ),
            True,
            "6.weight (lr is 0 in param group 1)",
            id="lr-0-group",
        ),
        pytest.param(_head_replaced, False, "did not change", id="head-replaced-optimizer-unknown"),
    ],
)
def test_parameters_the_optimizer_never_updates(make_optimizer, tell, reason):
    # zero_grad() clears only the optimizer's parameters: the head's gradient piles up
    # step after step. That is not an explosion, nor do the other layers vanish.
    watcher, _ = _run(_model(), make_optimizer, steps=200, tell=tell)
    alarms = _alarms(watcher)
    assert [f.code for f in alarms] == ["GW105"], [(f.code, f.message) for f in alarms]
    assert alarms[0].layers == ("6",)
    assert reason in alarms[0].message
    assert alarms[0].step <= (10 if tell else 25)


# -- uniformly tiny updates --------------------------------------------------------------


def test_uniformly_tiny_updates_are_found():
    # A loss scaled far down (as a saturating loss does) leaves every layer's gradient
    # tiny alike: GW101's depth profile is flat, the steps are not.
    watcher, _ = _run(
        _model(), lambda m: torch.optim.SGD(m.parameters(), lr=0.01), steps=60, loss_scale=1e-5
    )
    assert _codes(watcher) == ["GW109"]
    finding = next(f for f in _alarms(watcher) if f.code == "GW109")
    assert finding.evidence["max_update_ratio"] < 1e-6
    assert "lr=0.01" in finding.hint


# -- silence: healthy runs ----------------------------------------------------------------


def _warm_up(step):
    return min(1.0, (step + 1) / 100)


def _curriculum(step, x, y):
    """Digits 0-4 first; at step 150 all ten: the loss jumps once, then recovers."""
    if step == 0:
        keep = y < 5
        return x[keep], y[keep]
    if step == 150:
        return digits()
    return x, y


@pytest.mark.parametrize(
    ("make_optimizer", "options"),
    [
        pytest.param(
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-3), {"batch": 8}, id="adam-batch-8"
        ),
        pytest.param(
            lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
            {"schedule": lambda o: torch.optim.lr_scheduler.LambdaLR(o, _warm_up)},
            id="warm-up",
        ),
        pytest.param(
            lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
            {"schedule": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=50)},
            id="sgdr",
        ),
        pytest.param(
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
            {"schedule": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=300)},
            id="cosine-to-0",
        ),
        pytest.param(
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
            {"schedule": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=300)},
            id="adam-cosine-to-0",
        ),
        pytest.param(
            lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
            {"before_step": _curriculum},
            id="curriculum",
        ),
    ],
)
def test_healthy_training_is_silent(make_optimizer, options):
    watcher, losses = _run(_model(), make_optimizer, steps=300, **options)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])  # it learnt
    assert _alarms(watcher) == [], [(f.code, f.step, f.message) for f in _alarms(watcher)]
    measured = [
        stats for stats in watcher.history.last(1000) if any(s.update_ratio for s in stats)
    ]
    assert len(measured) >= 50  # the update was measured all along


def test_a_converged_model_taking_tiny_steps_is_silent():
    # Fit a small set, then keep training with plain SGD: the gradients, and so the
    # steps, become tiny; the loss (passed) says that is convergence.
    model = _model()
    x, y = digits()
    x, y = x[:128], y[:128]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    for step in range(400):
        if step == 250:
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        watcher.step(loss=loss, optimizer=optimizer)
        optimizer.step()
    watcher.close()
    assert float(loss.detach()) < 1e-3
    tiny = max(s.update_ratio for s in watcher.latest if s.update_ratio is not None)
    assert tiny < 1e-6  # the steps are as small as in the flat-vanishing case
    assert _alarms(watcher) == [], [(f.code, f.step, f.message) for f in _alarms(watcher)]


# -- GW102 given the real optimizer ---------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda m: torch.optim.Adam(m.parameters(), lr=1e-4), id="adam"),
        pytest.param(lambda m: torch.optim.SGD(m.parameters(), lr=1e-4), id="sgd-small-lr"),
    ],
)
def test_an_exploding_initialisation_is_found_whatever_the_optimizer(make_optimizer):
    # Weights three times too large: the backward signal grows ~1000x from the last layer
    # to the first. Adam bounds its steps, and SGD's first huge steps rewrite the weights
    # and hide it; the network is broken whatever the lr, and that shows at step 0.
    watcher, _ = _run(_model(12, std=0.4), make_optimizer, steps=30, every=15)
    growth = [f for f in _alarms(watcher) if f.code == "GW102"]
    assert growth and growth[0].step == 0
    assert "grows" in growth[0].message


def test_a_corrupted_batch_under_adamw_is_found_at_once():
    def corrupt(step, x, y):
        if step == 120:
            return x * 1000.0, y
        if step == 121:
            return digits()
        return x, y

    watcher, _ = _run(
        _model(),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        steps=150,
        every=15,
        before_step=corrupt,
    )
    spikes = [f for f in _alarms(watcher) if f.code == "GW102"]
    assert spikes and spikes[0].step == 120


def test_a_part_that_a_second_optimizer_updates_is_not_reported():
    # Two optimizers (a GAN's, or a separate one for the head): gradwatch is told of one;
    # the other part's weights move all the same, so they are not "never updated".
    model = _model()
    x, y = digits()
    body = torch.optim.SGD(model[:6].parameters(), lr=0.05)
    head = torch.optim.Adam(model[6].parameters(), lr=1e-3)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[], optimizer=body)
    for step in range(60):
        batch = slice(step * 16, step * 16 + 64)
        body.zero_grad()
        head.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        watcher.step()
        body.step()
        head.step()
    watcher.close()
    assert watcher.latest.layers["6"].update_ratio > 0
    assert _alarms(watcher) == [], [(f.code, f.message) for f in _alarms(watcher)]


def test_sgdr_restarts_at_a_high_learning_rate_are_silent():
    """Each restart lifts a loss near its floor 2-4x while a step changes the weights by
    ~2% (SGD with momentum at lr 0.2): a restart, not a divergence."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(23)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60)
    watcher = gradwatch.watch(model, optimizer=opt, every_n_steps=5, reporters=[])
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        idx = torch.randint(0, len(x), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    watcher.close()
    assert max(losses[125:135]) > 2 * min(losses[100:120])  # the restart lifted the loss
    assert sum(losses[-20:]) < 0.2 * sum(losses[:20])  # and it learnt
    assert _alarms(watcher) == [], [(f.code, f.step, f.message) for f in _alarms(watcher)]
