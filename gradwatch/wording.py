"""Words that depend on the user's setup: layer names as they read them, and advice in
the terms of the framework they train with.

Layer names stay the real qualified names everywhere they are keys (``Finding.layers``,
records, metric keys); :func:`display_name` is how a name is *shown*. An ``nn.Sequential``
names its children by bare index ("0", "net.3"), which says nothing on its own: shown as
``0 (Linear)``. The watcher makes its model's classes known around rule evaluation and
reporting (:func:`layer_classes`), so every rule and reporter gets them without passing
them along.

Advice names the option of the framework in use (:data:`FRAMEWORKS`), read from
:attr:`gradwatch.rules.base.ModelFacts.framework`: ``clip_grad_norm_`` in plain PyTorch,
``gradient_clip_val`` in Lightning, ``max_grad_norm`` in the Transformers Trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Literal

Framework = Literal["pytorch", "lightning", "fabric", "transformers", "accelerate"]
FRAMEWORKS: tuple[str, ...] = ("pytorch", "lightning", "fabric", "transformers", "accelerate")

_CLASSES: ContextVar[Mapping[str, str] | None] = ContextVar("gradwatch_layer_classes", default=None)


def display_name(name: str) -> str:
    """A module name as the user reads it: ``<root>`` for the model itself, and the
    module's class after a bare index.

    >>> with layer_classes({"0": "Linear", "net.2": "Tanh"}):
    ...     display_name("0"), display_name("net.2"), display_name("head"), display_name("")
    ('0 (Linear)', 'net.2 (Tanh)', 'head', '<root>')
    """
    if not name:
        return "<root>"
    classes = _CLASSES.get()
    return with_class(name, classes.get(name) if classes else None)


def with_class(name: str, class_name: str | None) -> str:
    """``name`` shown with ``class_name`` when the name is a bare index (``0 (Linear)``).

    >>> with_class("0", "Linear"), with_class("head", "Linear"), with_class("", "Net")
    ('0 (Linear)', 'head', '<root>')
    """
    if not name:
        return "<root>"
    if class_name and name.rsplit(".", 1)[-1].isdigit():
        return f"{name} ({class_name})"
    return name


def indexed_classes(named_modules: Any) -> dict[str, str]:
    """``{name: class name}`` for the modules whose name ends in a bare index (the
    children of ``nn.Sequential``/``nn.ModuleList``): the only ones that need it.

    >>> import torch
    >>> indexed_classes(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()).named_modules())
    {'0': 'Linear', '1': 'ReLU'}
    """
    return {
        name: type(module).__name__
        for name, module in named_modules
        if name and name.rsplit(".", 1)[-1].isdigit()
    }


@contextlib.contextmanager
def layer_classes(classes: Mapping[str, str] | None) -> Iterator[None]:
    """Make ``classes`` (from :func:`indexed_classes`) the ones :func:`display_name` uses."""
    token = _CLASSES.set(classes)
    try:
        yield
    finally:
        _CLASSES.reset(token)


def clip_gradients(framework: str, max_norm: str = "1.0") -> str:
    """How to clip gradients, in the user's framework.

    >>> clip_gradients("transformers")
    'clip gradients (TrainingArguments(max_grad_norm=1.0), the default)'
    >>> clip_gradients("lightning", "0.5")
    'clip gradients (Trainer(gradient_clip_val=0.5))'
    """
    how = {
        "lightning": f"Trainer(gradient_clip_val={max_norm})",
        "fabric": f"fabric.clip_gradients(model, optimizer, max_norm={max_norm})",
        "transformers": f"TrainingArguments(max_grad_norm={max_norm}), the default",
        "accelerate": f"accelerator.clip_grad_norm_(model.parameters(), {max_norm})",
    }.get(
        framework,
        f"torch.nn.utils.clip_grad_norm_(model.parameters(), {max_norm}) before optimizer.step()",
    )
    return f"clip gradients ({how})"


#: Activations whose gradient is not exactly zero for negative inputs, as advice offers them.
_LEAKY = ("LeakyReLU", "GELU")


def alternatives(used: Any, offered: tuple[str, ...] = _LEAKY) -> list[str]:
    """The activations of ``offered`` the model does not use yet (``used``: anything
    with ``uses(*class_names)``, such as :class:`~gradwatch.rules.base.ModelFacts`)."""
    return [name for name in offered if not used.uses(name)]


def capitalised(text: str) -> str:
    """``text`` with its first letter upper-case (for advice that starts a sentence)."""
    return text[:1].upper() + text[1:]


def detect_framework(optimizer: Any = None, scaler: Any = None) -> str | None:
    """The framework that wraps ``optimizer`` or ``scaler`` (Accelerate's
    ``AcceleratedOptimizer``, Fabric's optimizer wrapper), if any: then plain PyTorch
    advice would name the wrong call.

    >>> import torch
    >>> detect_framework(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)) is None
    True
    """
    for thing in (optimizer, scaler):
        if thing is None:
            continue
        module = type(thing).__module__
        if module.startswith("accelerate."):
            return "accelerate"
        if module.startswith(("lightning.fabric.", "lightning_fabric.")):
            return "fabric"
    return None


__all__ = [
    "FRAMEWORKS",
    "Framework",
    "alternatives",
    "capitalised",
    "clip_gradients",
    "detect_framework",
    "display_name",
    "indexed_classes",
    "layer_classes",
    "with_class",
]
