"""Log records for files and other sinks, not for the terminal.

What gradwatch already shows in the terminal (a finding panel, a warning) would show
twice once the application configures logging the ordinary way
(``logging.basicConfig(level=logging.INFO)`` adds a handler printing to ``sys.stderr``).
:func:`log_off_terminal` hands a record to every handler the logger would use except
those that print to the terminal, so a log file still gets every record.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def prints_to_terminal(handler: logging.Handler) -> bool:
    """True for a handler that writes to ``sys.stderr`` or ``sys.stdout`` (a plain
    ``StreamHandler``, or rich's ``RichHandler`` through its console).

    >>> prints_to_terminal(logging.StreamHandler(sys.stderr))
    True
    >>> import io
    >>> prints_to_terminal(logging.StreamHandler(io.StringIO()))
    False
    """
    streams = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)}
    if isinstance(handler, logging.FileHandler):
        return False
    if isinstance(handler, logging.StreamHandler):
        return id(handler.stream) in streams
    console = getattr(handler, "console", None)
    return console is not None and id(getattr(console, "file", None)) in streams


def log_off_terminal(
    logger: logging.Logger, level: int, text: str, *, extra: dict[str, Any] | None = None
) -> None:
    """``logger.log(level, text, extra=extra)``, minus the handlers that print to the
    terminal (what ``Logger.callHandlers`` does, with that one exception)."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "gradwatch", 0, text, (), None, extra=extra)
    if not logger.filter(record):
        return
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if record.levelno >= handler.level and not prints_to_terminal(handler):
                handler.handle(record)
        if not current.propagate:
            break
        current = current.parent


__all__ = ["log_off_terminal", "prints_to_terminal"]
