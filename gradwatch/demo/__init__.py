"""``gradwatch demo``: the classic deep sigmoid vs ReLU vs residual experiment on real
data, in one command.

Trains six small networks on scikit-learn's bundled digits under gradwatch's default
settings and shows what it finds in each: a 30-layer sigmoid MLP (vanishing gradient),
a 30-layer ReLU MLP with PyTorch's default init (vanishing too), the same with kaiming
init (healthy), the sigmoid MLP with residual connections (healthy), and a ReLU net
pushed by a large learning rate (dead units) next to its LeakyReLU twin (healthy).

From Python (the networks are in :mod:`gradwatch.demo.nets`)::

    from gradwatch.demo import run_demo
    result = run_demo(["sigmoid", "relu-kaiming"], steps=100)
    [(run.net.name, [f.code for f in run.problems]) for run in result.runs]
"""

# The names are imported on first use: ``gradwatch demo --help`` (and ``gradwatch report``,
# which shares the tables and figures) must not import torch.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .options import add_arguments

_EXPORTS = {
    "DemoResult": "command",
    "main": "command",
    "run_demo": "command",
    "select_nets": "command",
}

__all__ = ["DemoResult", "add_arguments", "main", "run_demo", "select_nets"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradwatch.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .command import DemoResult, main, run_demo, select_nets
