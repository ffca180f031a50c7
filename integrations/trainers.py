"""``gradwatch run``'s way into a Trainer the script builds: it adds gradwatch's callback.

A Lightning ``Trainer`` or a Transformers ``Trainer`` steps its optimizer at its own
moment (Lightning inside a closure, after the forward and backward passes it runs; the
Transformers Trainer after clipping), so the process-wide optimizer hook would measure at
the wrong point. Their callbacks measure where the framework says the gradients are
final: after accumulation, before clipping. :func:`add_callback_to_trainers` wraps each
``Trainer.__init__`` so that every Trainer built gets a ``GradWatchCallback`` (unless
the script added one), and the callback's watcher then owns the model, so the optimizer
hook leaves it alone.

Nothing is imported here: each framework is patched the moment the script imports its
trainer module (an import hook), or at once if it is imported already. A script that
never imports Lightning or Transformers does not pay for importing them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: The module that defines each framework's Trainer class -> what adds the callback.
_TRAINER_MODULES = {
    "lightning.pytorch.trainer.trainer": "_add_lightning_callback",
    "transformers.trainer": "_add_transformers_callback",
}

#: ``(framework, model class name, number of processes)`` -> keyword arguments of its
#: ``GradWatchCallback``, or ``None``: add none.
CallbackOptions = Callable[[str, str, int], "dict[str, Any] | None"]


def add_callback_to_trainers(options: CallbackOptions) -> Callable[[], None]:
    """Make every Lightning/Transformers Trainer built from now on carry gradwatch's
    callback, made with ``options(framework, model_class_name, processes)``. Returns what
    undoes it."""
    patches: list[Callable[[], None]] = []

    def patch(module: ModuleType, adder_name: str) -> None:
        trainer = getattr(module, "Trainer", None)
        if isinstance(trainer, type):
            adder = globals()[adder_name]
            patches.append(_wrap_init(trainer, lambda t: adder(t, options)))

    waiting = {}
    for name, adder_name in _TRAINER_MODULES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module, adder_name)
        else:
            waiting[name] = functools.partial(patch, adder_name=adder_name)
    finder = _AfterImport(waiting)
    sys.meta_path.insert(0, finder)

    def undo() -> None:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        for restore in reversed(patches):
            restore()
        patches.clear()

    return undo


def _wrap_init(cls: type, after: Callable[[Any], None]) -> Callable[[], None]:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        after(self)

    cls.__init__ = __init__

    def restore() -> None:
        if cls.__init__ is __init__:
            cls.__init__ = original

    return restore


def _model_name(model: Any) -> str:
    from gradwatch.layers import unwrap

    return type(unwrap(model)).__name__ if model is not None else "model"


def _add_lightning_callback(trainer: Any, options: CallbackOptions) -> None:
    from gradwatch.integrations.lightning import GradWatchCallback

    if any(isinstance(c, GradWatchCallback) for c in trainer.callbacks):
        return  # the script watches with its own options
    # The LightningModule is not known yet (it comes with fit()).
    chosen = options("Lightning", "LightningModule", int(getattr(trainer, "world_size", 1)))
    if chosen is not None:
        trainer.callbacks.append(GradWatchCallback(**chosen))


def _add_transformers_callback(trainer: Any, options: CallbackOptions) -> None:
    from gradwatch.integrations.transformers import GradWatchCallback

    if any(isinstance(c, GradWatchCallback) for c in trainer.callback_handler.callbacks):
        return
    model = getattr(trainer, "model", None)
    processes = int(getattr(trainer.args, "world_size", 1))
    chosen = options("Transformers", _model_name(model), processes)
    if chosen is not None:
        trainer.add_callback(GradWatchCallback(**chosen))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs an action right after a named module has been imported (once each)."""

    def __init__(self, actions: dict[str, Callable[[ModuleType], None]]) -> None:
        self.actions = actions

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        action = self.actions.get(name)
        if action is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # let the usual finders import it, unwatched
        del self.actions[name]
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            try:
                action(module)
            except Exception as error:  # gradwatch must not break the script's import
                from gradwatch.guard import warn_user

                warn_user(f"gradwatch: could not add its callback to {name}.Trainer ({error})")

        spec.loader.exec_module = exec_module  # this module's own loader object only
        return spec


__all__ = ["add_callback_to_trainers"]
