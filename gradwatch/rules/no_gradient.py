"""GW104 no-gradient: trainable parameters that get no gradient, step after step."""

from __future__ import annotations

from .base import Condition, Rule, RuleContext, format_layers


class NoGradient(Rule):
    code = "GW104"
    slug = "no-gradient"
    severity = "warning"
    summary = "parameters that require grad get no gradient"
    explanation = """\
What it measures: parameters with requires_grad=True whose .grad is None after the
backward pass; and, with forward hooks armed, modules that ran in the forward pass but
whose output never received a gradient (their parameters' gradients stay exactly 0,
as with zero_grad(set_to_none=False)). It fires when that holds for `window`
monitored steps. Frozen parameters (requires_grad=False) are not counted.

Why it matters: such parameters are trained by nothing. Usually by mistake: an output
was detached (.detach(), .item(), .numpy(), .data, torch.no_grad()), a branch is never
used in forward, or a module was created but not wired in; the optimizer then wastes
memory on them and the model silently lacks that part.

How to fix it: follow the module's output to the loss and remove the detach; if the
parameters are unused on purpose, freeze them (requires_grad_(False)) or leave them
out of the model/watch (exclude=[...])."""
    defaults: dict[str, float] = {}
    window = 3

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        missing = [s for s in stats.by_depth() if s.missing_grad]
        cut_off = [
            s
            for s in stats.by_depth()
            if s.calls > 0
            and s.output_grad_norm is None
            and s.grad_norm == 0.0
            and stats.activations_observed
        ]
        if not missing and not cut_off:
            return []
        names = [s.name for s in missing] + [s.name for s in cut_off]
        params = [f"{s.name}.{p}" if s.name else p for s in missing for p in s.missing_grad]
        unused = [s.name for s in missing if s.calls == 0 and stats.activations_observed]
        detached = [s.name for s in missing if s.calls > 0] + [s.name for s in cut_off]
        parts = []
        if params:
            parts.append(f"{len(params)} parameter(s) got no gradient ({format_layers(params)})")
        if cut_off:
            parts.append(
                f"{format_layers([s.name for s in cut_off])} ran but no gradient reached "
                "its output (its gradient is exactly 0)"
            )
        hint_parts = []
        if detached:
            hint_parts.append(
                f"{format_layers(detached)} ran in the forward pass, so its output is "
                "detached from the loss: look for .detach(), .item(), .numpy(), .data or "
                "torch.no_grad() between it and the loss."
            )
        if unused:
            hint_parts.append(
                f"{format_layers(unused)} never ran in the forward pass: wire it in, or "
                "freeze/remove it if it is unused on purpose."
            )
        if not hint_parts:
            hint_parts.append(
                "Follow these modules' outputs to the loss: a detach, .item() or "
                "torch.no_grad() cuts the graph; freeze them if they are unused on purpose."
            )
        return [
            Condition(
                layers=tuple(names),
                message="; ".join(parts),
                hint=" ".join(hint_parts),
                evidence={
                    "parameters": len(params),
                    "modules": len(names),
                    "never_ran": len(unused),
                },
                score=float(len(names)),
                # announced again if the set of modules grows
            )
        ]
