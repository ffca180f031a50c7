"""Whether a backward pass ran since the last monitored step: some ``.grad`` is a new
tensor, or was added to in place (accumulation bumps its version counter).

The watcher asks at every monitored step, over every watched parameter, and keeps what it
saw until the next one. So that costs little: the per-parameter work is done by C-level
``map`` calls, not a Python loop, and what is kept is two flat lists (a weak reference to
each gradient, so that one the user frees is freed, and its version), not a tuple per
parameter: objects that live from one monitored step to the next are what makes Python's
garbage collector walk the whole heap, and there would be one per parameter per step.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch

_grad_of = attrgetter("grad")
_version_of = attrgetter("_version")


class GradientMarks:
    """The watched gradients as they were at the last call of :meth:`changed`.

    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> marks = GradientMarks()
    >>> marks.changed([p])  # no gradient yet
    False
    >>> p.sum().backward()
    >>> marks.changed([p]), marks.changed([p])  # a new gradient, then nothing new
    (True, False)
    >>> p.sum().backward()  # accumulated in place
    >>> marks.changed([p])
    True
    """

    def __init__(self) -> None:
        self._refs: list[Any] = []
        self._versions: list[int] = []

    def reset(self) -> None:
        self._refs, self._versions = [], []

    def changed(self, params: Sequence[torch.Tensor]) -> bool:
        """True when some gradient of ``params`` is a new tensor or was written to since
        the last call (a gradient gone to None is no change)."""
        grads = list(map(_grad_of, params))
        try:  # the usual case: every gradient there
            refs: list[Any] = list(map(weakref.ref, grads))
            versions = list(map(_version_of, grads))
        except (TypeError, AttributeError):  # some are None
            refs = [None if g is None else weakref.ref(g) for g in grads]
            versions = [-1 if g is None else g._version for g in grads]
        before, before_versions = self._refs, self._versions
        self._refs, self._versions = refs, versions
        if len(before) != len(grads):
            return any(g is not None for g in grads)
        for grad, then, version, then_version in zip(grads, before, versions, before_versions):
            if grad is not None and (then is None or then() is not grad or version != then_version):
                return True
        return False


__all__ = ["GradientMarks"]
