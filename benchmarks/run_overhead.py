"""What ``gradwatch run`` costs compared with watching by hand.

``gradwatch run`` calls ``watcher.step(step, optimizer=...)`` from a process-wide optimizer
pre-hook instead of from the loop. Three copies of one model train in lockstep, one step
each in turn in rotating order (bare; watched by hand with its defaults; attached as
``gradwatch run`` attaches, with its defaults), each step timed in thread CPU time; pairing
single steps keeps a busy machine's drift out of the differences. Then:

  hook alone      the optimizer hook's own cost per step (a look-up and a call), measured
                  by calling it for an optimizer whose parameters belong to no model
  finding models  the one-time scan for the model when an optimizer first steps, in a
                  process with torch only and after importing transformers

Run:  python benchmarks/run_overhead.py            (about a minute on 2 busy CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import gradwatch
from gradwatch.attach import Attachment
from gradwatch.trained import trained_models


def model(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def lockstep(depth: int, width: int, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = model(depth, width)
    nets = {name: copy.deepcopy(base) for name in ("bare", "by hand", "gradwatch run")}
    optimizers = {name: torch.optim.SGD(net.parameters(), lr=0.01) for name, net in nets.items()}
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    by_hand = gradwatch.watch(nets["by hand"], reporters=[])
    attached = Attachment(reporters=lambda m: []).start()
    # Attachment sees every optimizer: keep only the attached copy's.
    original = attached._before_step

    def only_ours(optimizer, args, kwargs):
        if optimizer is optimizers["gradwatch run"]:
            original(optimizer, args, kwargs)

    attached._handles[0].remove()
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    attached._handles[0] = register_optimizer_step_pre_hook(only_ours)
    times: dict[str, list[float]] = {name: [] for name in nets}
    names = list(nets)
    for step in range(steps):
        order = names[step % 3 :] + names[: step % 3]
        for name in order:
            net, optimizer = nets[name], optimizers[name]
            started = time.thread_time()
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if name == "by hand":
                by_hand.step(optimizer=optimizer)
            optimizer.step()
            times[name].append(time.thread_time() - started)
    by_hand.close()
    attached.close()
    warm = steps // 10
    return {name: statistics.mean(values[warm:]) for name, values in times.items()}


def hook_cost(calls: int = 20_000) -> tuple[float, float]:
    """Microseconds per ``optimizer.step()`` that the hook adds when it has nothing to
    step: the hook function alone, and a whole ``optimizer.step()`` with it minus without."""
    stray = nn.Parameter(torch.zeros(1))  # owned by no module: no watcher
    optimizer = torch.optim.SGD([stray], lr=0.0)

    def steps() -> float:
        started = time.thread_time()
        for _ in range(calls):
            optimizer.step()
        return (time.thread_time() - started) / calls * 1e6

    without = min(steps() for _ in range(3))
    attachment = Attachment(reporters=lambda m: []).start()
    optimizer.step()  # first step: the model search
    with_hook = min(steps() for _ in range(3))
    started = time.thread_time()
    for _ in range(calls):
        attachment._before_step(optimizer, (), {})
    alone = (time.thread_time() - started) / calls * 1e6
    attachment.close()
    return alone, with_hook - without


def search_cost(import_transformers: bool) -> float:
    if import_transformers:
        import transformers  # noqa: F401
        from transformers import Trainer  # noqa: F401
    net = model(8, 64)
    params = list(net.parameters())
    started = time.perf_counter()
    found = trained_models(params)
    assert found == [net]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("thread CPU time per training step (mean after warm-up), 1 step in 15 measured:")
    for depth, width, batch in ((8, 256, 64), (30, 64, 32)):
        means = lockstep(depth, width, batch, args.steps)
        bare = means["bare"]
        cells = ", ".join(
            f"{name} {value * 1e3:.3f} ms ({value / bare:.3f}x)" for name, value in means.items()
        )
        print(f"  ReLU MLP {depth}x{width}, batch {batch}: {cells}")
    alone, step = hook_cost()
    print(f"hook alone: {alone:.2f} us per call; optimizer.step() with it minus without: "
          f"{step:.2f} us")
    print(f"finding models (once per optimizer): torch only {search_cost(False) * 1e3:.0f} ms, "
          f"with transformers imported {search_cost(True) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
