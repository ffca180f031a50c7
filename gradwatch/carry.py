"""Exact detection of gradients carried across an optimizer step (``zero_grad`` forgotten,
or clearing only part of the model).

PyTorch's ``AccumulateGrad`` adds a new gradient *in place* into an existing ``.grad``
(its version counter goes up by exactly one) and creates a new tensor when ``.grad`` is
None. ``zero_grad()`` sets ``.grad`` to None (the default) or zeroes it in place (one
more version). Optimizers read ``.grad`` without writing it. So a parameter whose
``.grad`` is, at each accumulation between one ``optimizer.step()`` and the next, the
same tensor with its version exactly one above the version it had before, and is still
that tensor when the next step starts, was never cleared: the step uses the sum of this
step's gradients and every earlier one.

Intended accumulation (``zero_grad`` and ``step`` every k micro-batches, DDP's
``no_sync``, Lightning's ``accumulate_grad_batches``, the Trainer's
``gradient_accumulation_steps``) clears after each optimizer step and is never flagged;
a GAN whose generator's backward also fills the discriminator's ``.grad`` clears it
before the discriminator's step. Anything else that touches ``.grad`` in between (an
in-place scaling between micro-batches) breaks the chain and the check stays silent: it
can miss, never invent.

Cost: nothing on most steps. After a monitored step, PyTorch's process-wide optimizer
hooks are registered until the next optimizer step that owns a checked parameter, and
one post-accumulate-grad hook per checked parameter (one per watched layer, at most
``MAX_CHECKED``) lives for one optimizer step. What a cycle follows is kept in flat lists
made once, and every hook is the same bound method: objects that live from one step to
the next are what Python's garbage collector walks the whole heap for, and a closure and
a record per parameter per cycle were ~1,000 of them at 256 checked parameters.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from .guard import Guard
from .optimizer_events import after_any_step, before_any_step

#: Parameters checked per cycle: one per watched layer, spread evenly when there are more.
MAX_CHECKED = 256
#: A check cycle not finished after this many monitored steps starts again.
_STALE_CYCLES = 2


class CarryCheck:
    """Checks, once per monitored interval, whether ``.grad`` was cleared between two
    optimizer steps, for one parameter per watched layer.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    >>> check = CarryCheck([("layer", layer.weight)], Guard())
    >>> check.start()
    >>> for _ in range(3):  # no zero_grad(): every step adds the earlier gradients
    ...     layer(torch.ones(1, 2)).sum().backward()
    ...     opt.step()
    >>> check.take()
    (1, ('layer',))
    >>> check.close()
    """

    def __init__(self, params: Sequence[tuple[str, torch.nn.Parameter]], guard: Guard) -> None:
        if len(params) > MAX_CHECKED:
            stride = len(params) / MAX_CHECKED
            params = [params[int(i * stride)] for i in range(MAX_CHECKED)]
        self._names = [name for name, _ in params]
        self._params = [p for _, p in params]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._guard = guard
        self._owners: dict[int, tuple[weakref.ref[Any], int, list[int]]] = {}
        # What the cycle follows, per checked parameter (position i of each list):
        n = len(self._params)
        #: its ``.grad`` after the step (a weak reference; None: no gradient, nothing to decide)
        self._grad: list[Any] = [None] * n
        self._version: list[int] = [0] * n  # that gradient's version, then at each addition
        self._added = [0] * n  # accumulations seen into the uncleared tensor
        self._broken = [False] * n  # cleared (or written to) since the step
        self._decided = [False] * n
        self._handles: list[Any] = [None] * n
        #: the parameters followed in this cycle
        self._following: set[int] = set()
        #: one hook for every parameter (the parameter tells which it is)
        self._on_accumulated = self._accumulated
        self._global: list[Any] = []
        self._cycles = 0  # monitored steps since this cycle started
        self._checked: set[str] = set()
        self._carried: set[str] = set()
        #: a carried gradient has been seen (weight-gradient rows are then not evidence)
        self.seen = False

    # -- the cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Called at a monitored step: check the next optimizer step (if not checking)."""
        if self._global:
            self._cycles += 1
            if self._cycles <= _STALE_CYCLES:
                return
            self._end_cycle()
        if not self._params:
            return
        self._cycles = 0
        self._global = [after_any_step(self._after_step)]

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._guard.call("carried-gradient check", self._arm, optimizer, default=None)

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._guard.call("carried-gradient check", self._decide, optimizer, default=None)

    def _arm(self, optimizer: Any) -> None:
        """After an optimizer step: note each owned parameter's ``.grad`` and follow it."""
        following = self._following
        fresh = [i for i in self._owned(optimizer) if i not in following]
        for i in fresh:
            param = self._params[i]
            grad = param.grad
            following.add(i)
            self._added[i], self._broken[i] = 0, False
            self._handles[i] = None
            if grad is None:
                # No gradient at the step: nothing can be carried, nothing to decide.
                self._grad[i], self._decided[i] = None, True
                continue
            self._grad[i], self._version[i] = weakref.ref(grad), grad._version
            self._decided[i] = False
            self._handles[i] = param.register_post_accumulate_grad_hook(self._on_accumulated)
        if fresh and len(self._global) == 1:
            self._global.append(before_any_step(self._before_step))

    def _accumulated(self, param: torch.Tensor) -> None:
        i = self._index.get(id(param))
        if i is None or i not in self._following or self._broken[i]:
            return
        grad, then = param.grad, self._grad[i]
        if then is None or grad is None or then() is not grad:
            self._broken[i] = True  # a new tensor: it was cleared (set to None)
        elif grad._version != self._version[i] + 1:
            self._broken[i] = True  # zeroed (or otherwise written) in between
        else:
            self._version[i] = grad._version
            self._added[i] += 1

    def _decide(self, optimizer: Any) -> None:
        """Before the owner's next step: a parameter followed since the last step whose
        ``.grad`` was only ever added to still holds the earlier steps' gradients."""
        following, decided = self._following, self._decided
        for i in self._owned(optimizer):
            if i not in following or decided[i]:
                continue
            decided[i] = True
            self._handles[i].remove()
            self._handles[i] = None
            broken = self._broken[i]
            if not self._added[i] and not broken:
                continue  # no backward reached it: no evidence either way
            name = self._names[i]
            self._checked.add(name)
            still = self._grad[i]()
            if not broken and still is not None and still is self._params[i].grad:
                self._carried.add(name)
                self.seen = True
        if all(decided[i] for i in following):
            self._end_cycle()

    def _owned(self, optimizer: Any) -> list[int]:
        """Indices of the checked parameters that ``optimizer`` updates (worked out once per
        optimizer and again when its parameter groups change)."""
        groups = getattr(optimizer, "param_groups", None) or []
        known = self._owners.get(id(optimizer))
        if known is not None and known[0]() is optimizer and known[1] == len(groups):
            return known[2]
        ids = {id(p) for group in groups for p in group.get("params", ())}
        owned = [i for i, p in enumerate(self._params) if id(p) in ids]
        try:
            self._owners[id(optimizer)] = (weakref.ref(optimizer), len(groups), owned)
        except TypeError:
            pass  # an optimizer that cannot be weakly referenced: worked out each time
        return owned

    def _end_cycle(self) -> None:
        for i in self._following:
            handle = self._handles[i]
            if handle is not None:
                handle.remove()
                self._handles[i] = None
            self._grad[i] = None  # hold no reference into the last cycle
        self._following = set()
        for handle in self._global:
            handle.remove()
        self._global = []

    # -- results -------------------------------------------------------------------------

    def take(self) -> tuple[int, tuple[str, ...]]:
        """(layers checked, layers whose gradient was carried) since the last call."""
        checked, carried = len(self._checked), tuple(
            n for n in self._names if n in self._carried
        )
        self._checked, self._carried = set(), set()
        return checked, carried

    def close(self) -> None:
        self._end_cycle()


def checked_parameters(layers: Sequence[Any]) -> list[tuple[str, torch.nn.Parameter]]:
    """One trainable parameter per watched layer (its first), in model order."""
    out = []
    for layer in layers:
        if layer.params:
            out.append((layer.name, layer.params[0][1]))
    return out


__all__ = ["MAX_CHECKED", "CarryCheck", "checked_parameters"]
