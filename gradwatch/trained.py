"""Which model an optimizer trains, found from the parameters it holds.

``gradwatch run`` attaches to a script it did not write: it sees an ``optimizer.step()``
and must find the ``nn.Module`` to watch. An optimizer holds parameters, not modules, so
the modules are found among the live ones (one scan of the garbage collector's objects
when an optimizer steps for the first time: about 0.1 s in a process with transformers
imported; nothing at later steps). Scanning, rather than recording modules as they are
built, also finds models built before gradwatch attached and parameters placed by
libraries that bypass ``register_parameter``.

The model is the largest module whose trainable parameters are all in the optimizer:

- a model wrapped by DDP or ``torch.compile`` gives the wrapper (the watcher unwraps it);
- a GAN's generator and discriminator, each with its own optimizer, give one model each,
  also when one module holds both;
- a teacher or an evaluation-only model is in no optimizer and is never watched;
- an optimizer that holds part of each layer (matrices in one optimizer, biases and norms
  in another) gives the whole model, which the optimizers then share.

>>> import torch
>>> from torch import nn
>>> class GAN(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.generator = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
...         self.discriminator = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
>>> gan = GAN()
>>> trained_models(gan.discriminator.parameters(), gan.modules()) == [gan.discriminator]
True
>>> trained_models(gan.parameters(), gan.modules()) == [gan]
True
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

import torch
from torch import nn


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter in the optimizer's ``param_groups``."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def live_modules() -> list[nn.Module]:
    """Every ``nn.Module`` alive in the process. ``type()`` rather than ``isinstance()``:
    some objects (lazy module proxies) compute ``__class__`` and warn when asked."""
    return [obj for obj in gc.get_objects() if issubclass(type(obj), nn.Module)]


class _Tree:
    """Parents and trainable parameter sets of the modules, computed once each."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.parents: dict[int, list[nn.Module]] = {}
        for module in self.modules:
            for child in module._modules.values():
                if child is not None:
                    self.parents.setdefault(id(child), []).append(module)
        self._trainable: dict[int, frozenset[int]] = {}

    def trainable(self, module: nn.Module) -> frozenset[int]:
        key = id(module)
        found = self._trainable.get(key)
        if found is None:
            found = frozenset(id(p) for p in module.parameters() if p.requires_grad)
            self._trainable[key] = found
        return found

    def climb(self, module: nn.Module, wanted: frozenset[int] | None) -> nn.Module:
        """The highest ancestor reached through parents whose trainable parameters all
        lie in ``wanted`` (``None``: through any parent, up to a root)."""
        seen = {id(module)}
        while True:
            up = [
                parent
                for parent in self.parents.get(id(module), ())
                if id(parent) not in seen
                and (wanted is None or self.trainable(parent) <= wanted)
            ]
            if not up:
                return module
            module = up[0]
            seen.add(id(module))


def trained_models(
    parameters: Iterable[torch.Tensor], modules: Iterable[nn.Module] | None = None
) -> list[nn.Module]:
    """The models that own ``parameters`` (an optimizer's), among ``modules`` (default:
    every live module), as described in the module notes. Parameters that no module owns
    (a bare ``nn.Parameter``) are left out; none owned gives ``[]``."""
    wanted = frozenset(id(p) for p in parameters if p.requires_grad)
    if not wanted:
        return []
    tree = _Tree(live_modules() if modules is None else modules)
    owners = [
        module
        for module in tree.modules
        if any(p is not None and id(p) in wanted for p in module._parameters.values())
    ]
    models: list[nn.Module] = []
    covered_by_root: dict[int, list[nn.Module]] = {}
    roots: dict[int, nn.Module] = {}
    for owner in owners:
        root = tree.climb(owner, None)
        roots[id(root)] = root
        top = tree.climb(owner, wanted)
        tops = covered_by_root.setdefault(id(root), [])
        if all(top is not other for other in tops):
            tops.append(top)
    for key, tops in covered_by_root.items():
        # One sub-network holds all of it: that one. Parts of many layers: the whole model.
        model = tops[0] if len(tops) == 1 else roots[key]
        if all(model is not other for other in models):
            models.append(model)
    return models


__all__ = ["live_modules", "optimizer_parameters", "trained_models"]
