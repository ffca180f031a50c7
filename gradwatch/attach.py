"""Watching every model a process trains, without a line of code in the training loop.

:class:`Attachment` registers one process-wide optimizer hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``): it runs just before each
``optimizer.step()`` of any optimizer, when the gradients of the step are in place. The
first time an optimizer steps, the models it trains are found from its parameters
(:mod:`gradwatch.trained`) and each gets a watcher; at every later step the hook calls
``watcher.step(optimizer=...)``, as a hand-written loop would. Several optimizers (a GAN's
generator and discriminator) each drive their own watcher.

Cost on a step: one dictionary look-up, then the watcher's own step (on steps that are not
monitored, a counter). Models already watched (by a framework callback, or by the script's
own ``gradwatch.watch``) are left to that watcher.

A script that trains one model after another (a sweep) lets go of each optimizer when it
moves on. When a new optimizer first steps, the watchers of optimizers that nothing but
gradwatch still refers to are closed (their summary is printed then) and dropped, so
their models can be freed.

An optimizer stepped with a closure (``optimizer.step(closure)``: LBFGS, Lightning's
automatic optimization) computes the step's gradients inside ``step()``: its watchers are
stepped from the matching post-hook instead, with those gradients in place.

The first step of each optimizer is where its models are found, so it is not measured;
the step after it is (its forward pass already runs with the watcher's hooks), then every
``every_n_steps``-th. Steps are numbered by the optimizer's own count from 0.

>>> import torch, gradwatch
>>> from gradwatch.attach import Attachment
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 1))
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
>>> with Attachment(every_n_steps=1, reporters=lambda model: []) as attachment:
...     for _ in range(3):
...         optimizer.zero_grad()
...         model(torch.randn(16, 4)).pow(2).mean().backward()
...         optimizer.step()
...     [(type(w.module).__name__, w.latest.step) for w in attachment.watchers]
[('Sequential', 2)]
"""

from __future__ import annotations

import gc
import logging
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .findings import Finding
from .guard import Guard, logger
from .layers import unwrap
from .optimizer_events import after_any_step, before_any_step
from .reporters.base import Reporter
from .trained import optimizer_parameters, trained_models
from .watcher import Watcher, _owner, watch

#: What the attachment calls with the findings new at a step (``gradwatch run`` uses it
#: for ``--stop-on``; it may raise to stop the script).
FindingsHandler = Callable[[Watcher, Sequence[Finding]], None]


class _Driven:
    """The watchers one optimizer steps, and how many steps it has taken."""

    __slots__ = ("steps", "watchers")

    def __init__(self, watchers: list[Watcher]) -> None:
        self.watchers = watchers
        self.steps = 0


class Attachment:
    """Watches the models of every optimizer that steps while it is open.

    ``reporters`` is called once per watched model with the model and returns its
    reporters (default: gradwatch's defaults); ``on_findings`` sees each step's new
    findings; ``on_watch`` is told of each new watcher (``gradwatch run`` prints a line).
    The other options go to :func:`gradwatch.watch`.
    """

    def __init__(
        self,
        *,
        reporters: Callable[[nn.Module], list[Reporter] | None] | None = None,
        on_findings: FindingsHandler | None = None,
        on_watch: Callable[[Watcher, Any], None] | None = None,
        **watch_options: Any,
    ) -> None:
        self._reporters = reporters
        self._on_findings = on_findings
        self._on_watch = on_watch
        self._options = watch_options
        self._guard = Guard()
        self._driven: weakref.WeakKeyDictionary[Any, _Driven] = weakref.WeakKeyDictionary()
        self._watchers: list[Watcher] = []
        self._handles: list[Any] = []
        # Optimizers inside a step() whose closure computes the gradients: measured after.
        self._in_closure_step: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def watchers(self) -> list[Watcher]:
        """The watchers created so far, in the order their optimizers first stepped."""
        return list(self._watchers)

    def start(self) -> Attachment:
        if not self._handles:
            self._handles = [
                before_any_step(self._before_step),
                after_any_step(self._after_step),
            ]
        return self

    def close(self) -> None:
        """Remove the hooks and close every watcher (each prints its summary)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for watcher in self._watchers:
            self._guard.call("closing a watcher", watcher.close, default=None)

    def __enter__(self) -> Attachment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hook ---------------------------------------------------------------------

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if kwargs.get("closure", args[0] if args else None) is not None:
            self._in_closure_step.add(optimizer)  # its gradients are not computed yet
            return
        self._step(optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._in_closure_step and optimizer in self._in_closure_step:
            self._in_closure_step.discard(optimizer)
            self._step(optimizer)

    def _step(self, optimizer: torch.optim.Optimizer) -> None:
        driven = self._driven.get(optimizer)
        if driven is None:
            watchers = self._guard.call("finding the model", self._attach, optimizer, default=[])
            self._driven[optimizer] = _Driven(watchers)
            return
        driven.steps += 1
        for watcher in driven.watchers:
            new = self._guard.call(
                "stepping a watcher", watcher.step, driven.steps, optimizer=optimizer, default=[]
            )
            if new and self._on_findings is not None:
                self._on_findings(watcher, new)  # may raise: --stop-on ends the script

    def _attach(self, optimizer: torch.optim.Optimizer) -> list[Watcher]:
        self._close_abandoned()
        watchers = []
        for model in trained_models(optimizer_parameters(optimizer)):
            owner = _owner(unwrap(model))
            if owner is not None:
                mine = any(owner is w for w in self._watchers)
                logger.debug(
                    "gradwatch: %s is already watched%s",
                    type(unwrap(model)).__name__,
                    " (stepped by another optimizer)" if mine else "",
                )
                continue
            reporters = self._reporters(model) if self._reporters is not None else None
            try:
                # No optimizer= here: that would step the watcher from the optimizer's own
                # hook as well; this attachment steps it (with the optimizer) itself.
                watcher = watch(model, reporters=reporters, **self._options)
            except ValueError as error:  # this model cannot be watched; others may be
                self._guard.say_once(
                    f"unwatchable {id(model)}", f"gradwatch: {error}", level=logging.WARNING
                )
                continue
            # Its forward hooks are armed from now on: the next step is measured whole.
            watcher.also_measure = _first_step
            watchers.append(watcher)
            self._watchers.append(watcher)
            if self._on_watch is not None:
                self._on_watch(watcher, optimizer)
        if not watchers:
            logger.log(
                logging.DEBUG,
                "gradwatch: %s trains no module that can be watched here",
                type(optimizer).__name__,
            )
        return watchers


    def _close_abandoned(self) -> None:
        """Close the watchers of optimizers the script no longer holds (a sweep's last model)."""
        for ref in self._driven.keyrefs():
            driven = self._driven.get(ref()) if ref() is not None else None
            if driven is None or not driven.watchers:
                continue
            if _only_watchers_hold(ref, driven.watchers):
                for watcher in driven.watchers:
                    self._guard.call("closing a watcher", watcher.close, default=None)
                closed = {id(w) for w in driven.watchers}
                self._watchers = [w for w in self._watchers if id(w) not in closed]
                driven.watchers = []


def _only_watchers_hold(ref: weakref.ref[Any], watchers: Sequence[Watcher]) -> bool:
    """True when nothing refers to the optimizer but these watchers. Anything else that
    holds it (a variable of the script or of a running function, an LR scheduler, a
    wrapper) keeps its watchers open; a doubt keeps them open too."""
    optimizer = ref()
    if optimizer is None:
        return False
    holders = gc.get_referrers(optimizer)
    # A running function's local variables are references the collector does not list:
    # more references than listed holders means one. What this function's own variable
    # and call add is measured on an object nothing else holds (it differs by version).
    probe = object()
    own = sys.getrefcount(probe)
    if sys.getrefcount(optimizer) - own > len(holders):
        return False
    ours = {id(w.__dict__) for w in watchers}
    return all(id(holder) in ours for holder in holders)


def _first_step(step: int) -> bool:
    return step == 1


__all__ = ["Attachment", "FindingsHandler"]
