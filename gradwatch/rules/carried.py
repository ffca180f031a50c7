"""GW107 carried-gradient: gradients carried across an optimizer step (``zero_grad()``
forgotten, or clearing only part of the model)."""

from __future__ import annotations

from ..stats import StepStats
from .base import Condition, Rule, RuleContext, format_layers


class CarriedGradient(Rule):
    code = "GW107"
    slug = "carried-gradient"
    severity = "error"
    summary = "gradients are never cleared between optimizer steps"
    explanation = """\
What it measures: whether .grad was cleared between one optimizer.step() and the
next. PyTorch adds each backward pass's gradient into the existing .grad in place;
zero_grad() sets .grad to None (or zeroes it). gradwatch follows one parameter per
watched layer over one optimizer step after each monitored step: a .grad that is
still the same tensor at the next step and was only ever added to in between was
never cleared. The check is exact (it reads PyTorch's version counter on the
gradient tensor, not the gradient's size), so it fires at the first monitored
step after it saw one.

Why it matters: each optimizer step then uses the sum of every gradient since
the start of training (or since the last clear): the step grows with time, the
loss oscillates and then diverges, and the gradient statistics of those layers
describe the pile, not this step. It also hides dead units: a unit that stopped
getting a gradient keeps its old one.

How to fix it: call optimizer.zero_grad() once per optimizer step (after
optimizer.step(), or before the backward pass of the step's first micro-batch).
With several optimizers or parameter groups, clear each of them (or call
model.zero_grad() on the whole model); a module cleared by hand
(model.encoder.zero_grad()) leaves the others carried.

When it stays silent: intended gradient accumulation (zero_grad and step every k
micro-batches, DDP no_sync, Lightning accumulate_grad_batches, the Trainer's
gradient_accumulation_steps), because it checks across optimizer steps, not
backward passes; a GAN whose generator's backward also fills the discriminator's
.grad, cleared before the discriminator's step; create_graph=True backward
passes and anything else that writes .grad in place between micro-batches (the
check then cannot tell and says nothing)."""
    window = 1
    clear_after = 3

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        if not stats.carry_checked:
            return None  # not checked since the last monitored step
        if not stats.carried:
            return []
        return [self._condition(stats)]

    def _condition(self, stats: StepStats) -> Condition:
        carried = list(stats.carried)
        checked = stats.carry_checked
        everything = len(carried) >= checked
        if everything:
            message = (
                f"the gradients of every checked layer ({checked}) were carried over from "
                "earlier optimizer steps: .grad is never cleared, so each step adds all "
                "earlier gradients to this one"
            )
            hint = (
                "Call optimizer.zero_grad() once per optimizer step (after "
                "optimizer.step(), or before the first backward pass of the step). For "
                "gradient accumulation, clear after each optimizer step, not never."
            )
        else:
            message = (
                f"the gradients of {format_layers(carried)} ({len(carried)} of {checked} "
                "checked layers) were carried over from earlier optimizer steps, while the "
                "others were cleared: only part of the model is zeroed between steps"
            )
            hint = (
                f"{format_layers(carried, 3)} is not cleared by the zero_grad() call(s) in "
                "the loop: clear every optimizer (or parameter group) that holds it, or "
                "call model.zero_grad() on the whole model instead of on a sub-module."
            )
        return Condition(
            layers=tuple(carried),
            message=message,
            hint=hint,
            evidence={"carried_layers": len(carried), "checked_layers": checked},
            score=float(len(carried)),
        )
