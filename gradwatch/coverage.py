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

from .findings import Finding

#: Why a step found nothing to measure.
NO_GRADIENT = "no-gradient"  # every .grad is None
ZERO_GRADIENT = "zero-gradient"  # every gradient is exactly 0
IN_BACKWARD = "in-backward"  # consumed and freed inside backward (optimizer-in-backward)
CUT_OFF_LOSS = "cut-off-loss"  # the loss's graph does not reach the parameters

#: Autograd nodes walked at most to tell whether a loss reaches the parameters: the walk
#: runs once, on the step that reports no gradient, and stays bounded on any graph.
_MAX_NODES = 200_000

_CUT_HOW = (
    ".detach(), .data, torch.no_grad(), .item(), or a tensor re-wrapped with "
    "requires_grad_()"
)


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
            if self.reason == CUT_OFF_LOSS:
                return (
                    f"nothing was measured: watcher.step() ran {self.steps} times and the "
                    "loss never reached the parameters (its graph is cut off from the model)"
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


def loss_reaches(loss: Any, params: Sequence[Any]) -> bool | None:
    """Whether ``loss``'s autograd graph leads to any of ``params``; None when unknown
    (no loss tensor given, or a graph too large to walk). The graph's nodes outlive
    ``backward()`` (only their saved tensors are freed), so this works after it.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> loss_reaches((w * 2).sum(), [w])
    True
    >>> loss_reaches((w * 2).detach().requires_grad_().sum(), [w])
    False
    >>> loss_reaches(torch.tensor(1.0), [w])  # a float, .item(), or under no_grad
    False
    """
    import torch  # not at the top: `gradwatch rules`, `explain`, `report` run without it

    if not isinstance(loss, torch.Tensor):
        return None
    if not loss.requires_grad:
        return False
    wanted = {id(p) for p in params}
    if id(loss) in wanted:
        return True
    seen: set[int] = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _MAX_NODES:
            return None
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None and id(variable) in wanted:
            return True
        todo.extend(next_node for next_node, _ in getattr(node, "next_functions", ()))
    return False


def cut_off_finding(step: int, layers: Sequence[str], steps: int) -> Finding:
    """GW104 for a whole model that gets no gradient because the loss does not reach it.

    >>> cut_off_finding(3, ["0", "2"], 2).code
    'GW104'
    """
    return Finding(
        code="GW104",
        rule="no-gradient",
        severity="error",
        step=step,
        layers=tuple(layers),
        message=(
            f"no watched parameter got a gradient in {steps} steps (every .grad is None): "
            "the loss passed to watcher.step() does not reach the parameters"
        ),
        hint=(
            f"The loss's graph is cut off from the model ({_CUT_HOW}), so backward() "
            "computes nothing for the parameters and the model does not train: compute "
            "the loss from the model's output tensor itself, without detaching it."
        ),
        evidence={"steps_without_gradient": steps, "layers": len(layers)},
    )


def misplaced_text(reason: str, *, hooked: bool) -> str:
    """What to say, once, when a step finds no gradient to measure."""
    if reason == CUT_OFF_LOSS:
        return (
            "gradwatch: no watched parameter gets a gradient (every .grad is None) because "
            "the loss does not reach them: its graph is cut off from the model's "
            f"parameters ({_CUT_HOW}), so backward() computes nothing for them and the "
            "model does not train. Compute the loss from the model's output tensor "
            "itself, without detaching it on the way. (gradwatch explain no-gradient)"
        )
    if reason == NO_GRADIENT and hooked:
        # Measured inside optimizer.step(): where watcher.step() stands cannot be the
        # reason; the optimizer itself steps with no gradient.
        return (
            "gradwatch: optimizer.step() ran with no gradient on any watched parameter "
            "(every .grad is None): backward() did not reach the parameters. Most often "
            f"the loss is cut off from the model ({_CUT_HOW}); otherwise loss.backward() "
            "is not called, or the gradients are cleared between backward() and "
            "optimizer.step()."
        )
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
    "CUT_OFF_LOSS",
    "IN_BACKWARD",
    "NO_GRADIENT",
    "ZERO_GRADIENT",
    "Coverage",
    "cut_off_finding",
    "loss_reaches",
    "misplaced_text",
    "step_in_backward",
]
