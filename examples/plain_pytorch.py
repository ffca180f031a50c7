"""gradwatch in a plain PyTorch training loop: two added lines.

A deep tanh network with small initial weights trains on a synthetic task; gradwatch
prints, while it trains, that the first layers get almost no gradient, why, and what to
change. The same network built the way the fix suggests then trains without a finding.

    python examples/plain_pytorch.py

Needs only torch (and gradwatch); runs in a few seconds on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import gradwatch


def make_data(n: int = 2048, features: int = 32, classes: int = 4, seed: int = 0):
    """Inputs with mean 0 and std 1; labels from a random linear teacher."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    return x, (x @ teacher).argmax(1)


def deep_tanh(depth: int = 12, width: int = 64, std: float = 0.05) -> nn.Sequential:
    """The broken model: many tanh layers with weights too small for their depth."""
    layers: list[nn.Module] = []
    fan_in = 32
    for _ in range(depth - 1):
        linear = nn.Linear(fan_in, width)
        nn.init.normal_(linear.weight, 0.0, std)
        layers += [linear, nn.Tanh()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 4))
    return nn.Sequential(*layers)


def deep_relu(depth: int = 12, width: int = 64) -> nn.Sequential:
    """The fix gradwatch suggests: ReLU activations with kaiming (He) init."""
    layers: list[nn.Module] = []
    fan_in = 32
    for _ in range(depth - 1):
        linear = nn.Linear(fan_in, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 4))
    return nn.Sequential(*layers)


def train(model: nn.Module, steps: int = 100, lr: float = 0.05) -> list[gradwatch.Finding]:
    x, y = make_data()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    batches = torch.Generator().manual_seed(1)
    # (1) Watch the model. Findings print to the terminal as they happen.
    with gradwatch.watch(model, optimizer=optimizer) as watcher:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=batches)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            watcher.step(loss=loss)  # (2) after backward(), before optimizer.step()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"final loss {loss.item():.3f}, accuracy {accuracy:.1%}")
    return [f for f in watcher.findings if f.severity != "info"]


def main() -> None:
    torch.manual_seed(0)
    print("== a 12-layer tanh network, weights N(0, 0.05) ==")
    broken = train(deep_tanh())
    print("\n== the same depth with ReLU and kaiming init ==")
    fixed = train(deep_relu())
    print(
        f"\nbroken model: {len(broken)} finding(s) "
        f"({', '.join(sorted({f.code for f in broken})) or 'none'}); "
        f"fixed model: {len(fixed)} finding(s)"
    )


if __name__ == "__main__":
    main()
