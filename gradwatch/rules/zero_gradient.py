"""GW108 zero-gradient: every gradient of the model is exactly zero while the loss is not:
nothing learns, and the finding says where the gradient stops.

An exactly-zero gradient everywhere is not a small gradient (GW101's) and not a missing
one (``.grad`` None, GW104's): autograd ran from the loss through the whole model, and
an operation on the way multiplied everything by exactly 0: a sigmoid saturated at
exactly 0.0/1.0 under ``BCELoss``, ``torch.round``/``sign``/``floor`` in the graph, a
clamp whose every input lies outside its range, a mask that zeroes the loss input.

Where it stops is read from the gradient flowing back into each module's output
(measured on detail steps; a step with all-zero gradients asks for the
next monitored step to be one): the last module in forward order whose output still
gets a non-zero gradient is where it dies; when no module's output gets one, the
gradient is already zero where it leaves the loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..history import History
from ..kinds import RELU, SATURATING_KINDS
from ..stats import LayerStats, StepStats
from .base import RATIO, Condition, Rule, RuleContext, gradients_finite
from .profile import forward_order_known


def all_zero(stats: StepStats) -> bool:
    """True when some parameter got a gradient and every gradient is exactly zero.

    >>> zero = LayerStats("fc", "linear", grad_norm=0.0)
    >>> all_zero(StepStats(step=3, layers={"fc": zero}, global_grad_norm=0.0))
    True
    >>> all_zero(StepStats(step=3, layers={}, global_grad_norm=0.0))  # nothing got one
    False
    """
    return stats.global_grad_norm == 0.0 and any(s.grad_norm is not None for s in stats)


def wants_detail(history: History) -> bool:
    """Whether the next monitored step should measure the gradient at module outputs
    (a detail step): yes
    when every gradient of the step just measured (the last of ``history``) is exactly
    zero, unless the last detail step already saw that (it showed where it stops).
    O(1) on a step with a gradient."""
    if not history:
        return False
    latest = history[-1]
    if latest.detail or not all_zero(latest):
        return False
    for k in range(len(history) - 2, -1, -1):
        stats = history[k]
        if stats.detail and stats.activations_observed:
            return not all_zero(stats)
    return True


class ZeroGradient(Rule):
    code = "GW108"
    slug = "zero-gradient"
    severity = "error"
    summary = "every gradient is exactly zero while the loss is not: nothing learns"
    explanation = """\
What it measures: the global gradient norm, exactly 0.0 (not small: zero), with
at least one trainable parameter holding a gradient, while the loss passed to
watcher.step(loss=...) is finite and not zero, for `window` monitored steps.
It names where the gradient stops, from the gradient flowing back into each
module's output (measured on detail steps; a step with every gradient zero makes
the next monitored step one):
- at the model's output: no module gets a non-zero gradient at its output, so
  what comes after the model (an operation between the output and the loss, or
  the loss itself) returns exactly 0;
- at a module: the last module in forward order whose output still gets a
  non-zero gradient passes none on (a sigmoid/tanh saturated at exactly 0/1 or
  -1/1, a ReLU with every unit inactive, a clamp); when that module has weights
  of its own, the gradients were cleared (zero_grad) before watcher.step() read
  them;
- nowhere to be seen: no module's output got a gradient at all (the model's
  output was detached and another term kept backward() running).

Why it matters: with every gradient exactly 0 no weight moves, whatever the
optimizer does (Adam divides 0 by its running scale: still 0). Typical causes:
a sigmoid output with BCELoss on unscaled inputs (outputs round to exactly 0.0 or
1.0 in float32 and BCELoss's gradient through them is 0), torch.round / floor /
sign / (x > 0).float() between the model and the loss, a mask or a weight that
zeroes the loss input, a clamp or hardtanh whose every input is outside its range.

How to fix it: use the with-logits loss (BCEWithLogitsLoss, cross_entropy on
logits) instead of a sigmoid/softmax followed by BCELoss/NLL; scale the inputs;
replace a rounding or step function with a straight-through estimator,
x + (q(x) - x).detach(); check masks and loss weights.

When it stays silent: a loss of exactly 0 (within `zero_loss`): a model that fits
its data exactly has nothing to learn from it, as with a hinge or margin loss once
every margin is met; steps with NaN/Inf gradients (GW103's, or a step a GradScaler
skips); frozen parameters (requires_grad=False) and parameters whose gradient is
None (GW104's). Without the loss (watcher.step() without loss=), a model that
converged to a zero loss looks the same as a stuck one where the gradient is 0
already at the model's output, so it fires only when the gradient has been
exactly 0 at every monitored step since the first (no model starts at its
optimum), or when a module's output still gets a non-zero gradient that goes no
further (a model at its optimum gets none at its output)."""
    defaults = {"zero_loss": 1e-7}
    threshold_docs = {
        "zero_loss": "a loss whose absolute value is at most this counts as zero "
        "(a model that fits its data exactly)",
    }
    threshold_specs = {"zero_loss": RATIO}
    window = 3

    def __init__(self, **thresholds: float) -> None:
        super().__init__(**thresholds)
        #: a monitored step has shown a non-zero gradient (without the loss, a later
        #: all-zero gradient may be convergence)
        self._moved = False

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        norm = stats.global_grad_norm
        if not math.isfinite(norm) or not gradients_finite(stats):
            return None  # GW103's business, or a step a GradScaler skips
        if not any(s.grad_norm is not None for s in stats):
            return None  # no gradient at all: GW104's business
        if norm != 0.0:
            self._moved = True
            return []
        loss = stats.loss
        if loss is not None:
            if not math.isfinite(loss):
                return None
            if abs(loss) <= self.t("zero_loss"):
                return []  # fits its data exactly: nothing left to learn
        elif self._moved and _stop(ctx) in (None, OUTPUT, NOWHERE):
            # Without the loss, a model that learnt and now sits at a zero loss looks
            # the same, unless the loss visibly still sends a gradient into the model.
            return None
        return [self._condition(ctx, loss)]

    def _condition(self, ctx: RuleContext, loss: float | None) -> Condition:
        stats = ctx.stats
        detail = _zero_detail(ctx)
        where = _where(detail) if detail is not None else None
        if loss is not None:
            loss_text = f"the loss is {loss:.4g}"
        elif self._moved:
            loss_text = "the loss was not passed to step(), but it still sends a gradient"
        else:
            loss_text = "at every monitored step since the first"
        evidence: dict[str, Any] = {
            "global_grad_norm": 0.0,
            "loss": loss,
            "modules_with_gradient": sum(1 for s in stats if s.grad_norm is not None),
        }
        if stats.loss_scale is not None:
            evidence["loss_scale"] = stats.loss_scale
        if where is None:
            message = (
                f"every gradient is exactly 0 ({loss_text}): no weight can move; where it "
                "stops was not measured (no forward hooks: a compiled model, or "
                "activations=False)"
            )
            return Condition(
                layers=(),
                message=message,
                hint=_HINT_OUTPUT,
                evidence={**evidence, "stops_at": None},
                key="zero",
            )
        place, layers, detail_text, hint = where
        evidence.update({"stops_at": place, "seen_at_step": detail.step})  # type: ignore[union-attr]
        evidence["order"] = "forward" if forward_order_known(detail) else "registration"  # type: ignore[arg-type]
        return Condition(
            layers=layers,
            message=f"every gradient is exactly 0 ({loss_text}): {detail_text}",
            hint=hint,
            evidence=evidence,
            key="zero",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"moved": self._moved}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._moved = bool(state.get("moved", False))


#: ``evidence["stops_at"]`` when no module's output gets a gradient / gets any at all
OUTPUT = "output"
NOWHERE = "nowhere"


def _zero_detail(ctx: RuleContext) -> StepStats | None:
    """The most recent detail step (with forward hooks) at which every gradient was 0."""
    return next(
        (
            s
            for s in reversed(ctx.recent(16))
            if s.detail and s.activations_observed and all_zero(s)
        ),
        None,
    )


def _stop(ctx: RuleContext) -> str | None:
    """Where the gradient stops, as last measured (None: not measured)."""
    detail = _zero_detail(ctx)
    where = _where(detail) if detail is not None else None
    return where[0] if where is not None else None


_HINT_OUTPUT = (
    "Something between the model's output and the loss has a derivative of exactly 0: "
    "a sigmoid/softmax output saturated at exactly 0/1 under BCELoss/NLLLoss (use "
    "BCEWithLogitsLoss or cross_entropy on the logits, and scale the inputs), "
    "torch.round/floor/sign or (x > 0).float() (use a straight-through estimator, "
    "x + (q(x) - x).detach()), a clamp whose every input is outside its range, or a "
    "mask or loss weight that is zero everywhere."
)


def _where(detail: StepStats) -> tuple[str, tuple[str, ...], str, str] | None:
    """(where, the layers to name, what was seen, the hint) from a detail step at which
    every gradient was zero; None when no module ran under its forward hooks."""
    ran = [s for s in detail.by_depth() if s.depth is not None and s.output_rms is not None]
    if not ran:
        return None
    reached = [s for s in ran if s.output_grad_rms]
    if not reached:
        last = ran[-1]
        if all(s.output_grad_rms is None for s in ran):
            return (
                NOWHERE,
                (),
                "no module's output got any gradient: the model's output is cut from the "
                "loss (.detach(), .data, torch.no_grad()) and another term keeps "
                "backward() running",
                "Follow the model's output to the loss: remove the .detach() / .data / "
                "torch.no_grad() on the way (a term that does not depend on the model, "
                "such as a regulariser on a constant, lets backward() run without it).",
            )
        return (
            OUTPUT,
            (last.name,),
            f"the gradient is already 0 where it reaches the model's output ({last.name}, "
            "the last module to run): the operation between the output and the loss, or "
            "the loss itself, passes none back",
            _HINT_OUTPUT,
        )
    stop = reached[-1]
    label = _label(stop)
    seen = f"the output of {label} gets a gradient (RMS {stop.output_grad_rms:.2g})"
    if stop.grad_norm is not None:
        # A module whose output gets a gradient gets one for its own weights too (unless
        # its input is all zeros): the gradients were cleared before they were measured.
        return (
            stop.name,
            (stop.name,),
            f"{seen} yet its own parameters' gradients are 0",
            "Call watcher.step() after loss.backward() and before optimizer.zero_grad() "
            f"(the gradients look cleared after backward); if they are not, the input "
            f"of {label} is all zeros.",
        )
    why = _why_blocked(stop)
    return (
        stop.name,
        (stop.name,),
        f"{seen} but passes none on{why}: every module before it in forward order gets "
        "exactly 0",
        _hint_for(stop),
    )


def _label(layer: LayerStats) -> str:
    """The module's name, with its kind where the name alone may be a number ("3")."""
    name = layer.name or "<root>"
    return f"{name} ({layer.kind})" if layer.kind in (RELU, *SATURATING_KINDS) else name


def _why_blocked(layer: LayerStats) -> str:
    if layer.kind in SATURATING_KINDS and layer.saturated_fraction is not None:
        return f" ({layer.saturated_fraction:.0%} of its outputs saturated)"
    if layer.kind == RELU and layer.active_units is not None:
        return f" ({layer.active_units.count()} of {layer.active_units.size} units active)"
    return ""


def _hint_for(layer: LayerStats) -> str:
    label = _label(layer)
    if layer.kind in SATURATING_KINDS:
        return (
            f"{label} is saturated at exactly its limits, where its derivative is 0. If "
            "it is the output activation, drop it and use the with-logits loss "
            "(BCEWithLogitsLoss, cross_entropy on logits); otherwise scale its input "
            "(normalise the data, smaller init, a normalization layer before it)."
        )
    if layer.kind == RELU:
        return (
            f"Every unit of {label} is inactive (negative input for every sample), so "
            "its derivative is 0 everywhere: lower the learning rate, use LeakyReLU, "
            "and do not put a ReLU after the last layer."
        )
    return (
        f"An operation inside or right before {label} has a derivative of exactly 0 "
        "(rounding, sign, a step function, a clamp with every input outside its range): "
        "use a straight-through estimator, x + (q(x) - x).detach(), or a smooth "
        "relaxation."
    )
