"""gradwatch: watch a PyTorch model while it trains and say where the gradient signal stops.

>>> import torch, gradwatch
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
>>> model(torch.randn(4, 8)).sum().backward()
>>> watcher.step()
[]
>>> watcher.close()
"""

# The names below are imported on first use (PEP 562), not with the package: the
# ``gradwatch`` command's ``--help``, ``rules`` and ``explain`` then answer without
# importing torch (about a second, and a NumPy warning where NumPy is missing).
# ``gradwatch.watch``, ``from gradwatch import Finding`` and ``dir(gradwatch)`` work as usual.

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the submodule that defines it.
_EXPORTS: dict[str, str] = {
    "SEVERITIES": "findings",
    "Finding": "findings",
    "Severity": "findings",
    "GradwatchWarning": "guard",
    "History": "history",
    "JsonlRecorder": "reporters",
    "LoggingReporter": "reporters",
    "Reporter": "reporters",
    "TerminalReporter": "reporters",
    "default_reporters": "reporters",
    "read_record": "reporters",
    "Condition": "rules",
    "Rule": "rules",
    "RuleContext": "rules",
    "builtin_rules": "rules",
    "LayerStats": "stats",
    "OptimizerInfo": "stats",
    "StepStats": "stats",
    "UnitMask": "stats",
    "Watcher": "watcher",
    "watch": "watcher",
    "release": "watcher",
}

__all__ = [
    "SEVERITIES",
    "Condition",
    "Finding",
    "GradwatchWarning",
    "History",
    "JsonlRecorder",
    "LayerStats",
    "LoggingReporter",
    "OptimizerInfo",
    "Reporter",
    "Rule",
    "RuleContext",
    "Severity",
    "StepStats",
    "TerminalReporter",
    "UnitMask",
    "Watcher",
    "__version__",
    "builtin_rules",
    "default_reporters",
    "read_record",
    "release",
    "watch",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f".{name}", __name__)  # gradwatch.rules, ...
    else:
        raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .findings import SEVERITIES, Finding, Severity
    from .guard import GradwatchWarning
    from .history import History
    from .reporters import (
        JsonlRecorder,
        LoggingReporter,
        Reporter,
        TerminalReporter,
        default_reporters,
        read_record,
    )
    from .rules import Condition, Rule, RuleContext, builtin_rules
    from .stats import LayerStats, OptimizerInfo, StepStats, UnitMask
    from .watcher import Watcher, release, watch
