"""gradwatch: watch a PyTorch model while it trains and say where the gradient signal stops.

>>> import torch, gradwatch
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
>>> watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
>>> model(torch.randn(4, 8)).sum().backward()
>>> watcher.step()
[]
>>> watcher.close()
"""

from ._version import __version__
from .findings import SEVERITIES, Finding, Severity
from .guard import GradwatchWarning
from .history import History
from .reporters import (
    JsonlRecorder,
    LoggingReporter,
    Reporter,
    TerminalReporter,
    read_record,
)
from .rules import Condition, Rule, RuleContext, builtin_rules
from .stats import LayerStats, OptimizerInfo, StepStats, UnitMask
from .watcher import Watcher, release, watch

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
    "read_record",
    "release",
    "watch",
]
