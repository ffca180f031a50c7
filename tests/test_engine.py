"""Persistence, hysteresis, selection and custom rules."""

import pytest
from torch import nn

import gradwatch
from gradwatch.findings import Finding
from gradwatch.history import History
from gradwatch.rules import Condition, Rule, RuleContext, RuleEngine, resolve_rules
from gradwatch.rules.base import ModelFacts
from gradwatch.stats import StepStats

from .support import mlp, train


class Toggle(Rule):
    """Fires whenever the global gradient norm is above a limit (a test rule)."""

    code = "T001"
    slug = "toggle"
    summary = "global norm above the limit"
    defaults = {"limit": 1.0}
    window = 2
    clear_after = 2
    cooldown = 100
    worse_by = 10.0

    def check(self, ctx):
        norm = ctx.stats.global_grad_norm
        if norm > self.t("limit"):
            return [Condition(layers=("a",), message=f"norm {norm}", hint="h", score=norm)]
        return []


def _feed(engine, norms):
    history = History(64)
    facts = ModelFacts.from_layers([], frozenset())
    out = []
    for step, norm in enumerate(norms):
        stats = StepStats(step=step, layers={}, global_grad_norm=norm)
        history.append(stats)
        out.extend(engine.evaluate(RuleContext(stats, history, facts)))
    return out


def test_a_condition_must_persist_for_the_window_before_it_is_announced():
    findings = _feed(RuleEngine([Toggle()]), [2, 0, 2, 0, 2, 2, 2])
    assert [(f.step, f.status) for f in findings] == [(5, "new")]


def test_announced_once_then_resolved_after_clear_steps():
    findings = _feed(RuleEngine([Toggle()]), [2, 2, 2, 2, 0, 2, 0, 0, 0])
    assert [(f.step, f.status, f.severity) for f in findings] == [
        (1, "new", "warning"),
        (7, "resolved", "info"),
    ]


def test_worse_and_reminder_announcements():
    findings = _feed(RuleEngine([Toggle(cooldown=4)]), [2, 2, 3, 30, 30, 30, 30, 30, 30])
    assert [(f.step, f.status) for f in findings] == [(1, "new"), (3, "worse"), (7, "reminder")]


def test_summary_and_state_round_trip():
    engine = RuleEngine([Toggle()])
    _feed(engine, [2, 2, 2])
    state = engine.state_dict()
    resumed = RuleEngine([Toggle()])
    resumed.load_state_dict(state)
    # still active after the resume: no second "new" announcement
    assert _feed(resumed, [2, 2, 2]) == []
    [row] = resumed.summary()
    assert (row.code, row.first_step, row.status) == ("T001", 1, "active")


def test_none_means_not_judged_and_does_not_clear():
    class Sometimes(Toggle):
        def check(self, ctx):
            if ctx.stats.global_grad_norm < 0:
                return None
            return super().check(ctx)

    findings = _feed(RuleEngine([Sometimes()]), [2, 2, -1, -1, -1, 2])
    assert [f.status for f in findings] == ["new"]


def test_custom_rule_runs_in_a_real_watcher():
    class LargeFirstLayer(Rule):
        code = "X100"
        slug = "large-first-layer"
        summary = "the first layer's gradient norm is above a limit"
        defaults = {"limit": 1e-6}
        window = 1

        def check(self, ctx):
            first = ctx.stats.by_depth(with_gradient=True)[0]
            if first.grad_norm > self.t("limit"):
                return [Condition((first.name,), "large", "none", {"norm": first.grad_norm})]
            return []

    model = mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(
        model, reporters=[], rules=[LargeFirstLayer(limit=1e-9)], every_n_steps=5
    )
    train(model, watcher, steps=12)
    watcher.close()
    [finding] = watcher.findings
    assert isinstance(finding, Finding)
    assert (finding.code, finding.rule, finding.step, finding.layers) == (
        "X100", "large-first-layer", 0, ("0",)
    )
    assert finding.evidence["norm"] > 1e-9


def test_select_and_ignore_by_code_prefix_or_slug():
    codes = lambda rules: [r.code for r in rules]  # noqa: E731
    assert codes(resolve_rules(select=["GW2"])) == ["GW201", "GW202", "GW203"]
    assert codes(resolve_rules(ignore=["vanishing-gradient", "GW2", "GW3"])) == [
        "GW102", "GW103", "GW104", "GW105", "GW106", "GW107", "GW108", "GW109"
    ]
    assert codes(resolve_rules(select=["GW3"])) == ["GW301", "GW302", "GW303"]
    assert codes(resolve_rules(select=["dead-units", "GW103"])) == ["GW103", "GW201"]


def test_thresholds_override_by_code_or_slug():
    rules = resolve_rules(thresholds={"GW101": {"ratio": 1e-5}, "dead-units": {"fraction": 0.9}})
    by_code = {r.code: r for r in rules}
    assert by_code["GW101"].t("ratio") == 1e-5
    assert by_code["GW201"].t("fraction") == 0.9
    assert by_code["GW102"].t("spike_factor") == 20.0


def test_a_stricter_threshold_silences_a_finding_in_real_training():
    default, _ = _watch_tanh()
    assert "GW101" in {f.code for f in default.findings}
    strict, _ = _watch_tanh(thresholds={"GW101": {"ratio": 1e-6}})
    assert "GW101" not in {f.code for f in strict.findings}


def _watch_tanh(**kw):
    model = mlp(12, nn.Tanh, std=0.05)
    watcher = gradwatch.watch(model, reporters=[], **kw)
    losses = train(model, watcher, steps=40, lr=0.1)
    watcher.close()
    return watcher, losses


def test_rule_window_option_validation():
    with pytest.raises(ValueError, match="window"):
        Toggle(window=0)
    assert Toggle(window=5).window == 5


def test_a_flapping_condition_is_announced_again_once_then_held_until_it_stays_away():
    # Present every 4th monitored step: new, resolved, back (new), then held active
    # (reminders only) until it has been away for twice the gap it came back after.
    engine = RuleEngine([Toggle(window=1, clear_after=2, cooldown=20)])
    flapping = [2, 0, 0, 0] * 15
    findings = _feed(engine, flapping + [0] * 9)
    assert [(f.step, f.status) for f in findings] == [
        (0, "new"), (2, "resolved"), (4, "new"),
        (24, "reminder"), (44, "reminder"), (64, "resolved"),
    ]
    [row] = engine.summary()
    assert (row.first_step, row.last_step, row.status, row.episodes) == (0, 56, "resolved", 2)


def test_episodes_of_one_problem_share_a_summary_row_and_state_stays_small():
    engine = RuleEngine([Toggle(window=1, clear_after=2, cooldown=3)])
    # Each episode: present twice, then away long enough to be resolved and forgotten.
    _feed(engine, [2, 2, 0, 0, 0, 0, 0, 0] * 50)
    [row] = engine.summary()
    assert (row.first_step, row.episodes, row.status, row.resolved_step) == (0, 50, "resolved", 395)
    state = engine.state_dict()
    assert len(state["summary"]) == 1 and len(state["tracks"]) <= 1
    resumed = RuleEngine([Toggle(window=1, clear_after=2, cooldown=3)])
    resumed.load_state_dict(state)
    assert resumed.summary() == engine.summary()


def test_a_summary_saved_with_one_row_per_episode_is_merged_on_load():
    row = {"key": "", "code": "T001", "rule": "toggle", "severity": "warning", "layers": ["a"],
           "last_step": 0, "status": "resolved", "resolved_step": 0}
    old = {"tick": 9, "tracks": [], "summary": [
        {**row, "first_step": 1, "last_step": 2}, {**row, "first_step": 6, "last_step": 7},
    ]}
    engine = RuleEngine([Toggle()])
    engine.load_state_dict(old)
    [merged] = engine.summary()
    assert (merged.first_step, merged.last_step, merged.episodes) == (1, 7, 2)
