"""GW203 attention-logit-growth: the largest attention logit keeps rising, step after
step, past the size sharp attention needs: the softmax is heading for saturation."""

from __future__ import annotations

import itertools
import math

from .base import (
    POSITIVE,
    Condition,
    Rule,
    RuleContext,
    format_layers,
    greater_than,
    whole_at_least,
)


class AttentionLogitGrowth(Rule):
    code = "GW203"
    slug = "attention-logit-growth"
    severity = "warning"
    summary = "the largest attention logit keeps growing: the softmax is heading for saturation"
    explanation = """\
What it measures: for each attention module (an nn.Softmax module, a softmax whose
probabilities weight the values, or F.scaled_dot_product_attention, whose logits are
recomputed from q and k on a sample of rows), the largest |logit| among the unmasked
keys of a fixed sample of rows, at each monitored step. It fires when, over the last
`steps` monitored steps, that value grew by at least `growth` times, rose at most of
those steps, and reached `min_logit`, for `window` monitored steps.

Why it matters: the logits of attention grow when the norms of q and k grow (a high
learning rate, no warmup, no normalisation of q and k). Once a row's largest logit
leads the others by more than about ln(100 x keys) (5 to 15), its softmax is one-
hot: the derivative vanishes, q and k stop learning and the loss plateaus or
diverges (the instability reported for large vision and language transformers).
Sharp attention that a model learns needs logits of that order and then stops
growing; logits that keep growing past `min_logit` are not learning, they are
drifting. GW202 reports the collapse once it has happened; this comes before.

How to fix it: warm up the learning rate (or lower it); normalise q and k (QK-norm:
LayerNorm/RMSNorm on q and k before the product), or soft-cap the logits (cap *
tanh(logits / cap)); weight decay on the q/k projections; check the scale (q.k /
sqrt(head size))."""
    defaults = {"growth": 2.0, "steps": 6, "min_logit": 30.0}
    threshold_specs = {
        "growth": greater_than(1.0),
        "steps": whole_at_least(3),
        "min_logit": POSITIVE,
    }
    threshold_docs = {
        "growth": "factor by which the largest |logit| grew over the last `steps` monitored steps",
        "steps": "monitored steps over which the growth is measured (at least 3)",
        "min_logit": "largest |logit| it must reach: beyond what a sharp row needs (a lead of "
        "~ln(100 x keys)), so that growth a model learns early on does not count",
    }
    window = 2
    worse_by = 1.0

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        current = ctx.stats.attention
        if not current:
            return None
        span = max(3, int(self.t("steps")))
        recent = ctx.recent(span)
        flagged: list[tuple[str, float, float, list[float]]] = []
        for name, now in current.items():
            series = [
                s.attention[name].max_logit
                for s in recent
                if name in s.attention and s.attention[name].max_logit is not None
            ]
            if len(series) < span or now.max_logit is None:
                continue
            if not all(math.isfinite(v) for v in series):
                continue
            start, end = series[0], series[-1]
            if end < self.t("min_logit") or start <= 0 or end < self.t("growth") * start:
                continue
            rises = sum(b > a for a, b in itertools.pairwise(series))
            if rises * 3 < 2 * (len(series) - 1):  # rising at two thirds of the steps
                continue
            flagged.append((name, start, end, series))
        if not flagged:
            return []
        flagged.sort(key=lambda item: -item[2] / item[1])
        name, start, end, series = flagged[0]
        worst = current[name]
        first_step = recent[0].step
        names = [n for n, *_ in flagged]
        softmaxes = [current[n].softmax for n in names if current[n].softmax]
        evidence: dict[str, object] = {
            "worst_layer": name,
            "max_logit": end,
            "max_logit_before": start,
            "since_step": first_step,
            "growth": end / start,
            "entropy": worst.entropy,
            "saturated_fraction": worst.saturated_fraction,
            "layers_flagged": len(flagged),
        }
        if worst.scale_ratio is not None:
            evidence["scale_ratio"] = worst.scale_ratio
        trail = ", ".join(f"{v:.3g}" for v in series)
        return [
            Condition(
                layers=tuple(names + softmaxes),
                message=(
                    f"the largest attention logit keeps growing in {format_layers(names)}: "
                    f"{start:.3g} -> {end:.3g} ({end / start:.2g}x since step {first_step}; "
                    f"{trail}) in {worst.label}; mean row entropy now "
                    f"{(worst.entropy if worst.entropy is not None else float('nan')):.2f} "
                    "of its maximum"
                ),
                hint=(
                    "Attention logits are drifting upward: warm up the learning rate (or lower "
                    "it); add QK normalisation (LayerNorm/RMSNorm on q and k) or logit "
                    "soft-capping (cap * tanh(logits / cap)) to bound them; weight decay on "
                    "the q/k projections helps. Left alone, the softmax saturates (GW202)."
                ),
                evidence=evidence,
                score=math.log2(end / start),
            )
        ]
