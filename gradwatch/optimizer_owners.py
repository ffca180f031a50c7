"""Which optimizer steps which watched layer, learned from the training loop itself.

One watcher may cover networks that separate optimizers train on separate losses (a GAN's
generator and discriminator watched as one ``ModuleDict``): their gradient scales have
nothing to do with each other, so a depth comparison must not put one network's first
layer against the other's last. The watcher knows an optimizer only when it is given one;
this module listens to the first optimizer steps of the process (see
:mod:`gradwatch.optimizer_events`) until one that owns watched parameters steps a second
time, i.e. until one round of the loop's optimizers has been seen, and then stops
listening. Each listened step costs one look at that optimizer's parameter groups, once
per optimizer.

>>> import torch
>>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
>>> layers = [_Layer("a", list(a.named_parameters())), _Layer("b", list(b.named_parameters()))]
>>> owners = OptimizerOwners(layers)
>>> opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
>>> for opt in (opt_a, opt_b, opt_a):
...     opt.step()
>>> owners.of_layer
{'a': 0, 'b': 1}
>>> owners.close()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .optimizer_events import ListenerHandle, after_any_step

#: Optimizer steps listened to at most: a loop whose optimizers never repeat within this
#: many steps (each step a new optimizer object) is not learned further.
_MAX_STEPS = 64


@dataclass
class _Layer:
    """The two attributes of a watched layer this module reads (doctest stand-in)."""

    name: str
    params: list[tuple[str, Any]]


class OptimizerOwners:
    """Learns, from the first optimizer steps, which optimizer updates each watched layer.

    ``of_layer`` maps a layer's name to the index (in order of first step) of the
    optimizer that updates its first parameter; layers no optimizer updates are absent.
    It stays empty until one optimizer owning watched parameters has stepped twice.
    """

    def __init__(self, layers: Sequence[Any], guard: Any = None) -> None:
        self._first = {id(layer.params[0][1]): layer.name for layer in layers if layer.params}
        self._guard = guard
        self._seen: list[int] = []  # id() of the owning optimizers, in order of first step
        self._learning: dict[str, int] = {}
        self._steps = 0
        self.of_layer: dict[str, int] = {}
        self._handle: ListenerHandle | None = None
        if self._first:
            self._handle = after_any_step(self._after_step)

    @property
    def several(self) -> bool:
        """More than one optimizer updates the watched layers."""
        return len(set(self.of_layer.values())) > 1

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._guard is not None:
            self._guard.call("optimizer owners", self._learn, optimizer, default=None)
        else:
            self._learn(optimizer)

    def _learn(self, optimizer: Any) -> None:
        self._steps += 1
        if id(optimizer) in self._seen:
            self.of_layer = dict(self._learning)  # one round of the loop's optimizers seen
            self.close()
            return
        index = len(self._seen)
        owned = False
        for group in getattr(optimizer, "param_groups", None) or ():
            for param in group.get("params", ()):
                name = self._first.get(id(param))
                if name is not None:
                    owned = True
                    self._learning.setdefault(name, index)  # a wrapper and its inner: one
        if owned:
            self._seen.append(id(optimizer))
        if self._steps >= _MAX_STEPS:
            self.close()

    def close(self) -> None:
        """Stop listening (safe inside an optimizer step, and more than once)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


__all__ = ["OptimizerOwners"]
