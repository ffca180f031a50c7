"""Keep the watched set in step with a model that changes while it trains.

Fine-tuning schedules freeze and unfreeze layers (``requires_grad_``), and code replaces
heads or appends blocks after :func:`gradwatch.watch`. :class:`WatchedSet` notices both,
cheaply:

- a module or parameter assigned anywhere inside the model (``model.head = nn.Linear(...)``,
  ``blocks.append(...)``, ``layer.weight = nn.Parameter(...)``) is seen by PyTorch's global
  registration hooks the moment it happens: a flag, nothing else;
- ``requires_grad`` flips are found by comparing one flag per parameter at monitored steps
  (a list comprehension: microseconds for hundreds of parameters);
- a module removed with ``del`` leaves no trace until its parameters stop getting
  gradients: the watcher asks :meth:`WatchedSet.still_attached` before it calls them missing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from .layers import LayerInfo, discover
from .wording import display_name


@dataclass(frozen=True)
class Change:
    """How the watched set changed, for the one-line notice."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    frozen: tuple[str, ...]
    unfrozen: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.frozen or self.unfrozen)

    def describe(self) -> str:
        """``"2 layers unfrozen (encoder.0, encoder.1); head replaced"``-style text.

        >>> Change(("head",), ("head",), (), ("enc.0", "enc.1")).describe()
        'unfrozen: enc.0, enc.1; replaced: head'
        """
        replaced = tuple(n for n in self.added if n in self.removed)
        parts = []
        for label, names in (
            ("frozen", self.frozen),
            ("unfrozen", self.unfrozen),
            ("replaced", replaced),
            ("added", tuple(n for n in self.added if n not in replaced)),
            ("removed", tuple(n for n in self.removed if n not in replaced)),
        ):
            if names:
                shown = ", ".join(display_name(n) for n in names[:4])
                more = f" and {len(names) - 4} more" if len(names) > 4 else ""
                parts.append(f"{label}: {shown}{more}")
        return "; ".join(parts)


class WatchedSet:
    """The modules of ``root`` gradwatch watches, kept current as the model changes."""

    def __init__(
        self,
        root: nn.Module,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        layers: list[LayerInfo] | None = None,
    ) -> None:
        self.root = root
        self.include = include
        self.exclude = exclude
        if layers is None:
            layers = discover(root, include=include, exclude=exclude)
        self.layers: list[LayerInfo] = layers
        self._dirty = False
        self._snapshot()
        # The process-wide hooks hold this object weakly: a watcher dropped without
        # close() does not keep the model alive through them.
        hook = _registration_hook(weakref.ref(self))
        self._handles = [
            register_module_module_registration_hook(hook),
            register_module_parameter_registration_hook(hook),
        ]

    def _snapshot(self) -> None:
        modules = list(self.root.modules())
        self._tree = {id(m) for m in modules}
        self._params = [p for m in modules for p in m.parameters(recurse=False)]
        self._flags = [p.requires_grad for p in self._params]
        self._watched_params = {id(p) for layer in self.layers for _, p in layer.params}
        self._dirty = False

    def changed(self) -> bool:
        """True when a module or parameter was assigned, or a parameter that is not
        watched became trainable, since the watched set was last built.

        A layer frozen mid-run stays watched (it simply gets no gradient, which is not
        reported as missing): frameworks flip ``requires_grad`` back and forth (Lightning
        toggles the optimizers of a GAN), and only a newly trainable parameter needs a
        new watched set."""
        if self._dirty:
            return True
        flags = [p.requires_grad for p in self._params]
        if flags == self._flags:
            return False
        self._flags = flags
        return any(
            flag and id(p) not in self._watched_params for p, flag in zip(self._params, flags)
        )

    def detached(self, modules: Sequence[nn.Module]) -> list[nn.Module]:
        """Those of ``modules`` that are no longer part of the model (removed with
        ``del``). One walk of the module tree; called only when parameters got no
        gradient, to tell a removed module from one that is cut off."""
        current = {id(m) for m in self.root.modules()}
        if current != self._tree:
            self._dirty = True
        return [m for m in modules if id(m) not in current]

    def rebuild(self) -> Change:
        """Discover the watched modules again; return what changed."""
        before = {layer.name: layer for layer in self.layers}
        before_params = {layer.name: {id(p) for _, p in layer.params} for layer in self.layers}
        old_tree = self._tree
        self.layers = discover(self.root, include=self.include, exclude=self.exclude)
        self._snapshot()
        after = {layer.name: layer for layer in self.layers}
        added, removed, frozen, unfrozen = [], [], [], []
        for name, layer in after.items():
            old = before.get(name)
            if old is None:
                # in the model before but not watched: its parameters were frozen
                (unfrozen if id(layer.module) in old_tree else added).append(name)
            elif old.module is not layer.module:
                added.append(name)
                removed.append(name)
            elif {id(p) for _, p in layer.params} - before_params[name]:
                unfrozen.append(name)
        for name, old in before.items():
            new = after.get(name)
            if new is None:
                (frozen if id(old.module) in self._tree else removed).append(name)
            elif new.module is old.module and before_params[name] - {id(p) for _, p in new.params}:
                frozen.append(name)
        return Change(tuple(added), tuple(removed), tuple(frozen), tuple(unfrozen))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _registration_hook(owner: weakref.ref[WatchedSet]) -> Callable[..., None]:
    # PyTorch calls it for every module and parameter assigned in the process (models
    # being built included): one set lookup decides whether it concerns this model.
    def on_register(module: nn.Module, name: str, value: object) -> None:
        watched = owner()
        if watched is not None and id(module) in watched._tree:
            watched._dirty = True
        return None

    return on_register
