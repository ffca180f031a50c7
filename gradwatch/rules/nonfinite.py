"""GW103 non-finite-gradient: NaN or Inf in the gradients, reported at once."""

from __future__ import annotations

import math

from .base import Condition, Rule, RuleContext, format_layers


class NonFiniteGradient(Rule):
    code = "GW103"
    slug = "non-finite-gradient"
    severity = "error"
    summary = "NaN/Inf values in the gradients"
    explanation = """\
What it measures: whether any gradient holds NaN or Inf (its norm is not finite), at
every monitored step. On such a step it counts the non-finite values, checks whether
the weights themselves are already non-finite, and looks closer at the next monitored
step (the first module in forward order whose output is non-finite). The finding
names where it first appears, in forward order: poisoned weights, else the first
non-finite forward output, else the first layer with a non-finite gradient; the other
affected layers follow. It fires at once (no window): one NaN update poisons the
weights for good.

Why it matters: the optimizer adds the gradient to the weights; NaN + anything is NaN,
so from the next step on the model outputs NaN and stops learning. Backpropagation
spreads a NaN to every layer before the one where it appeared, so the place to look
is the first layer in forward order that holds it.

How to fix it: find the operation that produced it (log of 0, division by ~0, sqrt of
a negative, overflow in fp16); lower the learning rate, clip gradients, use bf16 or a
GradScaler with fp16; add an eps where you divide or take logs. If the weights are
already NaN, restart from a checkpoint."""
    defaults: dict[str, float] = {}
    window = 1
    clear_after = 3

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        ordered = stats.by_depth()
        bad = [s for s in ordered if s.grad_norm is not None and not math.isfinite(s.grad_norm)]
        if not bad and math.isfinite(stats.global_grad_norm):
            return []
        outputs = [s.name for s in ordered if s.output_nonfinite]
        weights = [
            s.name for s in ordered if s.param_norm is not None and not math.isfinite(s.param_norm)
        ]
        names = [s.name for s in bad]
        counts = [s.grad_nonfinite for s in bad if s.grad_nonfinite is not None]
        evidence: dict[str, object] = {
            "layers_with_nonfinite_gradient": len(bad),
            "global_grad_norm": stats.global_grad_norm,
        }
        if counts:
            evidence["nonfinite_values"] = sum(counts)
        if stats.input_rms is not None and not math.isfinite(stats.input_rms):
            evidence["input_nonfinite"] = True
        # Where it first appears, in forward order: poisoned weights are the root cause;
        # else the first module whose forward output is already NaN/Inf; else (the forward
        # pass is clean) the backward pass produced it.
        if weights:
            origin = weights[0]
            evidence["first_nonfinite_weights"] = origin
            hint = (
                f"The weights of {format_layers(weights)} are already NaN/Inf: an earlier "
                "update poisoned them, and every gradient since is NaN. Restart from a "
                "checkpoint with a lower learning rate and gradient clipping."
            )
        elif outputs:
            origin = outputs[0]
            evidence["first_nonfinite_output"] = origin
            if evidence.get("input_nonfinite"):
                hint = "The input batch itself holds NaN/Inf: clean the data (torch.isfinite)."
            else:
                hint = (
                    f"The forward output of {origin} is NaN/Inf: check its input and operation "
                    "(log of 0, division by ~0, overflow in fp16 -> use bf16 or a GradScaler)."
                )
        elif not bad:
            origin = ""
            hint = (
                "Every gradient value is finite but their norm overflows float32: the "
                "gradients are enormous. Clip them and lower the learning rate."
            )
        else:
            origin = names[0]
            hint = (
                "The forward pass is finite, so the backward pass overflowed or divided by "
                "zero: clip gradients (clip_grad_norm_), lower the learning rate, add an eps "
                "where the loss divides or takes a log, or use loss scaling with fp16."
            )
        evidence["origin"] = origin
        layers = ([origin] if origin else []) + [n for n in names if n != origin]
        message = f"NaN/Inf gradient in {len(bad)} layer(s)"
        if counts:
            message += f" ({sum(counts)} non-finite values)"
        if weights:
            message += f"; first appears in the weights of {origin}"
        elif outputs:
            message += f"; first appears in the forward output of {origin}"
        elif names:
            message += f"; first layer in forward order: {origin}"
        return [
            Condition(
                layers=tuple(layers),
                message=message,
                hint=hint,
                evidence=evidence,
                score=float(len(bad)),
            )
        ]
