"""Run the watcher's step from the optimizer's own step hook.

With ``gradwatch.watch(model, optimizer=opt)`` plain PyTorch needs no ``watcher.step()``:
:meth:`torch.optim.Optimizer.register_step_pre_hook` runs at the start of every
``opt.step()``, when the step's gradients are final (after accumulation, clipping and a
GradScaler's unscaling) and not yet used, which is where ``watcher.step()`` belongs. It
cannot be misplaced, and it counts optimizer steps, not backward passes, so gradient
accumulation needs nothing either.

``watcher.step(loss=...)`` keeps working alongside: it no longer counts a step, it hands
its arguments (the loss, a step number, a scaler) to the optimizer step that follows, so
no step is counted twice. A step that a GradScaler skips (Inf/NaN gradients) does not
call ``opt.step()`` and is not counted: the optimizer did not step.

An optimizer called with a closure (LBFGS) computes its gradients inside ``step()``:
those are measured in the step's post hook instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
        #: optimizer steps seen (each counted once, skipped GradScaler steps excluded)
        self.steps = 0
        self._after: bool = False  # this step has a closure: measure in the post hook
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before),
            self.optimizer.register_step_post_hook(self._after_step),
        ]

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        closure = kwargs.get("closure") if kwargs else None
        if closure is None and args:
            closure = args[0]
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
        # The step runs under the watcher's guard as well; this catches anything else,
        # so that nothing raised here can reach the training loop.
        self._guard.call("optimizer step hook", self._on_step, default=None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)


__all__ = ["OptimizerStepHooks", "has_step_hooks", "inner_optimizer"]
