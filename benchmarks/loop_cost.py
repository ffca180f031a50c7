"""Host cost of the training-loop checks, per step, in thread CPU time.

For a narrow ReLU MLP (many modules, little arithmetic) and a top-1 mixture of experts
(ModuleList members followed at every step), trained with ``watcher.step()`` called by
hand or from the optimizer's step hook (``gradwatch.watch(model, optimizer=opt)``):

  in-between step()   median time inside ``watcher.step()`` on a step that is not
                      monitored (with the optimizer hook: the time the hook adds to
                      ``optimizer.step()``, minus a bare ``optimizer.step()``)
  monitored step()    median time inside ``watcher.step()`` on a monitored step

Run it with ``PYTHONPATH`` pointing at another checkout to compare (the optimizer-hook
rows need a gradwatch that has them).

Run:  python benchmarks/loop_cost.py            (about a minute)
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch

clock = time.thread_time


def mlp(depth: int, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(width, 10 if i == depth - 1 else width))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MoE(nn.Module):
    def __init__(self, experts: int = 8, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        probs = self.router(h).softmax(-1)
        gate, choice = probs.max(-1)
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                mixed = mixed.index_add(0, rows, expert(h[rows]) * gate[rows, None])
        return self.out(h + mixed)


def run(build, *, hooked: bool, steps: int = 300, every: int = 15) -> dict[str, float]:
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    options = {"optimizer": opt} if hooked else {}
    watcher = gradwatch.watch(model, every_n_steps=every, reporters=[], **options)
    between, monitored = [], []
    for step in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if hooked:
            started = clock()
            opt.step()
            spent = clock() - started
        else:
            started = clock()
            watcher.step()
            spent = clock() - started
            opt.step()
        (monitored if step % every == 0 else between).append(spent)
    watcher.close()
    # A bare optimizer step, to subtract from the hooked timings.
    bare = []
    for _ in range(100):
        F.cross_entropy(model(x), y).backward()
        started = clock()
        opt.step()
        bare.append(clock() - started)
        opt.zero_grad()
    base = statistics.median(bare) if hooked else 0.0
    return {
        "in-between step() us": 1e6 * (statistics.median(between) - base),
        "monitored step() ms": 1e3 * (statistics.median(monitored) - base),
    }


def main() -> None:
    cases = {"mlp50": lambda: mlp(50), "mlp200": lambda: mlp(200), "moe8": MoE}
    for name, build in cases.items():
        for hooked in (False, True):
            if hooked and importlib.util.find_spec("gradwatch.optimizer_hooks") is None:
                continue
            result = run(build, hooked=hooked)
            how = "optimizer hook" if hooked else "watcher.step()"
            cells = ", ".join(f"{k} {v:.1f}" for k, v in result.items())
            print(f"{name:7s} {how:15s} {cells}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
