"""What a monitored step costs, and what the steps in between cost, step by step.

An LLM has 200-400 weight layers. What gradwatch adds to a step it measures grows with
the number of modules (hooks, one statistic slot per parameter, the rules), not with their
size, so the main cases here are ReLU MLPs of 50, 200 and 400 Linear layers that are narrow
(width 32, batch 32): the arithmetic of a training step is small, and what remains is the
per-module work that gradwatch and PyTorch do on the host. ``gpt2`` is the GPT-2-small-shaped
model of benchmarks/overhead.py (12 blocks, 76 weight layers); ``mlp``, ``cnn`` and
``transformer`` are its other models (``--loss``: with ``watcher.step(loss=loss)``).

Three copies of the model train in lockstep, one step each in turn, in rotating order (bare,
gradwatch measuring every step, gradwatch with its defaults), each step timed in thread CPU
time.
Pairing single steps, rather than comparing blocks of steps, keeps a busy machine's drift
out of the differences. Per case it reports:

  bare step          median time of a plain training step
  monitored adds     median of a monitored step minus the bare median, split into the
                     time inside ``watcher.step()`` (statistics, transfer, rules) and the
                     rest (the forward and backward hooks of the monitored step)
  per layer          that extra per weight layer, in microseconds
  in between adds    a not-monitored step of the default configuration minus bare (two
                     copies of a model can differ by ~2%: this includes that)
  of which in step() the time inside ``watcher.step()`` of a not-monitored step (the
                     every-step sentinel), measured directly
  every step         ratio to bare when every step is measured
  default            ratio to bare with the defaults (1 step in 15 measured; detail steps
                     every 200, included at their share)

Run:  python benchmarks/host_cost.py                 (about 4 minutes on 2 CPU cores)
      python benchmarks/host_cost.py --cases mlp400 --steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch
from gradwatch.sentinel import sample_parameters

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_hooks import OwnHooks  # next to this file

clock = time.thread_time


def mlp(depth: int, width: int = 32) -> nn.Sequential:
    """``depth`` Linear layers with ReLU between them, kaiming init (a healthy network)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(width, 10 if i == depth - 1 else width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mlp_case(depth: int) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    def build():
        return mlp(depth), (torch.randn(32, 32), torch.randint(0, 10, (32,)))

    return build


def overhead_case(name: str) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """A model of benchmarks/overhead.py, with its (fixed) batch."""

    def build():
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from overhead import CASES as OVERHEAD_CASES

        model, batch = OVERHEAD_CASES[name]()
        return model, batch()

    return build


CASES = {
    "mlp50": mlp_case(50),
    "mlp200": mlp_case(200),
    "mlp400": mlp_case(400),
    # the models of benchmarks/overhead.py
    "mlp": overhead_case("mlp"),
    "cnn": overhead_case("cnn"),
    "transformer": overhead_case("transformer"),
    "gpt2": overhead_case("gpt2"),
}


class CheckFloor:
    """Where ``watcher.step()`` would run, only the arithmetic of gradwatch's every-step
    check, by hand: the same sample of gradients concatenated into a kept buffer, its
    norm, and the norm and the loss read with ``item()``. Its time there is the floor of
    a step in between: what no leaner implementation of the same check could remove, with
    the caches as cold as the watched copy has them."""

    def __init__(self, model: nn.Module, pass_loss: bool) -> None:
        self.sample = sample_parameters(list(model.parameters()))
        self.buffer = torch.empty(sum(p.numel() for p in self.sample))
        self.norm = torch.empty(())
        self.pass_loss = pass_loss

    def step(self, loss: torch.Tensor) -> None:
        grads = [p.grad for p in self.sample]
        torch.linalg.vector_norm(torch.cat(grads, out=self.buffer), out=self.norm)
        self.norm.item()
        if self.pass_loss:
            loss.item()

    def close(self) -> None:
        pass


class Copy:
    """One copy of the model and its optimizer: bare, watched (``every`` is the interval),
    or doing in ``watcher.step()``'s place one of two floors: ``every="floor"``, the floor
    of per-step monitoring (see benchmarks/overhead.py: ReLU unit masks from per-module
    forward hooks, one fused norm pass, one read-back), or ``every="check floor"``, the
    every-step check's arithmetic (:class:`CheckFloor`)."""

    def __init__(
        self, model: nn.Module, every: int | str | None, pass_loss: bool = False
    ) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.watcher = None
        self.floor: Any = None  # what runs where watcher.step() would: .step(loss), .close()
        #: what this copy arms (from watch() on) is present only while it steps
        self.hooks = OwnHooks()
        if every == "floor":
            from overhead import Floor  # next to this file

            self.floor = Floor(model)
        elif every == "check floor":
            self.floor = CheckFloor(model, pass_loss)
        elif every is not None:
            options = {"every_n_steps": every} if every != 15 else {}
            with self.hooks:
                self.watcher = gradwatch.watch(model, reporters=[], optimizer=self.opt, **options)
        self.count = 0
        #: pass the loss to watcher.step (the every-step sentinel then also checks it)
        self.pass_loss = pass_loss
        self.monitored: list[float] = []
        self.between: list[float] = []
        self.inside: list[float] = []
        self.between_inside: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
        with self.hooks:
            self._step(x, y, record)

    def _step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
        monitored = self.watcher is not None and self.watcher.is_monitored(self.count)
        start = clock()
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        inside = 0.0
        if self.watcher is not None or self.floor is not None:
            before = clock()
            if self.watcher is None:
                self.floor.step(loss)
            elif self.pass_loss:
                self.watcher.step(self.count, loss=loss)
            else:
                self.watcher.step(self.count)
            inside = clock() - before
        self.count += 1
        self.opt.step()
        elapsed = clock() - start
        if record:
            (self.monitored if monitored else self.between).append(elapsed)
            (self.inside if monitored else self.between_inside).append(inside)

    def close(self) -> None:
        if self.watcher is not None:
            with self.hooks:
                self.watcher.close()
        if self.floor is not None:
            self.floor.close()


def measure(
    case: str, steps: int, warmup: int, pass_loss: bool = False, floor: bool = False
) -> dict[str, float]:
    """The figures of one case: bare, every step, defaults and the monitoring floor
    (``every="floor"`` of :class:`Copy`) in lockstep; with ``floor``, also ``floor_us``, the
    floor of a step in between (see :class:`CheckFloor`)."""
    torch.manual_seed(0)
    model, (x, y) = CASES[case]()
    copies = [
        Copy(copy.deepcopy(model), every, pass_loss) for every in (None, 1, 15, "floor")
    ]
    if floor:
        copies.append(Copy(copy.deepcopy(model), "check floor", pass_loss))
    n = len(copies)
    try:
        for i in range(warmup + steps):
            # Lockstep, so drift of the machine hits all copies alike; the order rotates,
            # so none always runs with the caches another one left.
            for c in copies[i % n :] + copies[: i % n]:
                c.step(x, y, record=i >= warmup)
    finally:
        for c in copies:
            c.close()
    bare_copy, every_copy, default_copy, monitor_floor_copy = copies[:4]
    bare = statistics.median(bare_copy.between)
    monitor_floor = statistics.median(monitor_floor_copy.between)
    monitored = statistics.median(every_copy.monitored)
    inside = statistics.median(every_copy.inside)
    between = statistics.median(default_copy.between)
    between_inside = statistics.median(default_copy.between_inside)
    default_monitored = statistics.median(default_copy.monitored)
    layers = sum(1 for layer in every_copy.watcher.layers if layer.params)
    extra = monitored - bare
    result = {
        "case": case,
        "weight_layers": layers,
        "bare_ms": 1e3 * bare,
        "monitored_extra_ms": 1e3 * extra,
        "in_step_ms": 1e3 * inside,
        "in_hooks_ms": 1e3 * (extra - inside),
        "per_layer_us": 1e6 * extra / layers,
        "monitor_floor_ms": 1e3 * (monitor_floor - bare),
        "monitor_floor_per_layer_us": 1e6 * (monitor_floor - bare) / layers,
        "between_extra_ms": 1e3 * (between - bare),
        "between_in_step_us": 1e6 * between_inside,
        "every_step_ratio": monitored / bare,
        "default_ratio": (14 * between + default_monitored) / 15 / bare,
    }
    if floor:
        result["floor_us"] = 1e6 * statistics.median(copies[4].between_inside)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="mlp50,mlp200,mlp400,gpt2")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per copy")
    parser.add_argument("--warmup", type=int, default=45)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--loss", action="store_true", help="watcher.step(loss=loss)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results = []
    for case in args.cases.split(","):
        if case not in CASES:
            parser.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        results.append(measure(case, args.steps, args.warmup, args.loss))
        print(f"{case}: done", file=sys.stderr)
    loss = ", step(loss=)" if args.loss else ""
    where = f"torch {torch.__version__}, {args.threads} thread{loss}"
    print(f"\ncost of gradwatch per step ({where})\n")
    print("| case | weight layers | bare step | monitored adds | in watcher.step() | in hooks "
          "| per layer | in between adds | of which in step() | every step | default |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['case']} | {r['weight_layers']} | {r['bare_ms']:.2f} ms"
            f" | {r['monitored_extra_ms']:.2f} ms | {r['in_step_ms']:.2f} ms"
            f" | {r['in_hooks_ms']:.2f} ms | {r['per_layer_us']:.0f} us"
            f" | {r['between_extra_ms']:+.2f} ms | {r['between_in_step_us']:.0f} us"
            f" | {r['every_step_ratio']:.2f}x"
            f" | {r['default_ratio']:.3f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "results": results},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
