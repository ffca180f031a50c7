"""The collector keeps its plan for reading gradients from step to step: whatever changes
between steps (a gradient missing, a parameter resized, a sparse gradient), the numbers
must be those of a collector that plans afresh."""

import torch
from torch import nn

from gradwatch.collect import Collector, read
from gradwatch.distributed import Reducer
from gradwatch.layers import discover
from gradwatch.probes import ProbeRecord


def _measured(collector: Collector, layers) -> dict:
    packed, layout = collector.measure(0, ProbeRecord(), detail=False)
    stats = read(packed.tolist(), layout, layers, {}, None)
    return {
        s.name: (s.grad_norm, s.numel, s.units, s.zero_grad_units, s.missing_grad)
        for s in stats
    }


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()


def test_a_kept_plan_reads_what_a_fresh_one_reads_as_the_gradients_change():
    torch.manual_seed(0)
    model = nn.Sequential(
        *(m for _ in range(10) for m in (nn.Linear(8, 8), nn.ReLU())), nn.Linear(8, 2)
    )
    layers = discover(model)
    kept = Collector(layers, Reducer(False))
    afresh = Collector(layers, Reducer(False))  # plans again at every step
    x = torch.randn(16, 8)

    def changes():
        yield "same as before"
        model[4].weight.grad = None  # a gradient missing (an unused branch)
        yield "one gradient missing"
        yield "it is back"
        with torch.no_grad():  # a parameter resized in place: nothing registers it
            model[6].weight.data = torch.randn(8, 8)[:5].contiguous()
            model[6].bias.data = torch.zeros(5)
            model[8].weight.data = torch.randn(8, 5)
        model[6].weight.grad = torch.ones(5, 8)
        model[6].bias.grad = torch.zeros(5)
        model[8].weight.grad = torch.zeros(8, 5)
        model[8].weight.grad[3] = 1.0  # units of a row: only row 3 alive
        yield "layers resized"
        model[0].weight.grad = model[0].weight.grad.to_sparse()
        yield "a sparse gradient"

    _backward(model, x)
    for what in changes():
        afresh._plan = None
        expected = _measured(afresh, layers)
        assert _measured(kept, layers) == expected, what
    assert _measured(kept, layers)["8"][3].count() == 7  # 7 of 8 rows of zeros


def test_the_plan_holds_no_gradient_between_steps():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    layers = discover(model)
    collector = Collector(layers, Reducer(False))
    model(torch.randn(3, 4)).sum().backward()
    collector.measure(0, ProbeRecord(), detail=True)
    plan = collector._plan
    assert plan is not None and all(slot.grad is None for slot in plan.slots)
