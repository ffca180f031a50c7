"""GW303 saturated-output: an output sigmoid stuck at exactly 0.0/1.0 on the wrong side of
its targets, feeding binary_cross_entropy a high loss and no gradient."""

from __future__ import annotations

import math

from ..loss_input import LossInput
from ..stats import StepStats
from .base import POSITIVE, RATIO, SHARE, Condition, Rule, RuleContext
from .loss_words import loss_evidence, percent, source

#: Above this RMS, inputs are not normalised (as GW202 says of a saturated first layer).
_UNSCALED_INPUT = 3.0


class SaturatedOutput(Rule):
    code = "GW303"
    slug = "saturated-output"
    severity = "error"
    summary = (
        "the output sigmoid is stuck at exactly 0/1 on the wrong side of the targets: "
        "high loss, no gradient"
    )
    explanation = """\
What it measures: at monitored steps, the probabilities that reach
F.binary_cross_entropy (nn.BCELoss) after the model's forward pass: the share that are
exactly 0.0 or 1.0, and the share that are exactly 0.0 or 1.0 while their target is on
the other side (|p - target| > 0.5). It fires when, for `window` monitored steps, at
least `saturated` of the outputs are exactly 0/1, at least `wrong` are so on the wrong
side, and the loss passed to watcher.step(loss=...) (the Lightning and Transformers
callbacks pass it), when there is one (a number, or a tensor on the CPU: reading a GPU
tensor would wait for the GPU), is at least `loss` (ln 2: no better than predicting 0.5).

Why it matters: GW202 leaves an output sigmoid alone, because a confident, correct
model saturates it at no cost. A sigmoid that saturates exactly, the wrong way, is
stuck instead: binary_cross_entropy clamps log(0) at -100, so each such output costs
the maximum loss, and the sigmoid's derivative there is exactly 0, so no gradient
reaches the model to move it back. The loss stays high while every gradient is 0.
Inputs that are not normalised, or weights that are too large, saturate the output on
the first steps.

How to fix it: give the loss logits instead: remove the sigmoid and use
BCEWithLogitsLoss (it computes the loss from the logit, where the gradient never
vanishes on a wrong prediction); normalise the inputs (mean 0, std 1); initialise the
last layer with smaller weights; lower the learning rate.

When it stays silent: a confident model whose saturated outputs agree with their
targets (multilabel sigmoid outputs, a memorised training set, soft or smoothed targets
that the output approaches); a loss below `loss`; sigmoid outputs into
BCEWithLogitsLoss (GW301 loss-input-mismatch says that instead); losses on tensors that
need no gradient."""
    defaults = {"saturated": 0.5, "wrong": 0.02, "loss": math.log(2.0), "recovering": 0.5}
    threshold_docs = {
        "saturated": "share of the outputs exactly 0.0 or 1.0",
        "wrong": "share of the outputs exactly 0.0 or 1.0 with the target on the other side",
        "loss": "the loss (when passed to step) below which the model is learning, not stuck",
        "recovering": "a wrong share below this fraction of the previous monitored step's "
        "is recovering, not stuck",
    }
    threshold_specs = {"saturated": SHARE, "wrong": RATIO, "loss": POSITIVE, "recovering": RATIO}
    window = 2
    clear_after = 3

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        inputs = [x for x in ctx.stats.loss_inputs if x.function == "binary_cross_entropy"]
        if not inputs:
            return None
        loss = ctx.stats.loss
        if loss is not None and math.isfinite(loss) and loss < self.t("loss"):
            return []  # learning: saturated outputs are confident, not stuck
        before = _wrong_shares(ctx.recent(2)[0]) if len(ctx.recent(2)) == 2 else {}
        found: dict[str, Condition] = {}
        for seen in inputs:
            if seen.saturated < self.t("saturated") or seen.wrong_saturated < self.t("wrong"):
                continue
            key = seen.producer or seen.last_layer or ""
            earlier = before.get(key)
            if earlier is not None and seen.wrong_saturated < self.t("recovering") * earlier:
                continue  # the wrong outputs are coming back: learning, not stuck
            if key not in found:
                found[key] = self._condition(seen, ctx)
        return list(found.values())

    def _condition(self, seen: LossInput, ctx: RuleContext) -> Condition:
        stats = ctx.stats
        loss = f"; the loss is {stats.loss:.3g}" if stats.loss is not None else ""
        input_rms = stats.input_rms
        if input_rms is not None and input_rms > _UNSCALED_INPUT:
            cause = (
                f" The model's inputs have RMS {input_rms:.3g}: normalise them (mean 0, "
                "std 1) so the output does not saturate at once."
            )
        else:
            cause = " Also check the last layer's initialisation and the learning rate."
        return Condition(
            layers=seen.layers,
            message=(
                f"the outputs of {source(seen)} reaching "
                f"binary_cross_entropy are stuck: {percent(seen.saturated)} are exactly 0.0 "
                f"or 1.0, {percent(seen.wrong_saturated)} on the wrong side of their "
                "target, where they cost the maximum loss and pass exactly zero gradient"
                f"{loss}"
            ),
            hint=(
                f"Remove the {_squash(seen)} and use BCEWithLogitsLoss on the logits: its "
                f"gradient does not vanish on a wrong prediction.{cause}"
            ),
            evidence=loss_evidence(
                seen,
                stats,
                saturated=seen.saturated,
                wrong_saturated=seen.wrong_saturated,
                global_grad_norm=stats.global_grad_norm,
            ),
            score=seen.wrong_saturated,
            key=seen.producer or seen.last_layer or "",
        )


def _wrong_shares(stats: StepStats) -> dict[str, float]:
    """Per producing module, the share of wrong, exactly saturated outputs at that step."""
    return {
        x.producer or x.last_layer or "": x.wrong_saturated
        for x in stats.loss_inputs
        if x.function == "binary_cross_entropy"
    }


def _squash(seen: LossInput) -> str:
    """What bounds the output to [0, 1], as the hint names it."""
    if seen.via in ("", "sigmoid"):
        return "sigmoid"
    return f"{seen.via} that bounds the output"
