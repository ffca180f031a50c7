"""How gradwatch writes into someone else's W&B run without moving its step.

A W&B run builds one history row at a time. Measured with wandb 0.31 (offline, reading
the run's transaction log back):

- ``run.log(d)`` adds ``d`` to the row being built, commits it and moves the step by one;
- ``run.log(d, commit=False)`` adds ``d`` to the row being built and moves nothing; a key
  written twice before the row is committed keeps only the second value;
- ``run.log(d, step=s)``: ``s`` above the current step commits the row being built and
  starts row ``s`` (not committed until the step moves on again); ``s`` equal to it adds
  to that row; ``s`` below it is dropped, with a warning;
- ``run.finish()`` commits the row being built;
- ``run.step`` asks the wandb service and waits up to 30 s for the answer: on a finished
  run it always waits the 30 s. ``run._local_step``, wandb's own client-side copy of the
  step, answers at once; ``run._is_finished`` is set at the start of ``run.finish()``,
  and every public method of a finished run raises ``UsageError`` at once.

So a writer that may not move the step only ever uses ``commit=False``: its values land
in whichever row the owner of the run commits next. The helpers here read the step and
the finished state without blocking, and let the reporter write its closing data from
inside ``run.finish()``.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("gradwatch")


def building_step(run: Any) -> int | None:
    """The W&B step of the row ``run`` is building, read without asking the wandb service
    (``run.step`` can block for 30 s); ``None`` when the run does not say.

    It changes exactly when a row is committed by this process (wandb 0.31), so two equal
    readings mean that nothing was committed in between.
    """
    step = getattr(run, "_local_step", None)
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        return int(step)
    return None


def run_finished(run: Any) -> bool:
    """True once ``run.finish()`` has started (a finished run raises on every call)."""
    return getattr(run, "_is_finished", False) is True


def is_finished_error(error: BaseException) -> bool:
    """Whether ``error`` is wandb saying that the run is finished."""
    return type(error).__name__ == "UsageError" and "is finished" in str(error)


def call_at_finish(run: Any, callback: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``callback`` inside ``run.finish()``, before the run stops accepting data.

    Uses wandb's teardown hooks (early stage: the run still accepts ``log`` and
    ``summary``). Returns a function that unregisters it, or ``None`` when this wandb
    has no such hooks. The callback must not raise: ``run.finish()`` would.
    """
    hooks = getattr(run, "_teardown_hooks", None)
    if not isinstance(hooks, list):
        return None
    try:
        from wandb.sdk.wandb_run import TeardownHook, TeardownStage
    except ImportError:
        return None
    hook = TeardownHook(callback, TeardownStage.EARLY)
    hooks.append(hook)

    def remove() -> None:
        current = getattr(run, "_teardown_hooks", None)
        if isinstance(current, list) and hook in current:
            current.remove(hook)

    return remove


class ThinnedRows:
    """Keeps at most ``limit`` rows of ``{key: value}`` spread over the whole run: when
    full, every second row is dropped and from then on only every second row is kept
    (so memory stays bounded however long training runs).

    >>> rows = ThinnedRows(limit=4)
    >>> for step in range(10):
    ...     rows.add({"step": step})
    >>> [r["step"] for r in rows.rows], rows.seen
    ([0, 4, 8], 10)
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rows: list[dict[str, Any]] = []
        self.seen = 0
        self._stride = 1

    def add(self, row: dict[str, Any]) -> None:
        index, self.seen = self.seen, self.seen + 1
        if index % self._stride:
            return
        self.rows.append(dict(row))
        if len(self.rows) > self.limit:
            del self.rows[1::2]
            self._stride *= 2

    def columns(self, first: str) -> list[str]:
        """Every key of every row, ``first`` first, the others in order of appearance."""
        seen = {first: None}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def __len__(self) -> int:
        return len(self.rows)
