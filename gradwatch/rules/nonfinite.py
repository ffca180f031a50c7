"""GW103 non-finite-gradient: NaN or Inf in the gradients, reported at once."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from ..wording import clip_gradients, display_name
from .base import POSITIVE, RATIO, Condition, Rule, RuleContext, format_layers, whole_at_least
from .masked_rows import attention_origin
from .masked_rows import describe as describe_attention


class NonFiniteGradient(Rule):
    code = "GW103"
    slug = "non-finite-gradient"
    severity = "error"
    summary = "NaN/Inf values in the gradients"
    explanation = """\
What it measures: whether any gradient (or the loss, when passed to
watcher.step(loss=...)) holds NaN or Inf. Every step, not only monitored ones: a cheap
check reads a small sample of gradients (and the loss), and at the first NaN/Inf the
whole model is measured at that very step, while the weights are still clean. It counts
the non-finite values, checks whether the weights themselves are already non-finite,
and watches the next forward passes (the first module whose output is non-finite). The
finding names where it first appears, in forward order: poisoned weights, else the first
non-finite forward output, else (weights still finite) this step's batch or computation
and the first layer it reached. It fires at once (no window): one NaN update poisons the
weights for good.

When it first appears in attention probabilities, the finding names the attention
module (and its softmax) and counts the rows whose every key is masked: the softmax of
a row of -inf is 0/0 (left padding under a causal mask, or a key-padding mask that
covers every key a query may see).

With fp16 and a loss scaler (watch(model, scaler=scaler), or step(scaler=...); the
Lightning and Transformers callbacks pass theirs): Inf gradients at a step the scaler
skips are how it calibrates, not a fault, and are not reported. It fires instead when
the scale falls below `min_loss_scale` (an error: the model yields Inf/NaN at every
scale) or the scaler skipped more than `skip_share` of the steps over the last
`skip_window` steps (a warning; counted from the falls of its scale, which halves at
each skipped step), and whenever the weights or the loss are non-finite.

Why it matters: the optimizer adds the gradient to the weights; NaN + anything is NaN,
so from the next step on the model outputs NaN and stops learning. Backpropagation
spreads a NaN to every layer before the one where it appeared, so the place to look
is the first layer in forward order that holds it.

How to fix it: find the operation that produced it (log of 0, division by ~0, sqrt of
a negative, overflow in fp16); lower the learning rate, clip gradients, use bf16 or a
GradScaler with fp16; add an eps where you divide or take logs. If the weights are
already NaN, restart from a checkpoint."""
    defaults = {"min_loss_scale": 1.0, "skip_share": 0.5, "skip_window": 100}
    threshold_docs = {
        "min_loss_scale": "a GradScaler's scale below this means the model produces Inf/NaN "
        "at every scale",
        "skip_share": "share of recent steps a GradScaler skipped above which it fires",
        "skip_window": "steps over which the skipped share is counted (longer than a "
        "scaler's calibration at the start of training)",
    }
    threshold_specs = {
        "min_loss_scale": POSITIVE,
        "skip_share": RATIO,
        "skip_window": whole_at_least(1),
    }
    window = 1
    clear_after = 3
    fast = True

    def __init__(self, **thresholds: float) -> None:
        super().__init__(**thresholds)
        #: step of a NaN/Inf whose origin is not known yet: the next forward pass that is
        #: watched says where it begins, or that it was clean
        self._origin_pending: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"origin_pending": self._origin_pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pending = state.get("origin_pending")
        self._origin_pending = int(pending) if pending is not None else None

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        found = self._check(ctx)
        follow_up = self._follow_up(ctx)
        if follow_up is None:
            return found
        return [*(found or []), follow_up]

    def _follow_up(self, ctx: RuleContext) -> Condition | None:
        """What the first watched forward pass after a NaN/Inf of unknown origin showed:
        the module whose output is non-finite, poisoned weights, or nothing wrong."""
        since = self._origin_pending
        ordered = ctx.stats.by_depth()
        if since is None or ctx.stats.step <= since:
            return None
        if not any(s.output_nonfinite is not None for s in ordered):
            return None  # this step's forward pass was not watched: wait for one that is
        self._origin_pending = None
        weights = [
            s.name for s in ordered if s.param_norm is not None and not math.isfinite(s.param_norm)
        ]
        outputs = [s.name for s in ordered if s.output_nonfinite]
        evidence: dict[str, object] = {"nonfinite_step": since}
        if weights:
            evidence["first_nonfinite_weights"] = weights[0]
            return Condition(
                key="origin",
                layers=tuple(weights),
                message=(
                    f"after the NaN/Inf gradient of step {since}, the weights of "
                    f"{format_layers(weights)} are NaN/Inf: the optimizer applied it"
                ),
                hint=(
                    "Skip the optimizer step when the gradients are not finite (check "
                    "torch.isfinite on the loss or the gradient norm), and restart from a "
                    "checkpoint taken before it."
                ),
                evidence=evidence,
                window=1,
            )
        if outputs:
            evidence["first_nonfinite_output"] = outputs[0]
            return Condition(
                key="origin",
                layers=tuple(outputs),
                message=(
                    f"the NaN/Inf of step {since} begins in the forward output of "
                    f"{display_name(outputs[0])} (first module in forward order whose output "
                    "is NaN/Inf)"
                ),
                hint=(
                    f"Check the input and the operation of {display_name(outputs[0])} (log "
                    "of 0, division by ~0, sqrt of a negative, overflow in fp16)."
                ),
                evidence=evidence,
                window=1,
            )
        evidence["clean_forward_step"] = ctx.stats.step
        return Condition(
            key="origin",
            layers=(),
            message=(
                f"the forward pass of step {ctx.stats.step} was finite in every module: the "
                f"NaN/Inf of step {since} came from that step's batch or its backward pass"
            ),
            hint=(
                "Check the batches for NaN/Inf and out-of-range labels, and the operations "
                "whose derivative can blow up (sqrt near 0, division, log)."
            ),
            evidence=evidence,
            severity="info",
            window=1,
        )

    def _check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        ordered = stats.by_depth()
        bad = [s for s in ordered if s.grad_norm is not None and not math.isfinite(s.grad_norm)]
        weights = [
            s.name for s in ordered if s.param_norm is not None and not math.isfinite(s.param_norm)
        ]
        loss_bad = stats.loss is not None and not math.isfinite(stats.loss)
        if stats.loss_scale is not None and not weights and not loss_bad:
            # fp16 with a loss scaler: Inf gradients at a step the scaler skips are how it
            # calibrates. Only a scale that keeps falling says the model itself is broken.
            collapse = self._scale_collapse(ctx)
            return [collapse] if collapse is not None else []
        if not bad and math.isfinite(stats.global_grad_norm) and not loss_bad:
            return []
        if ctx.model.fp16 and stats.loss_scale is None and bad and not weights and not loss_bad:
            return [self._fp16_without_scaler(bad)]
        return [self._nonfinite(ctx, ordered, bad, weights, loss_bad)]

    def _fp16_without_scaler(self, bad) -> Condition:
        """fp16 with no loss scaler known: a GradScaler overflows the gradients on purpose
        while it calibrates, so Inf gradients at a finite loss are first of all a sign
        that gradwatch was not given the scaler."""
        names = [s.name for s in bad]
        return Condition(
            key="fp16",
            layers=tuple(names),
            message=(
                f"Inf/NaN gradients in {len(bad)} layer(s) under float16 with a finite loss, "
                "and no loss scaler known to gradwatch"
            ),
            hint=(
                "If you use a torch.amp.GradScaler, pass it: gradwatch.watch(model, "
                "scaler=scaler) or watcher.step(scaler=scaler). Its first steps overflow on "
                "purpose while it calibrates (it skips them), and gradwatch then reports "
                "only a scale that keeps falling. Without a GradScaler, fp16 gradients "
                "overflow and underflow: use one, or train in bfloat16."
            ),
            evidence={"layers_with_nonfinite_gradient": len(bad), "fp16": True},
            severity="warning",
            score=float(len(bad)),
        )

    def _nonfinite(self, ctx, ordered, bad, weights, loss_bad) -> Condition:
        stats, framework = ctx.stats, ctx.model.framework
        if bad and all(s.grad_nonfinite == 0 for s in bad):
            return self._overflow(stats, bad, framework)
        outputs = [s.name for s in ordered if s.output_nonfinite]
        attention = None
        forward_seen = any(s.output_nonfinite is not None for s in ordered)
        names = [s.name for s in bad]
        counts = [s.grad_nonfinite for s in bad if s.grad_nonfinite is not None]
        evidence: dict[str, object] = {
            "layers_with_nonfinite_gradient": len(bad),
            "global_grad_norm": stats.global_grad_norm,
        }
        if counts:
            evidence["nonfinite_values"] = sum(counts)
        if loss_bad:
            evidence["loss"] = stats.loss
        if stats.input_rms is not None and not math.isfinite(stats.input_rms):
            evidence["input_nonfinite"] = True
        if stats.loss_scale is not None:
            evidence["loss_scale"] = stats.loss_scale
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
            attention = attention_origin(stats, origin)
            if attention is not None and not evidence.get("input_nonfinite"):
                # A softmax with NaN rows (fully masked rows, most often) is where it began.
                where, hint, more = describe_attention(attention)
                evidence.update(more)
                origin = attention.name
            elif evidence.get("input_nonfinite"):
                hint = "The input batch itself holds NaN/Inf: clean the data (torch.isfinite)."
            else:
                hint = (
                    f"The forward output of {display_name(origin)} is NaN/Inf: check its input and "
                    "operation "
                    "(log of 0, division by ~0, overflow in fp16 -> use bf16 or a GradScaler)."
                )
        elif not forward_seen and (bad or loss_bad):
            # Measured at the step it appeared (the sentinel), before any forward hook:
            # the weights were still finite, so this step's batch or computation made it.
            origin = names[0] if names else ""
            evidence["weights_finite"] = True
            hint = (
                "The weights were finite before this step, so the NaN/Inf came from this "
                "step's batch or an operation in its forward or backward pass. Check the "
                "batch (torch.isfinite(x).all(), labels in range) and operations such as "
                "log, division, sqrt and exp; skip non-finite batches or clip gradients. "
                "gradwatch watches the next forward passes to name the first module whose "
                "output is NaN/Inf, and says what it finds."
            )
            self._origin_pending = stats.step
        elif not bad:
            origin = ""
            if loss_bad:
                hint = (
                    "The loss is NaN/Inf while every gradient is finite: check the loss "
                    "computation (log of 0, division by ~0)."
                )
            else:
                hint = (
                    "Every gradient value is finite but their norm overflows float32: the "
                    "gradients are enormous. Clip them and lower the learning rate."
                )
        else:
            origin = names[0]
            hint = (
                "The forward pass is finite, so the backward pass overflowed or divided by "
                f"zero: {clip_gradients(framework)}, lower the learning rate, add an eps "
                "where the loss divides or takes a log."
            )
        evidence["origin"] = origin
        first = [origin] if origin else []
        if attention is not None and attention.softmax:
            first.append(attention.softmax)
        layers = first + [n for n in names if n not in first]
        if bad:
            message = f"NaN/Inf gradient in {len(bad)} layer(s)"
            if counts:
                message += f" ({sum(counts)} non-finite values)"
        else:
            message = "NaN/Inf loss" if loss_bad else "the gradient norm overflows"
        if loss_bad and bad:
            message += "; the loss is NaN/Inf"
        if weights:
            message += f"; first appears in the weights of {display_name(origin)}"
        elif attention is not None:
            message += f"; first appears in {where}"
        elif outputs:
            message += f"; first appears in the forward output of {display_name(origin)}"
        elif not forward_seen and names:
            message += (
                "; the weights were finite: it began at this step (first layer "
                f"{display_name(origin)})"
            )
        elif names:
            message += f"; first layer in forward order: {display_name(origin)}"
        return Condition(
            layers=tuple(layers),
            message=message,
            hint=hint,
            evidence=evidence,
            score=float(len(bad)),
        )

    def _overflow(self, stats, bad, framework: str) -> Condition:
        """Every value is finite, but so large that the norms overflow float32: the step
        before NaN."""
        names = [s.name for s in bad]
        largest = max((s.grad_max for s in bad if s.grad_max is not None), default=None)
        evidence: dict[str, object] = {"layers_overflowing": len(bad), "origin": names[0]}
        if largest is not None:
            evidence["max_abs_gradient"] = largest
        return Condition(
            layers=tuple(names),
            message=(
                f"the gradients of {format_layers(names)} are so large that their norm "
                "overflows float32 (no NaN/Inf values yet): the next step will be NaN"
            ),
            hint=(
                f"Training is diverging: {clip_gradients(framework)}, lower or warm up "
                "the learning rate, and restart from a checkpoint taken before the jump."
            ),
            evidence=evidence,
            score=float(len(bad)),
        )

    def _scale_collapse(self, ctx: RuleContext) -> Condition | None:
        """A GradScaler halves its scale at each skipped step and doubles it only after
        long runs of clean ones: a scale below 1, or one that fell at most recent steps,
        means the model yields Inf/NaN at every scale."""
        stats = ctx.stats
        scale = stats.loss_scale
        assert scale is not None
        window = int(self.t("skip_window"))
        span: list = []
        for earlier in reversed(list(ctx.history)):
            if earlier.loss_scale:
                span.insert(0, earlier)
                if stats.step - earlier.step >= window:
                    break
        skipped = 0.0
        for before, after in itertools.pairwise(span):
            if after.loss_scale and before.loss_scale and after.loss_scale < before.loss_scale:
                skipped += math.log2(before.loss_scale / after.loss_scale)
        steps = span[-1].step - span[0].step if len(span) > 1 else 0
        # Judged over at least `skip_window` steps: a scaler calibrating at the start
        # skips a burst of steps (log2 of its initial over its working scale) and stops.
        share = skipped / steps if steps >= window else 0.0
        if scale >= self.t("min_loss_scale") and share <= self.t("skip_share"):
            return None
        collapsed = scale < self.t("min_loss_scale")
        what = (
            f"the loss scale fell to {scale:.3g}" if collapsed
            else f"the loss scaler skipped about {skipped:.0f} of the last {steps} steps"
        )
        return Condition(
            key="scaler",
            layers=(),
            message=(
                f"{what} (scale {scale:.3g}): the gradients are Inf/NaN at every scale, so "
                "the model itself produces non-finite values and the optimizer steps are "
                "being skipped"
            ),
            hint=(
                "The loss scaler cannot fix values that are non-finite before scaling: find "
                "the operation that overflows or divides by zero in fp16 (softmax or "
                "attention logits, exp, large activations), compute it in float32, or train "
                "in bf16. Check the data for NaN/Inf."
            ),
            evidence={"loss_scale": scale, "skipped_steps": round(skipped), "steps": steps},
            severity="error" if collapsed else "warning",
            score=-math.log2(max(scale, 1e-30)),
            window=1,
        )
