"""ReLU unit activity summed in one batch at the end of the forward pass (gradwatch.unit_sums)
gives the same statistics as one sum per call, and holds a bounded amount of memory."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch
from gradwatch import unit_sums
from gradwatch.probes import per_unit_sum
from gradwatch.unit_sums import PENDING_BYTES, PENDING_EACH, PendingSums, accumulate


def test_batched_sums_equal_one_sum_per_call_in_call_order():
    g = torch.Generator().manual_seed(0)
    calls = [
        (0, (8, 5), 1, torch.float32),
        (1, (4, 3, 6), 2, torch.float32),
        (0, (8, 5), 1, torch.float32),  # a module called twice: its sums add up
        (2, (2, 3, 4, 4), 1, torch.float32),
        (3, (7,), 0, torch.float32),
        (4, (8, 5), 1, torch.float64),
        (1, (4, 3, 6), 1, torch.float32),  # another unit axis: the sum restarts
        (0, (8, 5), 1, torch.float32),
    ]
    expected: dict[int, torch.Tensor] = {}
    pending = PendingSums()
    for index, shape, axis, dtype in calls:
        output = torch.relu(torch.randn(shape, generator=g, dtype=dtype)).requires_grad_()
        accumulate(expected, index, per_unit_sum(output.detach(), axis))
        assert pending.add(index, output, axis)
    got: dict[int, torch.Tensor] = {}
    pending.flush(got)
    assert len(pending) == 0
    assert got.keys() == expected.keys()
    for index in expected:
        assert got[index].dtype == expected[index].dtype
        assert torch.equal(got[index], expected[index]), index
        assert not got[index].requires_grad


def test_holds_only_small_outputs_that_autograd_keeps_and_a_bounded_total():
    pending = PendingSums()
    large = torch.zeros(PENDING_EACH // 4 + 1, requires_grad=True)
    assert not pending.add(0, large, 0)
    assert not pending.add(0, torch.zeros(4, 4), 1)  # no gradient: not saved for backward
    each = torch.zeros(PENDING_EACH // 4, requires_grad=True)
    held = 0
    while pending.add(1, each, 0):
        held += 1
    assert held == PENDING_BYTES // PENDING_EACH
    assert not pending.add(2, torch.zeros(1, requires_grad=True), 0)


class _SharedReLU(nn.Module):
    """One ReLU module called twice per pass, and five units of ``b`` that never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            self.b.bias[:5] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.b(self.act(self.a(x)))))


class _Masks:
    name = "masks"

    def __init__(self) -> None:
        self.steps: list[dict[str, str | None]] = []

    def report(self, stats, new) -> None:
        self.steps.append(
            {
                name: None if layer.active_units is None else layer.active_units.to_hex()
                for name, layer in stats.layers.items()
            }
        )


def _active_units(monkeypatch, each: int) -> tuple[list[dict[str, str | None]], int, int]:
    monkeypatch.setattr(unit_sums, "PENDING_EACH", each)
    batched = []
    flush = PendingSums.flush

    def counting_flush(self, store):
        batched.append(len(self))
        flush(self, store)

    monkeypatch.setattr(PendingSums, "flush", counting_flush)
    torch.manual_seed(0)
    model = _SharedReLU()
    masks = _Masks()
    watcher = gradwatch.watch(model, reporters=[masks], every_n_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    held = 0
    for step in range(6):
        x, y = torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)
        out = model(x)
        held += len(watcher._probes.record.pending)  # after the pass: all summed already
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        watcher.step(step)
        opt.step()
    watcher.close()
    return masks.steps, held, sum(batched)


def test_dead_units_are_found_alike_with_and_without_batching(monkeypatch):
    batched, held, summed_together = _active_units(monkeypatch, PENDING_EACH)
    one_by_one, _, none = _active_units(monkeypatch, 0)  # every output summed at its call
    assert summed_together > 0 and none == 0
    assert held == 0
    assert batched == one_by_one
    # the five units that never fire are seen as such, so the comparison means something
    assert any(
        mask is not None and mask != "ffff" for step in batched for mask in step.values()
    )
