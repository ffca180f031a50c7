"""GradientMarks: a backward pass since the last look, whatever the gradients' clearing."""

from __future__ import annotations

import torch

from gradwatch.grad_marks import GradientMarks


def test_backward_passes_are_seen_through_every_way_of_clearing() -> None:
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    marks = GradientMarks()

    def backward() -> None:
        layer(torch.ones(1, 3)).sum().backward()

    assert not marks.changed(params)  # no gradient yet
    backward()
    assert marks.changed(params) and not marks.changed(params)
    opt.zero_grad(set_to_none=False)  # zeroed in place: written, so new
    assert marks.changed(params)
    backward()
    assert marks.changed(params) and not marks.changed(params)
    opt.zero_grad()  # set to None: gone is no change
    assert not marks.changed(params)
    backward()  # a new tensor where there was None
    assert marks.changed(params)
    layer.bias.grad = None  # only one of them gone, the other the same
    assert not marks.changed(params)
    layer(torch.ones(1, 3)).sum().backward()  # both again: the weight's accumulated
    assert marks.changed(params) and not marks.changed(params)
    marks.reset()
    assert marks.changed(params)  # forgotten: any gradient counts as new
