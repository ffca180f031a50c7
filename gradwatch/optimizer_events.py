"""Process-wide "before/after any optimizer step" callbacks that may come and go at any time.

PyTorch keeps its global optimizer step hooks in ordered dicts that it iterates while it
calls them: adding or removing one from inside a hook (a check that ends its cycle, a
watcher closed by another hook) raises ``RuntimeError: OrderedDict mutated during
iteration`` inside the user's ``optimizer.step()``. So gradwatch registers one pre-hook and
one post-hook with PyTorch, once, and never removes them; its own listeners live in lists
here, which every dispatch copies first. When no listener is left, a step costs one Python
call that finds an empty list.

>>> import torch
>>> seen = []
>>> handle = before_any_step(lambda optimizer, args, kwargs: seen.append("pre"))
>>> p = torch.nn.Parameter(torch.ones(1))
>>> p.grad = torch.ones(1)
>>> torch.optim.SGD([p], lr=0.1).step()
>>> handle.remove(); handle.remove()   # removing twice is harmless
>>> seen
['pre']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Listener = Callable[[Any, Any, Any], None]

_before: list[Listener] = []
_after: list[Listener] = []
_installed = False


class ListenerHandle:
    """Removes one listener; safe to call from inside a dispatch, and more than once."""

    __slots__ = ("_listener", "_listeners")

    def __init__(self, listeners: list[Listener], listener: Listener) -> None:
        self._listeners = listeners
        self._listener = listener

    def remove(self) -> None:
        try:
            self._listeners.remove(self._listener)
        except ValueError:
            pass


def before_any_step(listener: Listener) -> ListenerHandle:
    """Call ``listener(optimizer, args, kwargs)`` before every ``optimizer.step()``."""
    return _add(_before, listener)


def after_any_step(listener: Listener) -> ListenerHandle:
    """Call ``listener(optimizer, args, kwargs)`` after every ``optimizer.step()``."""
    return _add(_after, listener)


def _add(listeners: list[Listener], listener: Listener) -> ListenerHandle:
    _install()
    listeners.append(listener)
    return ListenerHandle(listeners, listener)


def _install() -> None:
    global _installed
    if _installed:
        return
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    register_optimizer_step_pre_hook(_dispatch_before)
    register_optimizer_step_post_hook(_dispatch_after)
    _installed = True


def _dispatch_before(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _before:
        for listener in tuple(_before):
            if listener in _before:  # not removed by an earlier listener of this step
                listener(optimizer, args, kwargs)


def _dispatch_after(optimizer: Any, args: Any, kwargs: Any) -> None:
    if _after:
        for listener in tuple(_after):
            if listener in _after:
                listener(optimizer, args, kwargs)
