"""Run the watcher's step from the optimizer's own step hook.

With ``gradwatch.watch(model, optimizer=opt)`` plain PyTorch needs no ``watcher.step()``:
:meth:`torch.optim.Optimizer.register_step_pre_hook` runs at the start of every
``opt.step()``, when the step's gradients are final (after accumulation, clipping and a
GradScaler's unscaling) and not yet used, which is where ``watcher.step()`` belongs. It
cannot be misplaced, and it counts optimizer steps, not backward passes, so gradient
accumulation needs nothing either.

``watcher.step(loss=...)`` keeps working alongside, and is never counted twice:

- called after ``backward()`` and before ``optimizer.step()`` (where it belongs), it
  counts and measures the step itself, as without the hook (its return value holds this
  step's new findings); the hook then leaves that optimizer step alone;
- called where it sees no new backward pass (before ``backward()``, after
  ``zero_grad()``, after ``optimizer.step()``) or a second time before the optimizer
  steps (once per micro-batch of an accumulation), it counts nothing: its arguments
  (the loss, a step number, a scaler) go to the hook's measurement at the next
  ``optimizer.step()``, and it returns the findings the hook found since the last call.

"A new backward pass" is read from one gradient tensor: a different tensor than at the
last optimizer step, or its version counter up by at least two (zeroed in place, then
added to). A step that a GradScaler skips (Inf/NaN gradients) does not call
``opt.step()`` and is not counted by the hook: the optimizer did not step.

An optimizer called with a closure (LBFGS) computes its gradients inside ``step()``:
those are measured in the step's post hook instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .guard import Guard


def inner_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper (Lightning's
    ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``), else ``optimizer``."""
    seen = 0
    while seen < 4 and not hasattr(optimizer, "register_step_pre_hook"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def has_step_hooks(optimizer: Any) -> bool:
    """True when ``optimizer`` (or the optimizer it wraps) offers PyTorch's step hooks.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(1))
    >>> has_step_hooks(torch.optim.SGD([p], lr=0.1)), has_step_hooks(object())
    (True, False)
    """
    inner = inner_optimizer(optimizer)
    return callable(getattr(inner, "register_step_pre_hook", None)) and callable(
        getattr(inner, "register_step_post_hook", None)
    )


class OptimizerStepHooks:
    """Calls ``on_step()`` once per ``optimizer.step()``, with the gradients in place.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([p], lr=0.1)
    >>> seen = []
    >>> hooks = OptimizerStepHooks(opt, lambda: seen.append(p.grad.sum().item()), Guard())
    >>> p.sum().backward(); opt.step()
    >>> seen, hooks.steps
    ([2.0], 1)
    >>> hooks.remove(); opt.step()
    >>> seen
    [2.0]
    """

    def __init__(self, optimizer: Any, on_step: Callable[[], None], guard: Guard) -> None:
        self.optimizer = inner_optimizer(optimizer)
        self._on_step = on_step
        self._guard = guard
        #: the watched parameters (the watcher updates it when the model changes)
        self.params: Sequence[torch.Tensor] = ()
        #: optimizer steps seen (each counted once, skipped GradScaler steps excluded)
        self.steps = 0
        self._after: bool = False  # this step has a closure: measure in the post hook
        self._claimed = False  # an explicit watcher.step() counted this optimizer step
        # One gradient as it was at the last optimizer step: (parameter, its .grad, version).
        self._mark: tuple[torch.Tensor, weakref.ref[torch.Tensor], int] | None = None
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before),
            self.optimizer.register_step_post_hook(self._after_step),
        ]

    def claim(self) -> bool:
        """Whether an explicit ``watcher.step()`` made now counts this step itself (a new
        backward pass ran since the last optimizer step, and no explicit call counted it
        yet). Otherwise the step is left to the hook."""
        if self._claimed:
            return False
        mark = self._mark
        if mark is None:
            fresh = any(p.grad is not None for p in self.params)
        else:
            param, grad, version = mark
            now = param.grad
            if now is None:
                fresh = any(p.grad is not None for p in self.params)
            else:
                fresh = grad() is not now or now._version >= version + 2
        self._claimed = fresh
        return fresh

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # ``args`` are step()'s own positional arguments, the optimizer first.
        closure = kwargs.get("closure") if kwargs else None
        if closure is None and len(args) > 1:
            closure = args[1]
        self._after = closure is not None
        if not self._after:
            self._run()
        return None

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._after:
            self._after = False
            self._run()

    def _run(self) -> None:
        self.steps += 1
        if self._claimed:
            self._claimed = False  # counted by the explicit call
        else:
            # The step runs under the watcher's guard as well; this catches anything
            # else, so that nothing raised here can reach the training loop.
            self._guard.call("optimizer step hook", self._on_step, default=None)
        self._guard.call("optimizer step hook", self._remember, default=None)

    def _remember(self) -> None:
        """Note one gradient as it is at this step, to recognise the next backward pass."""
        for param in self.params:
            grad = param.grad
            if grad is not None:
                self._mark = (param, weakref.ref(grad), grad._version)
                return
        self._mark = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)


__all__ = ["OptimizerStepHooks", "has_step_hooks", "inner_optimizer"]
