"""A GAN watched as one module, without optimizer=: the generator and the discriminator are
trained by separate optimizers on separate losses, so GW101 compares depths within each
network, not the generator's first layer with the discriminator's last."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch
from gradwatch.optimizer_owners import OptimizerOwners


def _digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32) / 16.0


def _mlp(sizes: list[int], act: type[nn.Module], end: nn.Module | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    if end is not None:
        layers.append(end)
    return nn.Sequential(*layers)


def _gan(gen: nn.Module, steps: int = 120) -> list[gradwatch.Finding]:
    torch.manual_seed(38)
    x = _digits()
    disc = _mlp([64, 64, 1], nn.LeakyReLU)
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    watcher = gradwatch.watch(nn.ModuleDict({"gen": gen, "disc": disc}), every_n_steps=5)
    bce = nn.BCEWithLogitsLoss()
    for i in range(steps):
        real = x[(i * 32) % 1760 :][:32]
        fake = gen(torch.randn(32, gen[0].in_features))
        d_loss = bce(disc(real), torch.ones(32, 1)) + bce(disc(fake.detach()), torch.zeros(32, 1))
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        g_loss = bce(disc(fake), torch.ones(32, 1))
        opt_g.zero_grad()
        g_loss.backward()
        watcher.step(loss=g_loss)
        opt_g.step()
    watcher.close()
    return list(watcher.findings)


def test_gan_in_one_watcher_is_silent() -> None:
    torch.manual_seed(38)
    found = _gan(_mlp([16, 64, 64], nn.ReLU, end=nn.Sigmoid()))
    assert [f.code for f in found if f.code == "GW101"] == []


def test_vanishing_inside_the_generator_is_still_found() -> None:
    torch.manual_seed(38)
    deep = _mlp([16] + [64] * 14, nn.Sigmoid, end=nn.Sigmoid())
    found = [f for f in _gan(deep, steps=40) if f.code == "GW101"]
    assert found and all(name.startswith("gen.") for name in found[0].layers)


def test_owners_learned_from_one_round_of_optimizer_steps() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    watched = nn.ModuleDict({"a": a, "b": b})
    watcher = gradwatch.watch(watched, every_n_steps=1)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    owners: OptimizerOwners = watcher._owners
    for opt in (opt_a, opt_b):
        opt.step()
        assert owners.of_layer == {}  # not one round yet
    opt_a.step()
    assert owners.of_layer == {"a": 0, "b": 1} and owners.several
    watcher.close()
