"""The reporters a watcher uses when ``reporters=`` is not given.

Kept apart from :mod:`.base` so that imports run one way: the concrete reporters
depend on the protocol, and only this module depends on the concrete reporters.
"""

from __future__ import annotations

from .base import Reporter
from .logging import LoggingReporter
from .terminal import TerminalReporter


def default_reporters() -> list[Reporter]:
    """Fresh instances of the default reporters: the terminal (rich) reporter and the
    ``logging`` reporter (logger "gradwatch"), which leaves out handlers that print to the
    terminal, so that ``logging.basicConfig`` does not show each finding twice.

    ``reporters=[...]`` replaces them; to add one and keep them, spread them in:

    >>> import gradwatch
    >>> reporters = [*gradwatch.default_reporters(), gradwatch.JsonlRecorder("run.jsonl")]
    >>> [type(r).__name__ for r in reporters]
    ['TerminalReporter', 'LoggingReporter', 'JsonlRecorder']
    """
    return [TerminalReporter(), LoggingReporter(console=False)]
