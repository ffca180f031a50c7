"""What the watcher measures, checked against the demo's networks (deep sigmoid, ReLU,
residual) on digits."""

import math

import torch
from torch import nn

import gradwatch

from .support import digits, hooks_of, mlp, train


def _first_last(stats):
    linears = [s for s in stats.by_depth(with_gradient=True) if s.kind == "linear"]
    return linears[0], linears[-1]


def test_deep_sigmoid_first_layer_gets_almost_nothing():
    model = mlp(30, nn.Sigmoid)
    with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
        train(model, watcher, steps=3, lr=0.1)
        first, last = _first_last(watcher.latest)
    assert first.name == "0" and last.name == "58"
    assert first.grad_norm < 1e-6 * last.grad_norm


def test_deep_relu_with_kaiming_init_keeps_the_gradient_within_100x():
    model = mlp(30, nn.ReLU, init="kaiming")
    with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
        train(model, watcher, steps=3, lr=0.01)
        first, last = _first_last(watcher.latest)
    assert last.grad_norm / 100 < first.grad_norm < last.grad_norm * 100


def test_grad_norm_matches_torch():
    model = mlp(4, nn.ReLU)
    x, y = digits()
    with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
        nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        watcher.step()
        stats = watcher.latest
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            expected = torch.sqrt(module.weight.grad.pow(2).sum() + module.bias.grad.pow(2).sum())
            assert math.isclose(stats.layers[name].grad_norm, float(expected), rel_tol=1e-5)
            numel = module.weight.numel() + module.bias.numel()
            assert math.isclose(
                stats.layers[name].grad_rms, float(expected) / math.sqrt(numel), rel_tol=1e-5
            )
            expected_max = max(module.weight.grad.abs().max(), module.bias.grad.abs().max())
            assert math.isclose(stats.layers[name].grad_max, float(expected_max), rel_tol=1e-6)
            weight, bias = module.weight.detach(), module.bias.detach()
            expected_param = torch.sqrt(weight.pow(2).sum() + bias.pow(2).sum())
            assert math.isclose(stats.layers[name].param_norm, float(expected_param), rel_tol=1e-5)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert math.isclose(stats.global_grad_norm, float(total), rel_tol=1e-5)


def test_depth_follows_forward_order_not_registration_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(16, 10)  # registered first, runs last
            self.early = nn.Linear(64, 16)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    model = Reversed()
    with gradwatch.watch(model, every_n_steps=1, reporters=[]) as watcher:
        train(model, watcher, steps=1)
        order = [s.name for s in watcher.latest.by_depth(with_gradient=True)]
    assert order == ["early", "late"]


def test_close_restores_exactly_the_hooks_the_model_had():
    model = mlp(6, nn.ReLU)
    own = model[0].register_forward_hook(lambda *a: None)
    before = hooks_of(model)
    watcher = gradwatch.watch(model, every_n_steps=2, reporters=[])
    train(model, watcher, steps=5)
    watcher.close()
    assert hooks_of(model) == before
    own.remove()
