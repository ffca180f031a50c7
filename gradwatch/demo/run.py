"""Train one demo network under gradwatch and keep what the results table needs.

Every network gets the same recipe (plain SGD with momentum, batches of 128, gradients
clipped to norm 1) and its own learning rate; only the network and that rate differ.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..findings import Finding
from ..reporters.base import Reporter
from ..rules.engine import SummaryRow
from ..stats import StepStats
from ..watcher import watch
from .data import Digits
from .nets import DemoNet
from .options import DEFAULT_SEED, DEFAULT_STEPS, MIN_STEPS_FOR_FINDINGS

__all__ = [
    "BATCH",
    "CLIP_NORM",
    "DEFAULT_SEED",
    "DEFAULT_STEPS",
    "MIN_STEPS_FOR_FINDINGS",
    "MOMENTUM",
    "NetRun",
    "build_model",
    "one_thread",
    "train_net",
    "weight_layer_rms",
]

BATCH = 128
MOMENTUM = 0.9
#: Clipping keeps the large-learning-rate runs finite: it bounds each step, it does not
#: keep units alive.
CLIP_NORM = 1.0


@dataclass
class NetRun:
    """The outcome of training one network."""

    net: DemoNet
    steps: int
    findings: list[Finding]
    summary: list[SummaryRow]
    final_loss: float
    accuracy: float
    seconds: float
    #: Number of weight (Linear) layers.
    depth: int = 0
    #: Gradient RMS of each weight layer (input side first) at the last monitored step.
    layer_rms: list[tuple[str, float]] = field(default_factory=list)
    rms_step: int | None = None
    #: The statistics of each monitored step at which findings were announced (what the
    #: terminal panels showed), by step.
    finding_stats: dict[int, StepStats] = field(default_factory=dict)

    @property
    def problems(self) -> list[Finding]:
        """Findings of severity warning or error (not the "resolved" notes)."""
        return [f for f in self.findings if f.severity in ("warning", "error")]

    @property
    def problem_rows(self) -> list[SummaryRow]:
        return [row for row in self.summary if row.severity in ("warning", "error")]

    @property
    def first_last_ratio(self) -> float | None:
        """First weight layer's gradient RMS over the last one's (None if unmeasured)."""
        if len(self.layer_rms) < 2:
            return None
        first, last = self.layer_rms[0][1], self.layer_rms[-1][1]
        if not math.isfinite(first) or not math.isfinite(last) or last == 0:
            return None
        return first / last

    @property
    def as_expected(self) -> bool:
        return bool(self.problems) == self.net.expect_findings


def weight_layer_rms(stats: StepStats | None) -> list[tuple[str, float]]:
    """(name, gradient RMS) of the Linear/Conv layers with a gradient, in forward order."""
    if stats is None:
        return []
    return [
        (s.name, float(s.grad_rms))
        for s in stats.by_depth(with_gradient=True)
        if s.kind in ("linear", "conv") and s.grad_rms is not None
    ]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread, then restore the caller's setting.

    With several threads, CPU kernels split their sums differently depending on the
    thread count, so the last bits of a result depend on it; plain SGD amplifies such
    differences over a few hundred steps (chaotic training), and losses and accuracies
    end up different. One thread makes a run repeat bit for bit on a given machine
    whatever the caller's setting; the matrices are tiny, so nothing is lost (and on a
    busy machine idle worker threads made the demo 20x slower).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_model(net: DemoNet, seed: int) -> nn.Module:
    """The network's initial weights depend only on ``seed``, not on which other networks
    ran before it (and the caller's random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return net.build()


def train_net(
    net: DemoNet,
    data: Digits,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = DEFAULT_SEED,
    reporters: Sequence[Reporter] = (),
    on_step: Callable[[int], None] | None = None,
) -> NetRun:
    """Train ``net`` on ``data`` for ``steps`` steps with gradwatch's default settings.

    >>> from gradwatch.demo.data import load_digits  # doctest: +SKIP
    >>> from gradwatch.demo.nets import get_net  # doctest: +SKIP
    >>> run = train_net(get_net("sigmoid"), load_digits(), steps=40)  # doctest: +SKIP
    >>> [f.code for f in run.problems]  # doctest: +SKIP
    ['GW101']
    """
    with one_thread():
        return _train(net, data, steps, seed, reporters, on_step)


def _train(
    net: DemoNet,
    data: Digits,
    steps: int,
    seed: int,
    reporters: Sequence[Reporter],
    on_step: Callable[[int], None] | None,
) -> NetRun:
    model = build_model(net, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=net.lr, momentum=MOMENTUM)
    batches = torch.Generator().manual_seed(seed)
    shown = _FindingStats()
    started = time.perf_counter()
    with watch(model, optimizer=optimizer, reporters=[*reporters, shown]) as watcher:
        for step in range(steps):
            idx = torch.randint(0, len(data.x_train), (BATCH,), generator=batches)
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            # Clip first, so that gradwatch sees the gradient the optimizer will apply.
            nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            watcher.step()
            optimizer.step()
            if on_step is not None:
                on_step(step)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        final_loss = float(nn.functional.cross_entropy(model(data.x_train), data.y_train))
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    latest = watcher.latest
    return NetRun(
        net=net,
        steps=steps,
        findings=watcher.findings,
        summary=watcher.summary(),
        final_loss=final_loss,
        accuracy=accuracy,
        seconds=seconds,
        depth=sum(1 for m in model.modules() if isinstance(m, nn.Linear)),
        layer_rms=weight_layer_rms(latest),
        rms_step=latest.step if latest is not None else None,
        finding_stats=shown.by_step,
    )


class _FindingStats(Reporter):
    """Keeps the statistics that came with new findings: what the panels were drawn from."""

    name = "finding-stats"

    def __init__(self) -> None:
        self.by_step: dict[int, StepStats] = {}

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        if findings:
            self.by_step[stats.step] = stats
