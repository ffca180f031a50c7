"""Setting a watcher up and taking it down: options checked at construction, a model
freed by a failed watch(), a dropped watcher replaced, TorchScript models refused with a
reason, memory that stays flat when a problem keeps coming back, and a slow reporter
named."""

import gc
import math
import pickle
import time
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.guard import GradwatchWarning
from gradwatch.rules import BUILTIN_RULES, PERSISTENCE, Rule, VanishingGradient

from .support import hooks_of, mlp, train


def _forward_hooks(model: nn.Module) -> int:
    """Hooks that could reach the model: its own and the process-wide module hooks
    (gradwatch places only the latter, and only around monitored steps)."""
    from torch.nn.modules import module as torch_module

    own = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return (
        own
        + len(torch_module._global_forward_hooks)
        + len(torch_module._global_forward_pre_hooks)
        + len(torch_module._global_module_registration_hooks)
        + len(torch_module._global_parameter_registration_hooks)
    )


def _notices(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, GradwatchWarning)]


# -- TorchScript, and a watch() that fails ------------------------------------------------


def test_a_torchscript_model_is_refused_with_the_reason_and_stays_free():
    eager = mlp(3)
    scripted = torch.jit.script(eager)
    for _ in range(2):  # the second try gets the same answer, not "already watched"
        with pytest.raises(ValueError, match="TorchScript") as error:
            gradwatch.watch(scripted, reporters=[])
        assert "script it afterwards" in str(error.value)
    traced = torch.jit.trace(nn.Linear(4, 2), torch.randn(2, 4), check_trace=False)
    with pytest.raises(ValueError, match="TorchScript"):
        gradwatch.watch(traced, reporters=[])
    watcher = gradwatch.watch(eager, every_n_steps=1, reporters=[])  # the eager model: fine
    train(eager, watcher, steps=2)
    assert watcher.latest.layers["0"].grad_norm > 0
    watcher.close()


def test_a_torchscript_part_of_an_eager_model_is_left_out_and_the_rest_watched():
    model = nn.Sequential(
        nn.Linear(64, 32), nn.ReLU(), torch.jit.script(nn.Sequential(nn.Linear(32, 10)))
    )
    with pytest.warns(GradwatchWarning, match="'2' of Sequential is TorchScript"):
        watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    train(model, watcher, steps=3)
    watcher.close()
    assert [layer.name for layer in watcher.layers] == ["0", "1"]
    assert watcher.latest.layers["0"].grad_norm > 0
    assert watcher.disabled == {}


def test_a_watch_that_fails_after_claiming_leaves_no_hook_and_the_model_free(monkeypatch):
    model = mlp(3)
    before = hooks_of(model)
    real_arm = gradwatch.probes.Probes.arm

    def arm_then_fail(self, detail):
        real_arm(self, detail)  # some hooks are placed, then something goes wrong
        raise RuntimeError("simulated failure while placing hooks")

    monkeypatch.setattr(gradwatch.probes.Probes, "arm", arm_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        gradwatch.watch(model, reporters=[])
    assert hooks_of(model) == before
    monkeypatch.undo()
    gradwatch.watch(model, reporters=[]).close()  # not "already watched"


# -- a watcher dropped without close() ------------------------------------------------------


def test_a_watcher_dropped_without_close_is_replaced_with_a_one_line_notice():
    model = mlp(3)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    train(model, watcher, steps=2)  # hooks placed ahead of the next monitored step
    assert _forward_hooks(model) > 0
    del watcher  # a notebook cell run again, a variable rebound
    gc.collect()
    assert _forward_hooks(model) == 0, "a collected watcher must take its hooks with it"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        replacement = gradwatch.watch(model, every_n_steps=1, reporters=[])
    [notice] = _notices(record)
    assert "dropped without close()" in notice and "\n" not in notice
    train(model, replacement, steps=2)
    assert replacement.latest.layers["0"].calls == 1  # only the new watcher's hooks ran
    replacement.close()


def test_a_watcher_in_a_reference_cycle_is_still_replaced():
    model = mlp(3)
    watcher = gradwatch.watch(model, reporters=[])
    watcher.cycle = [watcher]  # only the cycle collector can free it
    del watcher
    with pytest.warns(GradwatchWarning, match="dropped without close"):
        gradwatch.watch(model, reporters=[]).close()


def test_a_watcher_still_in_use_is_not_replaced_by_one_of_a_part():
    model = mlp(3)
    first = gradwatch.watch(model, every_n_steps=1, reporters=[])
    for target in (model[2],):  # the same model again replaces it (test_robustness)
        with pytest.raises(ValueError, match="already watched") as error:
            gradwatch.watch(target, reporters=[])
        assert "gradwatch.release(model)" in str(error.value)
    train(model, first, steps=1)  # untouched: still measuring
    assert not first.closed and first.latest is not None
    first.close()


def test_release_frees_a_model_whose_watcher_is_out_of_reach():
    model = mlp(3)
    kept_somewhere = [gradwatch.watch(model, reporters=[])]  # e.g. a notebook's output cache
    assert gradwatch.release(model[0]) is True  # a part names the watcher of the whole
    assert kept_somewhere[0].closed
    assert gradwatch.release(model) is False  # nothing left to close
    namespace = {"gradwatch": gradwatch, "model": model}
    cell = "gradwatch.release(model)\nwatcher = gradwatch.watch(model, reporters=[])"
    exec(cell, namespace)
    exec(cell, namespace)  # the same cell run again
    assert not namespace["watcher"].closed
    namespace["watcher"].close()


# -- options checked when the watcher is built ----------------------------------------------


@pytest.mark.parametrize(
    "options, named",
    [
        ({"thresholds": {"GW101": {"ratio": -1}}}, r"'ratio' must be a number in \(0, 1\)"),
        ({"thresholds": {"GW101": {"ratio": "x"}}}, r"'ratio' must be a number in \(0, 1\)"),
        ({"thresholds": {"GW101": {"ratio": math.nan}}}, r"'ratio' must be a number"),
        ({"thresholds": {"GW101": 0.5}}, r"thresholds\['GW101'\] must map threshold names"),
        ({"thresholds": [("GW101", 0.5)]}, "thresholds must be a dict"),
        ({"thresholds": {"dead-units": {"fraction": 1.5}}}, r"'fraction' must be .* \[0, 1\)"),
        ({"thresholds": {"GW201": {"span": 2.5}}}, "'span' must be a whole number >= 1"),
        ({"thresholds": {"GW102": {"spike_factor": 0.5}}}, "'spike_factor' must be a number > 1"),
        ({"thresholds": {"GW102": {"min_baseline": 9}}}, "'min_baseline' must be at most"),
        ({"thresholds": {"GW103": {"window": 0}}}, "'window' must be a whole number >= 1"),
        ({"thresholds": {"GW103": {"cooldown": "10"}}}, "'cooldown' must be a whole number"),
        ({"thresholds": {"GW101": {"ration": 0.1}}}, "has no threshold 'ration'"),
        ({"select": 101}, "select must be a rule code"),
        ({"select": ["GW1", ""]}, "select must be a rule code.*item 1"),
        ({"ignore": "GW9"}, "ignore: 'GW9' matches no rule"),
        ({"reporters": object()}, r"reporters must be a list of gradwatch.Reporter objects"),
        ({"reporters": "terminal"}, r"reporters must be a list"),
        ({"reporters": [gradwatch.TerminalReporter]}, r"reporters\[0\]"),
        ({"rules": [VanishingGradient]}, "pass an instance: VanishingGradient()"),
        ({"rules": [VanishingGradient(), VanishingGradient()]}, "each rule needs its own"),
        ({"layers": 3}, "layers must be a module name"),
        ({"history": 0}, "history must be a whole number"),
        ({"activations": "no"}, "activations must be True or False"),
    ],
)
def test_a_wrong_option_is_a_value_error_that_names_it(options, named):
    model = mlp(3)
    with pytest.raises(ValueError, match=named):
        gradwatch.watch(model, **options)
    gradwatch.watch(model, reporters=[]).close()  # and the model is free again


def test_a_single_string_is_one_item():
    model = mlp(3)
    watcher = gradwatch.watch(model, select="GW101", ignore=None, layers="0", reporters=[])
    assert [rule.code for rule in watcher.rules] == ["GW101"]
    assert [layer.name for layer in watcher.layers] == ["0"]
    watcher.close()
    single = gradwatch.watch(model, ignore="dead-units", reporters=gradwatch.LoggingReporter())
    assert "dead-units" not in [rule.slug for rule in single.rules]
    assert len(single.reporters) == 1
    single.close()


def test_every_built_in_threshold_declares_the_values_it_accepts():
    for cls in BUILTIN_RULES:
        assert set(cls.threshold_specs) == set(cls.defaults), cls.slug
        rule = cls()  # the defaults pass their own specs
        for name, value in cls.defaults.items():
            assert cls.threshold_specs[name].check(value) == value
        for name in PERSISTENCE:
            assert PERSISTENCE[name].check(getattr(rule, name)) == getattr(rule, name)


def test_a_custom_rule_declares_its_ranges_the_same_way():
    from gradwatch.rules import POSITIVE

    class HugeNorm(Rule):
        code = "X001"
        slug = "huge-norm"
        defaults = {"limit": 1e3, "mode": "global"}
        threshold_specs = {"limit": POSITIVE}

        def check(self, ctx):
            return []

    assert HugeNorm(limit=5).t("limit") == 5
    assert HugeNorm(mode="per-layer").t("mode") == "per-layer"  # not a number: its own business
    with pytest.raises(ValueError, match="X001 huge-norm: threshold 'limit' must be a number > 0"):
        HugeNorm(limit=-1)

    class Unspecified(HugeNorm):
        threshold_specs = {}

    assert Unspecified(limit=math.inf).t("limit") == math.inf
    with pytest.raises(ValueError, match="'limit' must be a number"):
        Unspecified(limit=math.nan)
    with pytest.raises(ValueError, match="give each rule its thresholds"):
        gradwatch.watch(mlp(3), rules=[HugeNorm()], thresholds={"X001": {"limit": 1}})


def test_the_lightning_callback_gets_the_same_threshold_checks():
    pytest.importorskip("lightning")
    from gradwatch.integrations.lightning import GradWatchCallback

    with pytest.raises(ValueError, match=r"'ratio' must be a number in \(0, 1\)"):
        GradWatchCallback(thresholds={"GW101": {"ratio": -1}})
    with pytest.raises(ValueError, match="must map threshold names"):
        GradWatchCallback(thresholds={"GW101": 0.5})


# -- memory over a long run with a problem that comes and goes ------------------------------


def test_a_problem_that_keeps_coming_back_keeps_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 4)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[], activations=False)

    def run(steps, start):
        for step in range(start, start + steps):
            model.zero_grad(set_to_none=True)
            loss = model(x).pow(2).mean()
            if step % 5 == 0:  # a NaN every 5th step
                loss = loss * math.nan
            loss.backward()
            watcher.step()

    def sizes():
        state = watcher.state_dict()
        findings = state.pop("findings")
        return len(pickle.dumps(state)), len(findings), len(watcher.summary())

    run(500, 0)
    state_early, findings_early, rows_early = sizes()
    run(1000, 500)
    state_late, findings_late, rows_late = sizes()
    watcher.close()
    # One summary row for the one problem, however often it came back.
    assert rows_early == rows_late == 1
    [row] = watcher.summary()
    assert (row.code, row.first_step, row.last_step) == ("GW103", 0, 1495)
    # Rule state, tracks and summary: flat (a few bytes of counters may grow a digit).
    assert abs(state_late - state_early) < 64, (state_early, state_late)
    # Announcements: new, resolved, back again, then one reminder per cooldown, not a
    # new/resolved pair every 5 steps.
    cooldown = gradwatch.rules.NonFiniteGradient.cooldown
    assert findings_late - findings_early <= 1000 // cooldown + 1
    assert [f.status for f in watcher.findings[:3]] == ["new", "resolved", "new"]


# -- a slow reporter ------------------------------------------------------------------------


class _Sleepy(gradwatch.Reporter):
    name = "sleepy"

    def __init__(self, calls_that_sleep):
        self.calls = 0
        self.calls_that_sleep = calls_that_sleep

    def report(self, stats, findings):
        if self.calls in self.calls_that_sleep:
            time.sleep(0.1)
        self.calls += 1


def _run_with(reporter, steps=8):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(4, 4)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[reporter], activations=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(steps):
            model.zero_grad()
            model(x).sum().backward()
            watcher.step()
        watcher.close()
    return [n for n in _notices(record) if "reporter" in n]


def test_a_reporter_slower_than_a_training_step_is_named_once():
    # 100 ms per report against a training step of well under a millisecond.
    [notice] = _run_with(_Sleepy(calls_that_sleep=range(100)))
    assert "reporter sleepy takes" in notice and "every_n_steps" in notice


def test_one_slow_report_is_not_a_slow_reporter():
    assert _run_with(_Sleepy(calls_that_sleep={0})) == []
