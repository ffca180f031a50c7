"""The training loop around gradwatch: the optimizer's step hook (one-line plain PyTorch),
a misplaced watcher.step(), gradients carried across optimizer steps (GW107), an
optimizer stepped inside backward, and per-step evidence of never-routed experts.
Real small runs on digits; Lightning and the Transformers Trainer for real."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.reporters import JsonlRecorder, TerminalReporter, read_record

from . import zoo
from .support import digits, hooks_of, mlp


def _sigmoid_net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(20, nn.Sigmoid)


def _batches(steps: int, batch: int = 64, seed: int = 0):
    x, y = digits()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        yield x[idx], y[idx]


def _codes(watcher: gradwatch.Watcher) -> list[str]:
    return [f.code for f in watcher.findings if f.status == "new"]


# -- the optimizer's step hook ----------------------------------------------------------


def test_one_line_plain_pytorch_finds_vanishing_through_the_optimizer_hook():
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = io.StringIO()
    watcher = gradwatch.watch(
        model, optimizer=opt, every_n_steps=5, reporters=[TerminalReporter(file=out)]
    )
    for x, y in _batches(30):  # no watcher.step() anywhere
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    watcher.close()
    assert "GW101" in _codes(watcher)
    assert [s.step for s in watcher.history] == [0, 5, 10, 15, 20, 25]
    assert watcher.coverage.measured == 6 and watcher.coverage.steps == 30
    assert "over 6 measured steps of 30 (20 layers)" in out.getvalue()
    # close() removed the optimizer's hooks: stepping on does nothing of ours
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


class _WeightAtReport(gradwatch.Reporter):
    """What the first layer's weight was when gradwatch measured."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.seen: dict[int, torch.Tensor] = {}

    def report(self, stats, findings):
        self.seen[stats.step] = self.layer.weight.detach().clone()


def test_the_hook_measures_before_the_update_and_with_a_closure():
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    seen = _WeightAtReport(model[0])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    watcher = gradwatch.watch(model, optimizer=opt, every_n_steps=2, reporters=[seen])
    before = {}
    for step, (x, y) in enumerate(_batches(4)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before[step] = model[0].weight.detach().clone()
        opt.step()
    watcher.close()
    assert sorted(seen.seen) == [0, 2]
    assert all(torch.equal(seen.seen[s], before[s]) for s in seen.seen)  # not yet updated

    lbfgs = torch.optim.LBFGS(model.parameters(), lr=0.1)
    watcher = gradwatch.watch(model, optimizer=lbfgs, every_n_steps=1, reporters=[])
    x, y = next(_batches(1))

    def closure():
        lbfgs.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        lbfgs.step(closure)  # the gradients exist only once the closure ran
    watcher.close()
    assert [s.step for s in watcher.history] == [0, 1, 2]
    assert all(s.global_grad_norm > 0 for s in watcher.history)


def test_explicit_step_with_the_optimizer_is_counted_once():
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, optimizer=opt, every_n_steps=5, reporters=[])
    returned = []
    for x, y in _batches(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        returned.extend(watcher.step(loss=loss))  # before optimizer.step(), as documented
        opt.step()
    watcher.close()
    history = list(watcher.history)
    assert [s.step for s in history] == [0, 5, 10, 15]  # one count per optimizer step
    assert all(s.loss is not None and s.loss > 0 for s in history)  # its own loss
    assert watcher.coverage.steps == 20
    assert [f.code for f in returned if f.status == "new"] == ["GW101"]


@pytest.mark.parametrize("where", ["before-backward", "after-optimizer-step", "per-micro-batch"])
def test_explicit_step_in_other_places_leaves_the_step_to_the_optimizer_hook(where):
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, optimizer=opt, every_n_steps=5, reporters=[])
    micro = 2 if where == "per-micro-batch" else 1
    batches = _batches(20 * micro)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: the hook measures in the right place
        for _ in range(20):
            opt.zero_grad()
            if where == "before-backward":
                watcher.step()
            for _micro in range(micro):
                x, y = next(batches)
                loss = nn.functional.cross_entropy(model(x), y) / micro
                loss.backward()
                if where == "per-micro-batch":
                    watcher.step(loss=loss)
            opt.step()
            if where == "after-optimizer-step":
                watcher.step(loss=loss)
    watcher.close()
    assert [s.step for s in watcher.history] == [0, 5, 10, 15]
    assert all(s.global_grad_norm > 0 for s in watcher.history)
    assert watcher.coverage.steps == 20 and not watcher.coverage.nothing_measured
    assert "GW101" in _codes(watcher)


def test_a_watcher_dropped_without_close_leaves_no_hook_on_the_optimizer():
    import gc

    model = zoo.TopOneMoE(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, optimizer=opt, every_n_steps=1, reporters=[])
    x, y = next(_batches(1))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # measured: the carried-gradient check is now waiting for the next step
    assert opt._optimizer_step_pre_hooks
    del watcher
    gc.collect()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    # gradwatch's process-wide optimizer listeners (PyTorch's global hooks dispatch to them)
    from gradwatch import optimizer_events

    assert not optimizer_events._before and not optimizer_events._after
    with pytest.warns(gradwatch.GradwatchWarning, match="dropped without close"):
        gradwatch.watch(model, reporters=[]).close()  # the model is free again


def test_a_failing_step_hook_never_raises_into_training(monkeypatch):
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, optimizer=opt, every_n_steps=1, reporters=[])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(watcher, "_step", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in _batches(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert "optimizer step hook" in watcher.disabled
    watcher.close()


# -- a step() that sees no gradient -----------------------------------------------------


@pytest.mark.parametrize("where", ["before-backward", "after-zero-grad"])
def test_misplaced_step_is_said_once_and_the_summary_says_nothing_was_measured(where):
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = io.StringIO()
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[TerminalReporter(file=out)])
    baseline = hooks_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(_batches(12)):
            loss = nn.functional.cross_entropy(model(x), y)
            if where == "before-backward":
                opt.zero_grad()
                watcher.step()
                loss.backward()
                opt.step()
            else:
                loss.backward()
                opt.step()
                opt.zero_grad()
                watcher.step()
            if step == 6:  # not a monitored step: no hook left armed
                assert hooks_of(model) == baseline
    watcher.close()
    said = [w for w in caught if "found no gradient at all" in str(w.message)]
    assert len(said) == 1
    assert "after loss.backward() and before optimizer.step()" in str(said[0].message)
    assert "found no gradient at all" in out.getvalue()
    assert watcher.coverage.nothing_measured and watcher.coverage.steps == 12
    assert "nothing was measured: watcher.step() ran 12 times" in out.getvalue()
    assert "no findings" not in out.getvalue()


def test_step_after_zero_grad_without_set_to_none_is_said(tmp_path, capsys):
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "run.jsonl"
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[JsonlRecorder(path)])
    with pytest.warns(gradwatch.GradwatchWarning, match="every gradient was exactly 0"):
        for x, y in _batches(12):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            watcher.step()
    watcher.close()
    assert watcher.coverage.nothing_measured
    summary = [line for line in path.read_text().splitlines() if '"summary"' in line]
    assert '"nothing_measured": true' in summary[0]
    # GW108 (every gradient exactly 0) may name the same cause from the gradients' side;
    # nothing else is found on gradients that were never there to measure.
    assert {f.code for f in watcher.findings} <= {"GW108"}
    assert all("zero_grad" in f.message + f.hint for f in watcher.findings)
    record = read_record(path)
    assert [row.code for row in record.summary] in ([], ["GW108"])
    assert record.coverage is not None
    assert record.coverage.nothing_measured and record.coverage.steps == 12
    from gradwatch.cli import main

    assert main(["report", str(path)]) == 0
    assert "nothing was measured" in " ".join(capsys.readouterr().out.split())


def test_summary_counts_measured_steps_and_layers(caplog):
    model = _sigmoid_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, every_n_steps=4, reporters=[gradwatch.LoggingReporter()])
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        for x, y in _batches(12):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            watcher.step()
            opt.step()
        watcher.close()
    closing = [r.getMessage() for r in caplog.records if "gradwatch closed" in r.getMessage()]
    assert closing and "over 3 measured steps of 12 (20 layers)" in closing[0]


# -- gradients carried across optimizer steps (GW107) -----------------------------------


def _carried_run(clear, *, steps=32, accumulate=1, hooked=False, every=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    options = {"optimizer": opt} if hooked else {}
    watcher = gradwatch.watch(model, every_n_steps=every, reporters=[], **options)
    batches = _batches(steps * accumulate, batch=16)
    for _ in range(steps):
        for _micro in range(accumulate):
            x, y = next(batches)
            (nn.functional.cross_entropy(model(x), y) / accumulate).backward()
        if not hooked:
            watcher.step()
        opt.step()
        clear(model, opt)
    watcher.close()
    return watcher


def _checked(watcher):
    return sum(s.carry_checked for s in watcher.history)


@pytest.mark.parametrize("hooked", [False, True])
def test_forgotten_zero_grad_is_found_exactly(hooked):
    watcher = _carried_run(lambda model, opt: None, hooked=hooked)
    found = [f for f in watcher.findings if f.code == "GW107"]
    assert found and found[0].step == 5  # the first monitored step after the check
    assert set(found[0].layers) == {"0", "2", "4"}
    assert "every checked layer" in found[0].message
    assert "optimizer.zero_grad()" in found[0].hint


def test_clearing_only_part_of_the_model_names_the_rest():
    watcher = _carried_run(lambda model, opt: model[4].zero_grad())
    found = [f for f in watcher.findings if f.code == "GW107"]
    assert found and set(found[0].layers) == {"0", "2"}
    assert "2 of 3 checked layers" in found[0].message
    assert "model.zero_grad()" in found[0].hint


def test_one_parameter_group_left_uncleared_is_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    body = torch.optim.SGD(model[0].parameters(), lr=0.01)
    head = torch.optim.Adam(model[2].parameters(), lr=1e-3)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    for x, y in _batches(20, batch=16):
        nn.functional.cross_entropy(model(x), y).backward()
        watcher.step()
        body.step()
        head.step()
        head.zero_grad()  # body's gradients are never cleared
    watcher.close()
    found = [f for f in watcher.findings if f.code == "GW107"]
    assert found and found[0].layers == ("0",)


@pytest.mark.parametrize("hooked", [False, True])
def test_intended_accumulation_in_plain_pytorch_is_silent(hooked):
    watcher = _carried_run(
        lambda model, opt: opt.zero_grad(), accumulate=4, hooked=hooked, every=3
    )
    assert _checked(watcher) > 0  # the check ran ...
    assert "GW107" not in _codes(watcher)  # ... and found every step cleared


def test_carried_gradients_keep_the_relu_hooks_on_a_dying_layer():
    # With piled-up gradients a unit that dies keeps its old, non-zero weight-gradient
    # row: the rows no longer show dead units, so the ReLU must stay watched through its
    # activations (without that, this layer's death goes unreported).
    torch.manual_seed(0)
    model = mlp(4, nn.ReLU, init="kaiming")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watcher = gradwatch.watch(model, every_n_steps=3, reporters=[])
    for step, (x, y) in enumerate(_batches(45, batch=32)):
        if step == 12:
            with torch.no_grad():
                model[2].bias.fill_(-100.0)  # every unit of the second ReLU layer dies
        nn.functional.cross_entropy(model(x), y).backward()
        watcher.step()
        opt.step()  # zero_grad forgotten
    watcher.close()
    found = {f.code: f for f in watcher.findings if f.status == "new"}
    assert found["GW107"].step == 3
    assert found["GW201"].step >= 12 and "2" in found["GW201"].layers


# -- optimizer-in-backward ---------------------------------------------------------------


def test_optimizer_in_backward_is_said_and_leaves_no_hook_armed():
    model = _sigmoid_net()
    optimizers = {p: torch.optim.SGD([p], lr=0.05) for p in model.parameters()}

    def step_now(param):
        optimizers[param].step()
        param.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_now)
    out = io.StringIO()
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[TerminalReporter(file=out)])
    baseline = hooks_of(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, (x, y) in enumerate(_batches(12)):
            nn.functional.cross_entropy(model(x), y).backward()
            watcher.step()
            if step % 5 != 4:  # the next step is not monitored
                assert hooks_of(model) == baseline
    watcher.close()
    said = [w for w in caught if "steps inside backward()" in str(w.message)]
    assert len(said) == 1
    assert "nothing was measured: the optimizer steps inside backward()" in out.getvalue()


# -- per-step evidence: never-routed experts ---------------------------------------------


def _moe(model, steps, **watch):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = gradwatch.watch(model, reporters=[], **watch)
    x, y = digits()
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (8,), generator=generator)
        opt.zero_grad()
        out = model(x[idx])  # with Switch Transformer's load-balancing loss
        (nn.functional.cross_entropy(out, y[idx]) + 0.1 * model.balance_loss).backward()
        watcher.step()
        opt.step()
    watcher.close()
    return watcher


def test_a_never_routed_expert_is_found_within_100_steps_at_the_default_interval():
    torch.manual_seed(0)
    model = zoo.TopOneMoE(8, router_bias=[0, 0, 0, 0, 0, -10, 0, 0])
    watcher = _moe(model, 100)
    found = [f for f in watcher.findings if f.code == "GW104"]
    assert found and found[0].step <= 60
    assert found[0].evidence["branches"] == ["experts.5"]
    assert found[0].evidence["steps"] >= 44
    assert "checked at every step" in found[0].message


def test_a_balanced_moe_whose_experts_skip_steps_is_silent():
    torch.manual_seed(0)
    model = zoo.TopOneMoE(8)
    watcher = _moe(model, 150)
    got = [[s.layers[f"experts.{e}.0"].grad_norm is not None for s in watcher.history]
           for e in range(8)]
    assert any(not all(pattern) for pattern in got)  # experts do skip monitored steps
    assert "GW104" not in _codes(watcher)


# -- intended accumulation under the frameworks -----------------------------------------


def _carry_checked(watcher) -> int:
    return sum(s.carry_checked for s in watcher.history)


@pytest.mark.slow
def test_lightning_accumulate_grad_batches_is_silent():
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    from .dist_scripts.lit_models import digits_loader, healthy, quiet_trainer

    callback = GradWatchCallback(every_n_steps=3, reporters=[])
    trainer = quiet_trainer(max_steps=15, accumulate_grad_batches=4, callbacks=[callback])
    trainer.fit(healthy(), digits_loader(batch_size=16))
    assert [s.step for s in callback.watcher.history][:3] == [0, 3, 6]  # optimizer steps
    assert _carry_checked(callback.watcher) > 0  # checked across optimizer steps ...
    assert "GW107" not in [f.code for f in callback.findings]  # ... and always cleared


@pytest.mark.slow
def test_transformers_gradient_accumulation_steps_is_silent(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer

    from gradwatch.integrations.transformers import GradWatchCallback

    from .dist_scripts.hf_models import tiny_gpt2, token_data, trainer_args

    callback = GradWatchCallback(every_n_steps=3, reporters=[])
    trainer = Trainer(
        model=tiny_gpt2(),
        args=trainer_args(tmp_path, max_steps=10, gradient_accumulation_steps=4,
                          per_device_train_batch_size=4),
        train_dataset=token_data(n=256),
        callbacks=[callback],
    )
    trainer.train()
    assert _carry_checked(callback.watcher) > 0
    assert "GW107" not in [f.code for f in callback.findings]


# -- gradwatch explain --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("GW107", "zero_grad()"),
        ("carried-gradient", "accumulate_grad_batches"),
        ("step-placement", "optimizer=opt"),
        ("optimizer-in-backward", "post-accumulate-grad"),
        ("GW104", "followed at every step"),
    ],
)
def test_explain_covers_the_training_loop(capsys, name, words):
    from gradwatch.cli import main

    assert main(["explain", name]) == 0
    assert words in " ".join(capsys.readouterr().out.split())


def test_two_watchers_with_their_own_optimizers_never_raise_into_training():
    """A GAN-style loop: two models, each watched with its own optimizer. The carried-
    gradient check of each sees every optimizer step of the process; ending a check must
    not change PyTorch's hook dictionary while an optimizer step runs through it."""
    torch.manual_seed(0)
    cleared, forgotten = mlp(3), mlp(3)
    opt_c = torch.optim.SGD(cleared.parameters(), lr=0.01)
    opt_f = torch.optim.SGD(forgotten.parameters(), lr=0.01)
    watchers = [
        gradwatch.watch(model, optimizer=opt, every_n_steps=3, reporters=[])
        for model, opt in ((cleared, opt_c), (forgotten, opt_f))
    ]
    for x, y in _batches(24):
        opt_c.zero_grad()
        nn.functional.cross_entropy(cleared(x), y).backward()
        opt_c.step()
        nn.functional.cross_entropy(forgotten(x), y).backward()  # never cleared
        opt_f.step()
    for watcher in watchers:
        watcher.close()
    carried = [[f for f in w.findings if f.rule == "carried-gradient"] for w in watchers]
    assert not carried[0]
    assert carried[1]
