"""What the watcher actually measured, and the training-loop mistakes that leave it
nothing to measure.

"No findings" means healthy only if something was measured. The close summary says
how many steps were counted and measured, over how many layers, and says plainly when
nothing was. A ``watcher.step()`` that finds no gradient at all (called before
``backward()`` or after ``zero_grad()``, or with an optimizer stepped inside the
backward pass) is said once, with where ``step()`` belongs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Why a step found nothing to measure.
NO_GRADIENT = "no-gradient"  # every .grad is None
ZERO_GRADIENT = "zero-gradient"  # every gradient is exactly 0
IN_BACKWARD = "in-backward"  # consumed and freed inside backward (optimizer-in-backward)


@dataclass
class Coverage:
    """Counts for the close summary.

    >>> Coverage(steps=180, measured=12, layers=20).describe()
    '12 measured steps of 180 (20 layers)'
    >>> Coverage(steps=40, measured=0, layers=20, empty=40, reason=NO_GRADIENT).describe()
    'nothing was measured: watcher.step() ran 40 times and never saw a gradient'
    """

    steps: int
    measured: int
    layers: int
    #: monitored steps at which no gradient at all was found
    empty: int = 0
    reason: str | None = None

    @property
    def nothing_measured(self) -> bool:
        return self.measured - self.empty <= 0

    def describe(self) -> str:
        if self.nothing_measured:
            if self.reason == IN_BACKWARD:
                return (
                    "nothing was measured: the optimizer steps inside backward() and frees "
                    "each gradient before watcher.step() runs"
                )
            if self.reason == ZERO_GRADIENT:
                return (
                    f"nothing was measured: at all {self.measured} monitored steps every "
                    "gradient was exactly 0 (watcher.step() runs after zero_grad())"
                )
            if self.steps == 0:
                return "nothing was measured: no training step was seen"
            return (
                f"nothing was measured: watcher.step() ran {self.steps} times and never "
                "saw a gradient"
            )
        text = f"{self.measured - self.empty} measured steps"
        if self.steps > self.measured:
            text += f" of {self.steps}"
        text += f" ({self.layers} layers)"
        if self.empty:
            text += f"; {self.empty} more monitored steps had no gradient at all"
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Coverage:
        """Read back :meth:`to_dict` (a JSONL summary record's ``coverage``)."""
        empty = int(data.get("empty_steps", 0))
        return cls(
            steps=int(data.get("steps", 0)),
            measured=int(data.get("measured_steps", 0)) + empty,
            layers=int(data.get("layers", 0)),
            empty=empty,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "measured_steps": self.measured - self.empty,
            "layers": self.layers,
            "empty_steps": self.empty,
            "nothing_measured": self.nothing_measured,
        }


def step_in_backward(params: Sequence[Any]) -> bool:
    """True when most parameters carry post-accumulate-grad hooks of someone else:
    the optimizer-in-backward recipe (each hook steps the optimizer for its parameter
    and sets ``.grad = None``), so no gradient is left when ``backward()`` returns."""
    if not params:
        return False
    hooked = sum(1 for p in params if getattr(p, "_post_accumulate_grad_hooks", None))
    return hooked * 2 > len(params)


def misplaced_text(reason: str, *, hooked: bool) -> str:
    """What to say, once, when a step finds no gradient to measure."""
    if reason == IN_BACKWARD:
        return (
            "gradwatch: the optimizer steps inside backward() (post-accumulate-grad hooks "
            "on the parameters call optimizer.step() and free .grad), so when "
            "watcher.step() runs no gradient is left to measure: gradwatch measures "
            "nothing in this run. To watch the gradients, run some steps with the usual "
            "loop (loss.backward(); watcher.step(); optimizer.step(); "
            "optimizer.zero_grad()), e.g. a short diagnostic run. (gradwatch explain "
            "optimizer-in-backward)"
        )
    where = (
        "The optimizer stepped with no gradient: its parameters' gradients are freed or "
        "never computed before optimizer.step()."
        if hooked
        else "Call watcher.step() after loss.backward() and before optimizer.step() and "
        "optimizer.zero_grad(), or pass the optimizer to gradwatch.watch(model, "
        "optimizer=opt) and drop the call: gradwatch then measures inside "
        "optimizer.step(). (gradwatch explain step-placement)"
    )
    if reason == ZERO_GRADIENT:
        return (
            "gradwatch: every gradient was exactly 0 when it was measured: watcher.step() "
            f"seems to run after zero_grad(set_to_none=False), so nothing real is measured. "
            f"{where}"
        )
    return (
        "gradwatch: watcher.step() found no gradient at all (every .grad is None): it "
        f"seems to run before loss.backward() or after optimizer.zero_grad(). {where}"
    )


__all__ = [
    "IN_BACKWARD",
    "NO_GRADIENT",
    "ZERO_GRADIENT",
    "Coverage",
    "misplaced_text",
    "step_in_backward",
]
