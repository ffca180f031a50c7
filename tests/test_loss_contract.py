"""The loss contract (GW301 loss-input-mismatch, GW302 clamped-output, GW303
saturated-output): real small training runs on digits and synthetic data, the loss
computed after the model's forward pass as in ordinary training loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import _get_current_function_mode_stack

import gradwatch

from .support import digits, mlp
from .zoo import CausalLM, copy_task

LOSS_CODES = ("GW301", "GW302", "GW303")


def run(
    model: nn.Module,
    loss_fn,
    *,
    steps: int = 12,
    lr: float = 0.1,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    batch: int = 64,
    every: int = 2,
    optimizer: str = "sgd",
    **options,
):
    """Train ``model`` on ``x, y`` (digits by default), ``loss_fn(output, target)``
    computed in the loop, ``watcher.step(loss=...)`` between backward and the optimizer."""
    if x is None or y is None:
        x, y = digits()
    watcher = gradwatch.watch(model, every_n_steps=every, reporters=[], **options)
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        losses.append(float(loss.detach()))
    watcher.close()
    return watcher, losses


def loss_findings(watcher) -> list:
    return [f for f in watcher.findings if f.code in LOSS_CODES and f.status == "new"]


def assert_silent_and_seen(watcher, function: str) -> None:
    """No loss finding, and the check did see the loss (so the silence means something)."""
    assert not loss_findings(watcher), [f.message for f in loss_findings(watcher)]
    seen = {x.function for s in watcher.history for x in s.loss_inputs}
    assert function in seen, seen


def one_hot(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, 10).float()


# -- sick: each named with the producing module and the fix ------------------------------


def test_softmax_module_before_cross_entropy_is_a_double_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(mlp(2), nn.Softmax(dim=1))
    watcher, losses = run(model, F.cross_entropy)
    (finding,) = loss_findings(watcher)
    assert finding.code == "GW301" and finding.rule == "loss-input-mismatch"
    assert finding.layers == ("0.2", "1")  # the last Linear and the nn.Softmax after it
    assert "cross_entropy gets probabilities" in finding.message
    assert "made by softmax" in finding.message
    assert "Remove the softmax (1, the module after 0.2)" in finding.hint
    assert finding.evidence["probability_rows"] == 1.0 and finding.evidence["rows"] == 64
    assert losses[-1] > 2.0  # stalls near log(10): the symptom the finding explains


def test_functional_softmax_in_the_training_loop_is_found_too():
    torch.manual_seed(0)
    watcher, _ = run(mlp(2), nn.CrossEntropyLoss(), steps=8)
    assert not loss_findings(watcher)
    torch.manual_seed(0)
    criterion = nn.CrossEntropyLoss()
    watcher, _ = run(mlp(2), lambda out, y: criterion(F.softmax(out, dim=1), y), steps=8)
    (finding,) = loss_findings(watcher)
    assert finding.code == "GW301" and finding.layers == ("2",)
    assert "applied to the model's output before the loss" in finding.hint


def test_softmax_inside_forward_names_the_module_whose_forward_ends_in_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp(2)

        def forward(self, x):
            return torch.softmax(self.body(x), dim=-1)

    torch.manual_seed(0)
    watcher, _ = run(Net(), F.cross_entropy, steps=8)
    (finding,) = loss_findings(watcher)
    assert finding.layers == ("body.2", "")
    assert "at the end of the model's forward" in finding.hint


def test_sigmoid_into_bce_with_logits():
    torch.manual_seed(0)
    x, y = digits()
    model = nn.Sequential(mlp(2), nn.Sigmoid())
    watcher, _ = run(model, nn.BCEWithLogitsLoss(), x=x, y=one_hot(y))
    (finding,) = loss_findings(watcher)
    assert finding.code == "GW301" and finding.layers == ("0.2", "1")
    assert "binary_cross_entropy_with_logits gets values in [0, 1]" in finding.message
    assert "Remove the sigmoid (1, the module after 0.2)" in finding.hint


@pytest.mark.parametrize("squash", [None, "softmax"])
def test_nll_loss_without_log_softmax(squash):
    torch.manual_seed(0)

    def loss_fn(out, y):
        return F.nll_loss(F.softmax(out, 1) if squash else out, y)

    watcher, losses = run(mlp(2), loss_fn)
    (finding,) = loss_findings(watcher)
    assert finding.code == "GW301" and finding.layers == ("2",)
    if squash:
        assert "nll_loss gets probabilities" in finding.message
        assert "log_softmax instead of softmax" in finding.hint
    else:
        assert "nll_loss gets raw scores" in finding.message
        assert "Apply log_softmax" in finding.hint
        assert losses[-1] < 0  # the 'loss' falls below 0: not a likelihood


def test_relu_after_the_last_layer_loses_whole_classes():
    torch.manual_seed(0)
    model = nn.Sequential(mlp(2), nn.ReLU())
    watcher, _ = run(model, nn.CrossEntropyLoss(), steps=60)
    (finding,) = loss_findings(watcher)
    assert finding.code == "GW302" and finding.rule == "clamped-output"
    assert finding.layers == ("0.2", "1")
    assert "made by relu" in finding.message and "never negative" in finding.message
    assert "Remove the activation after the last layer (1, the module after 0.2)" in finding.hint
    assert finding.evidence["dead_columns"] >= 1 or finding.evidence["zero_share"] >= 0.25
    # the clamp is real: over the whole data set, many logits sit at exactly 0
    with torch.no_grad():
        logits = model(digits()[0])
    assert (logits >= 0).all() and (logits == 0).float().mean() >= 0.25


def _stuck_bce_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(mlp(2, std=1.0), nn.Sigmoid())


def test_sigmoid_with_bce_loss_stuck_at_saturation():
    x, y = digits(standardize=False)  # raw 0..16 pixels, unscaled
    model = _stuck_bce_model()
    watcher, losses = run(model, nn.BCELoss(), x=x * 10, y=one_hot(y))
    (finding,) = loss_findings(watcher)
    assert finding.code == "GW303" and finding.rule == "saturated-output"
    assert finding.layers == ("0.2", "1")
    assert finding.evidence["saturated"] >= 0.9 and finding.evidence["wrong_saturated"] >= 0.02
    assert "BCEWithLogitsLoss" in finding.hint and "normalise them" in finding.hint
    assert min(losses[2:]) > 5  # the loss stays high: stuck, not confident
    assert finding.evidence["loss"] is not None and finding.evidence["loss"] > 5


# -- silent: losses called in unusual but correct ways -----------------------------------


def test_plain_logits_and_log_softmax_nll_are_silent():
    torch.manual_seed(0)
    watcher, _ = run(mlp(2), F.cross_entropy)
    assert_silent_and_seen(watcher, "cross_entropy")
    torch.manual_seed(0)
    watcher, _ = run(mlp(2), lambda out, y: F.nll_loss(F.log_softmax(out, 1), y))
    assert_silent_and_seen(watcher, "nll_loss")
    torch.manual_seed(0)  # log_softmax then cross_entropy: redundant, harmless
    watcher, _ = run(mlp(2), lambda out, y: F.cross_entropy(F.log_softmax(out, 1), y))
    assert_silent_and_seen(watcher, "cross_entropy")


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
        lambda: nn.CrossEntropyLoss(weight=torch.linspace(0.2, 3.0, 10)),
        lambda: nn.CrossEntropyLoss(ignore_index=-100),
    ],
    ids=["label-smoothing", "class-weights", "ignore-index"],
)
def test_cross_entropy_options_are_silent(make_loss):
    criterion = make_loss()

    def loss_fn(out, y):
        y = y.clone()
        y[::5] = -100 if criterion.ignore_index == -100 else y[::5]
        return criterion(out, y)

    torch.manual_seed(0)
    watcher, _ = run(mlp(2), loss_fn, steps=40)
    assert_silent_and_seen(watcher, "cross_entropy")


def test_soft_targets_and_distillation_with_temperature_are_silent():
    x, y = digits()
    torch.manual_seed(1)
    teacher = mlp(2)
    run(teacher, F.cross_entropy, steps=30)  # a trained teacher
    temperature = 4.0

    def distill(out, y):
        with torch.no_grad():
            soft = F.softmax(teacher(x[: len(out)]) / temperature, dim=1)
        kd = F.kl_div(F.log_softmax(out / temperature, 1), soft, reduction="batchmean")
        # soft targets straight into cross_entropy, and the hard labels
        soft_ce = F.cross_entropy(out / temperature, soft)
        return kd * temperature**2 + soft_ce + F.cross_entropy(out, y)

    torch.manual_seed(0)
    watcher, _ = run(mlp(2), distill, steps=20, x=x, y=y, batch=64)
    assert_silent_and_seen(watcher, "cross_entropy")


def test_infonce_with_small_temperature_is_silent():
    torch.manual_seed(0)
    x, _ = digits()
    encoder = mlp(2, outputs=32)
    tau = 0.07

    def info_nce(z, _):
        a = F.normalize(z[: len(z) // 2], dim=1)
        b = F.normalize(z[len(z) // 2 :], dim=1)
        logits = a @ b.T / tau
        return F.cross_entropy(logits, torch.arange(len(a)))

    def views(batch):  # two noisy views of the same 32 images
        base = batch[:32]
        return torch.cat([base + 0.1 * torch.randn_like(base), base + 0.1 * torch.randn_like(base)])

    watcher = gradwatch.watch(encoder, every_n_steps=2, reporters=[])
    opt = torch.optim.SGD(encoder.parameters(), lr=0.1)
    for step in range(16):
        loss = info_nce(encoder(views(x[step * 32 :])), None)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
    watcher.close()
    assert_silent_and_seen(watcher, "cross_entropy")


def test_multilabel_sigmoid_logits_with_bce_with_logits_are_silent():
    torch.manual_seed(0)
    x, y = digits()
    labels = torch.stack([y % 2 == 0, y > 4, y == 7, (y % 3) == 0], 1).float()
    watcher, _ = run(mlp(2, outputs=4), nn.BCEWithLogitsLoss(), x=x, y=labels, steps=40)
    assert_silent_and_seen(watcher, "binary_cross_entropy_with_logits")


def test_small_raw_logits_inside_0_1_are_not_a_sigmoid():
    """A fresh output layer's logits can all lie in [0, 1] (a GAN discriminator at the
    start): without an operation that squashes into [0, 1] they are raw logits."""
    torch.manual_seed(0)
    x, y = digits()
    model = mlp(2, outputs=4)
    head = model[-1]
    nn.init.normal_(head.weight, 0.0, 1e-3)
    nn.init.constant_(head.bias, 0.5)
    labels = torch.stack([y % 2 == 0, y > 4, y == 7, (y % 3) == 0], 1).float()
    watcher, _ = run(model, nn.BCEWithLogitsLoss(), x=x, y=labels, lr=1e-4)
    assert_silent_and_seen(watcher, "binary_cross_entropy_with_logits")
    inside = [x.unit_interval for s in watcher.history for x in s.loss_inputs]
    assert min(inside) == 1.0  # every logit was in [0, 1]: the case this test is about


def test_a_memorised_training_set_is_confident_not_stuck():
    """Sigmoid + BCELoss driven to exactly 1.0 on a tiny training set it has memorised
    (float32's sigmoid is exactly 1.0 above ~17): saturated, but on the right side of every
    target, with a low loss. Silent even when any share of saturated outputs counts."""
    torch.manual_seed(0)
    x, y = digits()
    x, y = x[:32], y[:32]
    model = nn.Sequential(mlp(2), nn.Sigmoid())
    watcher, losses = run(
        model, nn.BCELoss(), x=x, y=one_hot(y), batch=32, steps=300, every=20,
        lr=0.1, optimizer="adam", thresholds={"GW303": {"saturated": 0.01}},
    )
    assert losses[-1] < 0.01
    saturated = [i.saturated for s in watcher.history for i in s.loss_inputs]
    assert max(saturated) > 0.05  # confident: outputs exactly 1.0
    assert_silent_and_seen(watcher, "binary_cross_entropy")


def test_softmax_cross_entropy_memorised_is_silent():
    torch.manual_seed(0)
    x, y = digits()
    watcher, losses = run(
        mlp(2), nn.CrossEntropyLoss(label_smoothing=0.1), x=x[:32], y=y[:32], batch=32,
        steps=100, every=10, lr=0.02, optimizer="adam",
    )
    assert losses[-1] < 0.7  # at label smoothing's floor
    assert_silent_and_seen(watcher, "cross_entropy")


def test_attention_model_with_cross_entropy_keeps_both_checks():
    """The loss mode goes on the stack as the attention capture's comes off: both work."""
    torch.manual_seed(0)
    model = CausalLM(vocab=64, dim=32, heads=2, blocks=1, length=16)
    data = copy_task(n=64, vocab=64, length=16)
    watcher = gradwatch.watch(model, every_n_steps=2, reporters=[])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(6):
        batch = data[(step * 8) % 64 :][:8]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
    watcher.close()
    assert watcher.latest.attention  # attention still measured
    assert_silent_and_seen(watcher, "cross_entropy")


# -- how the check runs -------------------------------------------------------------------


def test_no_mode_and_no_hook_outside_monitored_steps_and_evaluation_is_not_judged():
    from torch.nn.modules import module as torch_module

    torch.manual_seed(0)
    x, y = digits()
    model = nn.Sequential(mlp(2), nn.Softmax(dim=1))
    hooks_before = len(torch_module._global_forward_hooks)
    watcher = gradwatch.watch(model, every_n_steps=4, reporters=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        armed = len(torch_module._global_forward_hooks) > hooks_before
        assert armed == (step % 4 == 0)  # hooks only ahead of monitored steps
        with torch.no_grad():  # an evaluation pass does not open the check
            model(x[:16])
        assert not _get_current_function_mode_stack()
        loss = F.cross_entropy(model(x[step * 64 :][:64]), y[step * 64 :][:64])
        # the mode is on between the forward and step() of a monitored step only
        assert bool(_get_current_function_mode_stack()) == (step % 4 == 0)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        assert not _get_current_function_mode_stack()
        opt.step()
    assert [len(s.loss_inputs) for s in watcher.history] == [1, 1]
    watcher.close()
    assert len(torch_module._global_forward_hooks) == hooks_before


def test_explain_covers_the_loss_rules():
    from gradwatch.rules import find_rule

    for code in LOSS_CODES:
        text = find_rule(code).explanation
        for part in ("What it measures", "Why it matters", "How to fix it", "When it stays silent"):
            assert part in text, (code, part)


def test_loss_inputs_survive_the_json_record():
    torch.manual_seed(0)
    watcher, _ = run(nn.Sequential(mlp(2), nn.Softmax(dim=1)), F.cross_entropy, steps=4)
    stats = watcher.latest
    again = type(stats).from_dict(stats.to_dict())
    assert again.loss_inputs == stats.loss_inputs and math.isclose(
        again.loss_inputs[0].probability_rows, 1.0
    )


@pytest.mark.slow
def test_lightning_training_step_loss_on_a_softmax_output_is_found():
    """A real Lightning Trainer: the loss is computed in training_step, after forward."""
    from gradwatch.integrations.lightning import GradWatchCallback

    from .dist_scripts.lit_models import Classifier, digits_loader, quiet_trainer

    torch.manual_seed(0)
    module = Classifier(nn.Sequential(mlp(2), nn.Softmax(dim=1)), lr=0.1)
    callback = GradWatchCallback(every_n_steps=2)
    trainer = quiet_trainer(max_steps=10, callbacks=[callback], logger=False)
    trainer.fit(module, digits_loader())
    new = [f for f in callback.findings if f.code in LOSS_CODES and f.status == "new"]
    assert [f.code for f in new] == ["GW301"]
    assert new[0].layers == ("net.0.2", "net.1")
    assert "Remove the softmax (net.1, the module after net.0.2)" in new[0].hint
    assert not _get_current_function_mode_stack()


def test_a_zero_initialised_output_layer_is_not_a_clamp_or_a_sigmoid():
    """Every logit exactly 0 before the first update says nothing about the model's form."""
    torch.manual_seed(0)
    x, y = digits()
    for loss_fn, targets in ((nn.CrossEntropyLoss(), y), (nn.BCEWithLogitsLoss(), one_hot(y))):
        model = mlp(2)
        nn.init.zeros_(model[2].weight)
        nn.init.zeros_(model[2].bias)
        watcher, _ = run(model, loss_fn, x=x, y=targets, steps=1, every=1)
        (seen,) = watcher.latest.loss_inputs
        assert seen.zeros == 1.0
        engine_view = [r.check(_context(watcher)) for r in watcher.rules if r.code in LOSS_CODES]
        assert all(not conditions for conditions in engine_view)


def _context(watcher):
    from gradwatch.rules import RuleContext

    return RuleContext(stats=watcher.latest, history=watcher.history, model=watcher._facts)


def test_a_saturated_start_that_recovers_is_not_stuck():
    """Output weights x300: a third of the outputs start exactly 0/1 the wrong way, but the
    model brings them back (the wrong share falls between monitored steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.mul_(300.0)
    x, y = digits()
    watcher, _ = run(
        model, nn.BCELoss(), x=x, y=one_hot(y), steps=46, every=15, lr=0.05,
        thresholds={"GW303": {"saturated": 0.4}},
    )
    wrong = [i.wrong_saturated for s in watcher.history for i in s.loss_inputs]
    assert wrong[0] > 0.1 and wrong[-1] < wrong[0] / 2
    assert_silent_and_seen(watcher, "binary_cross_entropy")


@pytest.mark.parametrize("squash", [True, False])
def test_per_pixel_classes_are_judged_along_the_class_axis(squash):
    """Segmentation-shaped logits (N, C, H, W): rows are pixels, classes on axis 1."""
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8)
    masks = (images[:, 0] > 0).long() + (images[:, 1] > 0).long()  # 3 classes per pixel
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 1)]
    model = nn.Sequential(*layers, *([nn.Softmax(dim=1)] if squash else []))
    watcher, _ = run(model, F.cross_entropy, x=images, y=masks, batch=16, steps=8)
    if squash:
        (finding,) = loss_findings(watcher)
        assert finding.code == "GW301" and finding.layers == ("2", "3")
        assert finding.evidence["rows"] == 16 * 8 * 8 and finding.evidence["classes"] == 3
    else:
        assert_silent_and_seen(watcher, "cross_entropy")


def test_nll_loss_on_masked_log_probabilities_is_silent():
    """log_softmax with some classes then masked to -inf (a constrained output): the row's
    probabilities sum to less than 1, but they are log-probabilities."""
    banned = torch.zeros(10, dtype=torch.bool)
    banned[[3, 7]] = True

    def loss_fn(out, y):
        logp = F.log_softmax(out, 1).masked_fill(banned, float("-inf"))
        keep = ~banned[y]
        return F.nll_loss(logp[keep], y[keep])

    torch.manual_seed(0)
    watcher, _ = run(mlp(2), loss_fn)
    assert_silent_and_seen(watcher, "nll_loss")


def test_hooks_come_off_after_monitored_steps_when_no_relu_needs_one():
    """A healthy ReLU network: once its Linear layers' gradient rows show every ReLU's
    units, the probes need no hook of their own, and the loss check's must still come off
    after each monitored step (else every step in between pays for them)."""
    from torch.nn.modules import module as torch_module

    torch.manual_seed(0)
    x, y = digits()
    model = mlp(3, init="kaiming")
    hooks_before = len(torch_module._global_forward_hooks)
    watcher = gradwatch.watch(model, every_n_steps=2, reporters=[])
    relus = {i for i, m in enumerate(model) if isinstance(m, nn.ReLU)}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    all_covered = 0
    for step in range(16):
        armed = len(torch_module._global_forward_hooks) > hooks_before
        assert armed == (step % 2 == 0), step
        probes = watcher._probes
        all_covered += step % 2 == 0 and {str(i) for i in relus} <= {
            layer.name for layer in watcher.layers if layer.index in probes.skip_core
        }
        loss = F.cross_entropy(model(x[step * 64 :][:64]), y[step * 64 :][:64])
        assert bool(_get_current_function_mode_stack()) == (step % 2 == 0)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
    assert all_covered  # the case this test is about did happen
    assert all(len(s.loss_inputs) == 1 for s in watcher.history)
    watcher.close()
    assert len(torch_module._global_forward_hooks) == hooks_before


def test_the_output_is_not_kept_alive_past_the_forward_pass():
    """The loss check names the module whose output reached the loss: it holds the
    latest module output while the forward pass runs, and only a weak reference after."""
    import gc
    import weakref

    torch.manual_seed(0)
    x, y = digits()
    model = mlp(2)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        out = model(x[:64])
        loss = F.cross_entropy(out, y[:64])
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
    assert [s.loss_inputs[0].producer for s in watcher.history] == ["2"] * 3
    with torch.no_grad():  # an evaluation pass of a monitored step: nothing autograd keeps
        out = model(x[:64])
    held = weakref.ref(out)
    del out
    gc.collect()
    assert held() is None
    watcher.close()


def test_a_failing_loss_check_stays_off_and_training_goes_on(monkeypatch, caplog):
    """A failure inside the loss check switches it off for good (said once): its mode
    never comes back on the stack, not even for a second loss module of the same step,
    and the other measurements go on."""
    from gradwatch import loss_contract

    def broken(x):
        raise RuntimeError("broken statistic")

    class Criterion(nn.modules.loss._Loss):
        """A loss module from outside the model that notes whether a mode sees it."""

        def __init__(self):
            super().__init__()
            self.seen: list[bool] = []

        def forward(self, out, target):
            self.seen.append(bool(_get_current_function_mode_stack()))
            return F.cross_entropy(out, target)

    monkeypatch.setattr(loss_contract, "class_statistics", broken)
    torch.manual_seed(0)
    x, y = digits()
    model = mlp(2)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = Criterion()
    for _ in range(3):
        out = model(x[:64])
        loss = criterion(out, y[:64]) + criterion(out, y[:64])
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
    # (The second call of the failing step still finds the mode, closed: it cannot leave
    # the stack from inside its own handler, and leaves at the step's end.)
    assert criterion.seen == [True, True] + [False] * 4
    assert len(watcher.history) == 3
    assert all(not s.loss_inputs for s in watcher.history)
    assert all(s.layers["0"].grad_norm > 0 for s in watcher.history)
    assert sum("loss checks" in r.getMessage() for r in caplog.records) == 1
    watcher.close()
