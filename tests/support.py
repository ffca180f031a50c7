"""Small real models and data for the tests: scikit-learn's bundled digits (no download)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn


@functools.lru_cache(maxsize=2)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def digits(standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits as (N, 64) floats and (N,) labels; standardised per pixel."""
    x, y = _digits_arrays()
    if standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x.clone(), y.clone()


def mlp(
    depth: int,
    activation: Callable[[], nn.Module] = nn.ReLU,
    *,
    width: int = 64,
    inputs: int = 64,
    outputs: int = 10,
    init: str | None = None,
    std: float | None = None,
) -> nn.Sequential:
    """``depth`` Linear layers with an activation between each (none after the last).

    ``init``: None (PyTorch's default), "kaiming", "xavier"; ``std``: normal(0, std) weights.
    """
    layers: list[nn.Module] = []
    fan = inputs
    for i in range(depth):
        out = outputs if i == depth - 1 else width
        linear = nn.Linear(fan, out)
        if init == "kaiming":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        elif init == "xavier":
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        if std is not None:
            nn.init.normal_(linear.weight, 0.0, std)
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(activation())
        fan = out
    return nn.Sequential(*layers)


def train(
    model: nn.Module,
    watcher,
    *,
    steps: int = 60,
    lr: float = 0.05,
    optimizer: str = "sgd",
    batch: int = 64,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    seed: int = 0,
    loss_fn: Callable | None = None,
    tell_optimizer: bool = True,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train on digits with ``watcher.step()`` between backward and optimizer step."""
    if x is None or y is None:
        x, y = digits()
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        torch.optim.Adam(params, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr)
    )
    loss_fn = loss_fn or nn.functional.cross_entropy
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=generator)
        if before_step is not None:
            before_step(step)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if watcher is not None:
            watcher.step(optimizer=opt if tell_optimizer else None)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_with_zeroed_aux_grads(model: nn.Module, watcher, *, steps: int) -> None:
    """Train ``zoo.Detached`` on digits with ``zero_grad(set_to_none=False)`` and its
    detached branch given gradients that exist but stay zero (never None)."""
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for p in model.aux.parameters():
        p.grad = torch.zeros_like(p)
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        watcher.step()
        opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def hooks_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Ids of every hook on every module, to compare before and after watching."""
    out = {}
    for name, module in model.named_modules():
        out[name] = tuple(
            sorted(
                [
                    *module._forward_hooks,
                    *module._forward_pre_hooks,
                    *module._backward_hooks,
                    *getattr(module, "_backward_pre_hooks", {}),
                ]
            )
        )
    return out
