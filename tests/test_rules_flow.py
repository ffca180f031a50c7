"""Gradient flow that stops by construction, on real small training runs: a blocked
gradient (a quantiser, argmax, an integer cast, a detach) is GW104 at the boundary, not
GW101; a deep sigmoid stack that underflows stays GW101; a mixture-of-experts expert
that skips steps is healthy, one the router never picks is a finding."""

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.cli import main
from gradwatch.history import History
from gradwatch.rules import NoGradient
from gradwatch.rules.base import ModelFacts, RuleContext
from gradwatch.rules.no_gradient import MAX_TRACKED
from gradwatch.stats import LayerStats, StepStats

from . import zoo
from .support import digits, mlp, train


def _run(model, steps=60, watch=None, **train_kwargs):
    watcher = gradwatch.watch(model, reporters=[], **(watch or {}))
    losses = train(model, watcher, steps=steps, **train_kwargs)
    watcher.close()
    return watcher, losses


def _alarms(watcher, code=None):
    return [
        f
        for f in watcher.findings
        if f.severity in ("warning", "error") and (code is None or f.code == code)
    ]


def _first(watcher, code):
    found = [f for f in _alarms(watcher, code) if f.status == "new"]
    assert found, f"no {code} finding; got {[(f.code, f.step) for f in watcher.findings]}"
    return found[0]


ENCODER = ("encoder.0", "encoder.2", "encoder.4")


# -- blocked gradients -------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, lr, hooks",
    [("sgd", 0.05, True), ("adam", 1e-3, True), ("sgd", 0.05, False), ("adam", 1e-3, False)],
)
def test_rounded_bottleneck_is_a_blocked_gradient_not_vanishing(optimizer, lr, hooks):
    # torch.round's derivative is 0: the encoder's gradients are tensors of zeros
    watcher, _ = _run(
        zoo.Bottleneck("round"), lr=lr, optimizer=optimizer, watch={"activations": hooks}
    )
    finding = _first(watcher, "GW104")
    assert finding.step <= 45
    assert finding.layers == ENCODER
    assert finding.evidence["gradient"] == "zero"
    assert finding.evidence["after"] == "decoder.0"
    # with forward hooks the boundary is the Tanh the quantiser reads; without them
    # (as under torch.compile) the last weight layer in registration order
    assert finding.evidence["before"] == ("encoder.5" if hooks else "encoder.4")
    assert finding.evidence["seen_in"] == ("backward signal" if hooks else "weight gradients")
    assert finding.evidence["after_level"] > 0.01
    assert "straight-through" in finding.hint and "(quantise(x) - x).detach()" in finding.hint
    assert "decoder.0" in finding.message
    assert not _alarms(watcher, "GW101")  # not a vanishing gradient
    assert [f.code for f in _alarms(watcher)] == ["GW104"]


def test_straight_through_estimator_makes_the_bottleneck_silent():
    model = zoo.Bottleneck("round", ste=True)
    watcher, losses = _run(model, steps=100, lr=0.05)
    assert losses[-1] < 0.6 * losses[0]
    assert all(watcher.latest.layers[name].grad_norm > 0 for name in ENCODER)
    assert _alarms(watcher) == []


@pytest.mark.parametrize("how", ["argmax", "compare", "int", "detach"])
def test_operations_without_a_gradient_name_the_boundary(how):
    watcher, _ = _run(zoo.Bottleneck(how), lr=0.05)
    finding = _first(watcher, "GW104")
    assert finding.step <= 45
    assert finding.layers == ENCODER
    assert (finding.evidence["before"], finding.evidence["after"]) == ("encoder.5", "decoder.0")
    assert finding.evidence["gradient"] == "none"
    assert "argmax" in finding.hint and ".detach()" in finding.hint
    assert "straight-through" in finding.hint
    assert [f.code for f in _alarms(watcher)] == ["GW104"]


def test_argmax_with_zeroed_gradients_is_blocked_not_vanishing():
    # zero_grad(set_to_none=False): the encoder's gradients exist but stay exactly 0
    model = zoo.Bottleneck("argmax")
    watcher = gradwatch.watch(model, reporters=[])
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for p in model.encoder.parameters():
        p.grad = torch.zeros_like(p)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        watcher.step(optimizer=opt)
        opt.step()
    watcher.close()
    finding = _first(watcher, "GW104")
    assert finding.layers == ENCODER and finding.evidence["after"] == "decoder.0"
    assert finding.evidence["seen_in"] == "no graph"  # no gradient reached encoder.5 at all
    assert not _alarms(watcher, "GW101")


@pytest.mark.parametrize(
    "optimizer, lr, hooks", [("sgd", 0.1, True), ("sgd", 0.1, False), ("adam", 1e-3, True)]
)
def test_deep_sigmoid_underflow_stays_vanishing(optimizer, lr, hooks):
    # 60 sigmoid layers: the first layers' gradients underflow float32 to exactly 0, but
    # the layers after them get a vanishing, not a normal, share of the late gradient: a
    # decay, not a cut
    watcher, _ = _run(mlp(60, nn.Sigmoid), lr=lr, optimizer=optimizer, watch={"activations": hooks})
    finding = _first(watcher, "GW101")
    assert finding.layers[0] == "0" and finding.severity == "error"
    assert watcher.latest.layers["0"].grad_norm == 0.0
    assert not _alarms(watcher, "GW104")


# -- conditional computation -------------------------------------------------------------


def _moe_run(model, steps, watch=None, watcher=None):
    def loss_fn(out, labels):
        return nn.functional.cross_entropy(out, labels) + 0.1 * model.balance_loss

    own = watcher is None
    if own:
        watcher = gradwatch.watch(model, reporters=[], **(watch or {}))
    losses = train(model, watcher, steps=steps, lr=0.05, batch=8, loss_fn=loss_fn)
    if own:
        watcher.close()
    return watcher, losses


def _gradient_pattern(watcher, name):
    return [watcher_stats.layers[name].grad_norm is not None for watcher_stats in watcher.history]


def _longest_gap(pattern):
    longest = run = 0
    for got in pattern:
        run = 0 if got else run + 1
        longest = max(longest, run)
    return longest


def test_experts_that_skip_steps_are_silent():
    # top-1 routing of 8 samples over 8 experts: an expert often gets none in a batch
    model = zoo.TopOneMoE(8)
    watcher, losses = _moe_run(model, steps=300)
    assert sum(losses[-30:]) < 0.5 * sum(losses[:30])
    patterns = [_gradient_pattern(watcher, f"experts.{e}.0") for e in range(8)]
    assert max(_longest_gap(p) for p in patterns) >= 3  # several monitored steps in a row
    assert any(not p[0] and not p[1] and not p[2] for p in patterns)  # even at the start
    assert all(any(p) for p in patterns)  # ... yet every expert trains
    assert _alarms(watcher) == []


def test_experts_run_on_zero_samples_are_not_dead_units():
    # Some MoE code calls every expert, also with an empty batch: an empty call shows no
    # activity, which is not the same as units that never activate.
    model = zoo.TopOneMoE(8, call_empty=True)
    watcher, _ = _moe_run(model, steps=150)
    assert _alarms(watcher) == []


def test_an_expert_the_router_never_picks_is_found_with_a_routing_hint():
    # The wait (44 steps by default) is counted at every step for ModuleList members:
    # reported at the first monitored step after it.
    model = zoo.TopOneMoE(8, router_bias=[0, 0, 0, 0, 0, -10, 0, 0])
    watcher, _ = _moe_run(model, steps=80, watch={"every_n_steps": 5})
    finding = _first(watcher, "GW104")
    assert finding.layers == ("experts.5.0", "experts.5.2")
    patience = NoGradient().patience()
    assert finding.step == 5 * math.ceil((patience - 1) / 5)  # steps 0..45: 46 >= 44
    assert finding.evidence["branches"] == ["experts.5"]
    assert finding.evidence["container"] == "experts"
    assert finding.evidence["steps"] >= finding.evidence["required_steps"] == patience
    assert "experts.5" in finding.message and "never ran" in finding.message
    assert "router" in finding.hint and "load-balancing" in finding.hint
    assert [f.code for f in _alarms(watcher)] == ["GW104"]


def test_rule_memory_survives_a_checkpoint_resume():
    model = zoo.TopOneMoE(8, router_bias=[0, 0, 0, 0, 0, -10, 0, 0])
    first, _ = _moe_run(model, steps=30, watch={"every_n_steps": 5})
    state = first.state_dict()
    memory = state["engine"]["rules"]["no-gradient"]
    assert {e["module"] for e in memory["absent"]} == {"experts.5.0", "experts.5.2"}
    assert not _alarms(first)

    resumed = gradwatch.watch(model, reporters=[], every_n_steps=5)
    resumed.load_state_dict(state)
    _moe_run(model, steps=30, watcher=resumed)
    resumed.close()
    new = [f for f in _alarms(resumed, "GW104") if f.status == "new"]
    assert [f.step for f in new] == [45]  # as if never interrupted (44 steps counted)


def test_rule_memory_stays_bounded():
    rule = NoGradient()
    names = [f"heads.{i}" for i in range(MAX_TRACKED + 500)]
    layers = {n: LayerStats(n, "linear", missing_grad=("weight",)) for n in names}
    layers["trunk"] = LayerStats("trunk", "linear", grad_norm=1.0, grad_rms=0.1)
    facts = ModelFacts.from_layers([], frozenset())
    for step in range(3):
        stats = StepStats(step=step, layers=dict(layers), global_grad_norm=1.0)
        history = History()
        history.append(stats)
        rule.check(RuleContext(stats=stats, history=history, model=facts))
    assert len(rule.state_dict()["absent"]) == MAX_TRACKED


def test_explain_says_how_long_it_waits(capsys):
    assert main(["explain", "GW104"]) == 0
    out = capsys.readouterr().out
    assert "straight-through" in out and "load-balancing" in out
    assert "ln(miss_chance) / ln(1 - min_use)" in out and "44" in out
    assert "min_use = 0.1" in out


@pytest.mark.parametrize("how, hooks", [("round", True), ("round", False), ("detach", True)])
def test_a_cut_inside_a_module_list_is_blocked_not_routing(how, hooks):
    # members of a ModuleList that run at every step, in a chain: not experts
    watcher, _ = _run(zoo.QuantisedStack(how=how), lr=0.05, watch={"activations": hooks})
    finding = _first(watcher, "GW104")
    assert finding.step <= 45
    assert finding.layers == ("inp", "blocks.0.0", "blocks.1.0")
    assert finding.evidence["after"] == "blocks.2.0"
    assert finding.evidence["before"] == ("blocks.1.1" if hooks else "blocks.1.0")
    assert "straight-through" in finding.hint and "router" not in finding.hint
    assert [f.code for f in _alarms(watcher)] == ["GW104"]
