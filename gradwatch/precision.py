"""Whether the model trains in float16: under ``torch.autocast(dtype=torch.float16)`` or
with float16 weights.

fp16 gradients overflow where float32 ones would not, and a ``GradScaler`` overflows
them on purpose while it calibrates. When gradwatch does not know the scaler, Inf
gradients under fp16 are first of all a reason to pass it (``scaler=``), not proof of a
broken model: the NaN/Inf rule words its finding so (see
:attr:`gradwatch.rules.base.ModelFacts.fp16`).

Autocast is a property of the forward pass, not of the model: one hook looks at the
root module's first forward pass that builds a graph, then removes itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook


def has_fp16_weights(module: nn.Module) -> bool:
    """True when a trainable parameter is float16 (``model.half()``)."""
    return any(p.dtype == torch.float16 for p in module.parameters() if p.requires_grad)


class AutocastProbe:
    """Calls ``found()`` if the first gradient-building forward pass of ``root`` runs
    under float16 autocast; then (either way) removes its hook.

    >>> model = torch.nn.Linear(2, 2)
    >>> seen = []
    >>> probe = AutocastProbe(model, lambda: seen.append(True))
    >>> with torch.autocast("cpu", dtype=torch.float16):
    ...     _ = model(torch.randn(1, 2))
    >>> seen, probe.done
    ([True], True)
    """

    def __init__(self, root: nn.Module, found: Callable[[], None]) -> None:
        self._found = found
        self._root = weakref.ref(root)
        self._device = next((p.device.type for p in root.parameters()), "cpu")
        # A global hook, not one in the model's own tables: a watched model must stay
        # picklable, copyable and scriptable.
        self._handle: Any = register_module_forward_pre_hook(self._look)
        self.done = False

    def _look(self, module: nn.Module, args: Any) -> None:
        if module is not self._root() or not torch.is_grad_enabled():
            return None  # another module, or an evaluation pass (it says nothing)
        self.remove()
        try:
            fp16 = torch.is_autocast_enabled(self._device) and (
                torch.get_autocast_dtype(self._device) == torch.float16
            )
        except (RuntimeError, TypeError):  # a device type autocast does not know
            fp16 = False
        if fp16:
            self._found()
        return None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.done = True
