"""Keep gradwatch's own failures out of the training loop.

Every part that runs during training (probes, statistics, each rule, each reporter)
runs under a :class:`Guard`. The first exception in a part is logged once, with its
traceback, and that part is switched off; training goes on.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from .logsink import log_off_terminal

logger = logging.getLogger("gradwatch")
# A library must not print through logging unless the application asks for it; the
# terminal reporter is gradwatch's own voice.
logger.addHandler(logging.NullHandler())

T = TypeVar("T")


class GradwatchWarning(UserWarning):
    """Raised as a warning (never as an error) when part of gradwatch disables itself."""


def warn_user(text: str, *, stacklevel: int | None = 3) -> None:
    """Say something the person training should see once: a warning on the "gradwatch"
    logger and a :class:`GradwatchWarning` (shown by default, once per place).
    ``stacklevel=None`` points the warning at the first caller outside gradwatch. The
    warning shows in the terminal, so the log record skips terminal handlers (one line
    under ``logging.basicConfig``, and the record still reaches log files)."""
    log_off_terminal(logger, logging.WARNING, text)
    if stacklevel is None:
        stacklevel = _caller_level()
    warnings.warn(text, GradwatchWarning, stacklevel=stacklevel)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_level() -> int:
    """The ``stacklevel`` of the nearest frame outside the gradwatch package, as seen from
    :func:`warn_user`'s call to ``warnings.warn``."""
    frame = sys._getframe(2)  # warn_user's caller
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def short_error(error: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"``, at most ``limit`` characters: some errors
    (PyTorch's dispatcher) carry kilobytes of detail that belong in a traceback, not in a
    warning.

    >>> short_error(RuntimeError("bad thing\\nwith 10 KB of detail"))
    'RuntimeError: bad thing'
    """
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Guard:
    """Runs parts of gradwatch so that none of them can raise into training.

    >>> guard = Guard()
    >>> guard.call("demo", lambda: 1 / 0, default=-1)
    -1
    >>> guard.is_disabled("demo")
    True
    """

    def __init__(self) -> None:
        self._disabled: dict[str, str] = {}
        self._said: set[str] = set()

    def call(self, part: str, fn: Callable[..., T], *args: Any, default: T, **kwargs: Any) -> T:
        if part in self._disabled:
            return default
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.fail(part, error)
            return default

    def fail(self, part: str, error: BaseException) -> None:
        """Record that ``part`` failed: say so once, in one short line, and switch it off.
        The full traceback goes to the "gradwatch" logger at DEBUG level."""
        if part in self._disabled:
            return
        reason = short_error(error)
        self._disabled[part] = reason
        text = f"gradwatch: {part} failed and is now disabled; training continues. ({reason})"
        log_off_terminal(logger, logging.ERROR, text)  # the warning below shows it there
        logger.debug("gradwatch: %s failed", part, exc_info=error)
        warnings.warn(text, GradwatchWarning, stacklevel=3)

    def say_once(self, key: str, text: str, *, level: int = logging.INFO) -> None:
        """Log a notice once per watcher (a limit of what can be measured, say)."""
        if key in self._said:
            return
        self._said.add(key)
        if level >= logging.WARNING:
            warn_user(text, stacklevel=4)
        else:
            logger.log(level, text)

    def is_disabled(self, part: str) -> bool:
        return part in self._disabled

    @property
    def disabled(self) -> dict[str, str]:
        """Parts switched off so far, with the error that switched each off."""
        return dict(self._disabled)
