"""Words and evidence shared by the loss-contract rules (GW3xx)."""

from __future__ import annotations

from ..loss_input import LossInput
from ..stats import StepStats


def percent(value: float) -> str:
    """``0.42`` as ``"42%"``."""
    return f"{100 * value:.0f}%"


def source(seen: LossInput) -> str:
    """Where the loss's input came from: ``"1 (after 0.2, made by relu)"``."""
    producer, last = seen.producer, seen.last_layer
    notes = []
    if producer is None:
        shown = f"the output of {last or '<root>'}" if last is not None else "the model's output"
    else:
        shown = producer or "the model's forward"
        if last is not None and last != producer:
            notes.append(f"after {last or '<root>'}")
    if seen.via:
        notes.append(f"made by {seen.via}")
    return f"{shown} ({', '.join(notes)})" if notes else shown


def fix_place(seen: LossInput) -> str:
    """Where the squashing happens, in words the user can find in their code."""
    producer, last = seen.producer, seen.last_layer
    if producer is None:
        return " applied to the model's output before the loss"
    if producer == "":
        return " at the end of the model's forward"
    if last is None or producer == last or last.startswith(producer + "."):
        return f" at the end of {producer}'s forward"
    return f" ({producer}, the module after {last or '<root>'})"


def loss_evidence(seen: LossInput, stats: StepStats, **values: float) -> dict[str, object]:
    """The numbers behind a finding about ``seen``, plus ``values``."""
    return {
        "loss_function": seen.function,
        "module": seen.producer,
        "last_layer": seen.last_layer,
        "made_by": seen.via or None,
        "rows": seen.rows,
        "classes": seen.classes,
        **values,
        "loss": stats.loss,
    }
