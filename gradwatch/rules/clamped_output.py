"""GW302 clamped-output: logits that are never negative and pinned at exactly 0 (a ReLU or
another clamp after the last layer)."""

from __future__ import annotations

from ..loss_input import LossInput
from .base import RATIO, Condition, Rule, RuleContext, whole_at_least
from .loss_words import fix_place, loss_evidence, percent, source

_LOGIT_LOSSES = ("cross_entropy", "binary_cross_entropy_with_logits")


class ClampedOutput(Rule):
    code = "GW302"
    slug = "clamped-output"
    severity = "warning"
    summary = "the logits reaching the loss are clamped at 0 (an activation after the last layer)"
    explanation = """\
What it measures: at monitored steps, the logits that reach F.cross_entropy or
F.binary_cross_entropy_with_logits (and their nn.*Loss modules) after the model's
forward pass, on a sample of up to 2,048 rows. It fires when, for `window` monitored
steps, every logit checked is >= 0 and either whole classes (columns) are exactly 0 in
every row, or at least `zero_share` of all logits are exactly 0, in at least
`min_rows` rows. The finding names the module whose output reached the loss and the
operation that clamped it (relu, clamp, hardtanh).

Why it matters: a logit clamped at 0 cannot go below 0, and where the clamp is active it
passes no gradient. The loss pushes the wrong classes' logits down; once a class's
pre-activation is negative for every input, its logit is pinned at exactly 0 and no
gradient will ever raise it: the class can no longer be predicted (recall 0). The
output layer's dead units are few compared with a hidden layer's (GW201 dead-units
needs most of a layer), so this needs its own check.

How to fix it: remove the activation (ReLU, ReLU6, clamp) after the last layer: the
loss needs logits that can be negative. If outputs must be non-negative for another
reason, use a smooth map (softplus) and a loss made for it.

When it stays silent: logits that take negative values; logits that are all exactly 0
(a zero-initialised output layer before its first update); probabilities into
cross_entropy (GW301 loss-input-mismatch says that instead); losses on tensors that need
no gradient."""
    defaults = {"zero_share": 0.25, "min_rows": 8}
    threshold_docs = {
        "zero_share": "share of the logits exactly 0 that shows a clamp even before whole "
        "classes are lost",
        "min_rows": "rows a loss call must have before a class that is 0 in all of them "
        "counts",
    }
    threshold_specs = {"zero_share": RATIO, "min_rows": whole_at_least(1)}
    window = 3
    clear_after = 3

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        inputs = [x for x in ctx.stats.loss_inputs if x.function in _LOGIT_LOSSES]
        if not inputs:
            return None
        found: dict[str, Condition] = {}
        for seen in inputs:
            condition = self._judge(seen, ctx)
            if condition is not None and condition.key not in found:
                found[condition.key] = condition
        return list(found.values())

    def _judge(self, seen: LossInput, ctx: RuleContext) -> Condition | None:
        if seen.non_negative < 1.0 or seen.rows < self.t("min_rows"):
            return None
        if seen.function == "cross_entropy" and seen.probability_rows > 0.5:
            return None  # probabilities: GW301's finding
        if seen.zeros >= 0.999:
            return None  # every logit 0: a zero-initialised output layer, not yet updated
        dead = seen.dead_columns
        if not dead and seen.zeros < self.t("zero_share"):
            return None
        noun = "classes" if seen.function == "cross_entropy" else "outputs"
        if dead:
            lost = (
                f"{dead} of {seen.classes} {noun} are exactly 0 in all {seen.rows} rows and "
                f"{percent(seen.zeros)} of all logits are 0, where no gradient passes; a "
                "class whose logit is 0 for every input can never be predicted again"
            )
        else:
            lost = (
                f"{percent(seen.zeros)} of the logits are exactly 0, where no gradient passes"
            )
        return Condition(
            layers=seen.layers,
            message=(
                f"the logits reaching {seen.function} from {source(seen)} are never "
                f"negative: {lost}"
            ),
            hint=(
                f"Remove the activation after the last layer{fix_place(seen)}: "
                f"{seen.function} needs logits that can be negative."
            ),
            evidence=loss_evidence(seen, ctx.stats, dead_columns=dead, zero_share=seen.zeros),
            score=dead / max(1, seen.classes) + seen.zeros,
            key=f"{seen.function}:{seen.producer or seen.last_layer}",
        )
