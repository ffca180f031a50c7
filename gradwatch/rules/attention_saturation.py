"""The attention half of GW202 saturated-activation: attention softmax rows that have
collapsed onto one key, and why.

A sharp attention row is not a fault in itself: a trained model learns heads that look
at one token (the previous one, an earlier copy). What is a fault is attention that is
collapsed *before training could have taught it anything* (the scale or the
initialisation makes the logits too large: with q.k / sqrt(head size), attention at
initialisation is close to uniform) or collapsed with logits far larger than any sharp
row needs (the logits grew without bound: learning rate, no warmup, no QK
normalisation). Those are the two findings; learned sharpness is left alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..stats import SATURATED_PROBABILITY, AttentionStats
from ..wording import display_name
from .base import Condition, RuleContext, format_layers

#: Thresholds this check adds to GW202 (name -> default, meaning).
DEFAULTS = {
    "attention_entropy": 0.35,
    "attention_logit": 50.0,
    "attention_start": 50,
    "scale_ratio": 2.0,
}
DOCS = {
    "attention_entropy": "mean row entropy of an attention softmax, as a share of its maximum "
    "(the log of the keys each row sees), below which its rows have collapsed onto few keys",
    "attention_logit": "largest |attention logit| from which a collapse is a fault at any step "
    "(a one-hot row needs a lead of about ln(100 x keys), 5 to 15)",
    "attention_start": "steps from the start of training within which a collapse counts as "
    "built in (scale or initialisation): training cannot have sharpened attention yet",
    "scale_ratio": "the factor on q.k over the usual 1/sqrt(head size) from which a collapse at "
    "the start is blamed on the scale",
}
#: The largest |logit| grew by at least this factor since the first measurement: the
#: collapse came with training (learning rate, warmup), not with the model.
_GREW = 4.0


class AttentionSaturation:
    """Judges the attention modules of one step (see the module docstring).

    Remembers each module's first measurement (step, entropy, largest logit) and whether
    it was already collapsed near the start of training: the evidence that tells a model
    built saturated from one that grew saturated.
    """

    def __init__(self) -> None:
        self.first: dict[str, tuple[int, float | None, float | None]] = {}
        #: module -> first step (within `attention_start` of the start) it was collapsed
        self.collapsed_early: dict[str, int] = {}
        self.scale_ratio = DEFAULTS["scale_ratio"]

    def check(self, ctx: RuleContext, t: Mapping[str, float]) -> list[Condition] | None:
        self.scale_ratio = t["scale_ratio"]
        modules = [a for a in ctx.stats.attention.values() if a.entropy is not None]
        if not modules:
            return None
        step = ctx.stats.step
        for a in modules:
            self.first.setdefault(a.name, (step, a.entropy, a.max_logit))
            collapsed = (a.entropy or 0.0) < t["attention_entropy"]
            if collapsed and step <= t["attention_start"]:
                self.collapsed_early.setdefault(a.name, step)
            elif not collapsed and step > t["attention_start"]:
                self.collapsed_early.pop(a.name, None)  # it recovered: no longer evidence
        flagged: list[tuple[AttentionStats, str]] = []
        for a in modules:
            cause = self._cause(a, t)
            if cause is not None:
                flagged.append((a, cause))
        if not flagged:
            return []
        return [self._condition(flagged, t)]

    def _cause(self, a: AttentionStats, t: Mapping[str, float]) -> str | None:
        """Why a collapsed module is a fault, or None (not collapsed, or sharp the way a
        trained model may legitimately be):

        - "scale": collapsed within `attention_start` steps of the start, before training
          could sharpen it, and the factor on q.k is `scale_ratio` times the usual one;
        - "built": the same with the factor not seen (q or k may carry it); not when it is
          known to be the usual one: a pretrained model fine-tuned from step 0 is sharp
          because it learned to be;
        - "grown": logits far beyond what a sharp row needs, grown since first measured;
        - "large": the same, already so when first measured.
        """
        if a.entropy is None or a.entropy >= t["attention_entropy"]:
            return None
        ratio = a.scale_ratio
        early = a.name in self.collapsed_early
        if early and ratio is not None and ratio >= t["scale_ratio"]:
            return "scale"
        if early and ratio is None:
            return "built"
        if a.max_logit is not None and a.max_logit >= t["attention_logit"]:
            first_logit = self.first.get(a.name, (0, None, None))[2]
            if first_logit is not None and 0 < _GREW * first_logit <= a.max_logit:
                return "grown"
            return "large"
        return None

    def _condition(
        self, flagged: list[tuple[AttentionStats, str]], t: Mapping[str, float]
    ) -> Condition:
        worst, cause = min(flagged, key=lambda pair: pair[0].entropy or 0.0)
        layers: list[str] = []
        for a, _ in flagged:
            layers.append(a.name)
            if a.softmax:
                layers.append(a.softmax)
        parts = [f"{a.label} {a.entropy or 0:.2f}" for a, _ in flagged]
        share = worst.saturated_fraction or 0.0
        message = (
            f"attention collapsed onto few keys (mean row entropy / its maximum): "
            f"{format_layers(parts)}; in {display_name(worst.name)}, {share:.0%} of rows are "
            f"one-hot (max probability > {SATURATED_PROBABILITY}), largest logit "
            f"{worst.max_logit or 0:.3g}"
        )
        step, first_entropy, first_logit = self.first.get(worst.name, (None, None, None))
        evidence: dict[str, Any] = {
            "worst_layer": worst.name,
            "computed_by": worst.softmax or worst.via,
            "entropy": worst.entropy,
            "saturated_fraction": worst.saturated_fraction,
            "max_logit": worst.max_logit,
            "rows_judged": worst.judged_rows,
            "keys": worst.keys,
            "layers_flagged": len(flagged),
            "cause": cause,
            "first_step": step,
            "first_entropy": first_entropy,
            "first_max_logit": first_logit,
        }
        if worst.scale is not None:
            evidence["scale"] = worst.scale
        if worst.head_dim:
            evidence["head_dim"] = worst.head_dim
        if worst.scale_ratio is not None:
            evidence["scale_ratio"] = worst.scale_ratio
        return Condition(
            key="attention",
            layers=tuple(layers),
            message=message,
            hint=self._hint(worst, cause),
            evidence=evidence,
            score=1.0 - (worst.entropy or 0.0),
        )

    def _hint(self, a: AttentionStats, cause: str) -> str:
        """The causes, in the order the evidence supports them."""
        first_logit = self.first.get(a.name, (0, None, None))[2]
        largest = a.max_logit or 0.0
        grew = first_logit is not None and 0 < _GREW * first_logit <= largest
        scale = _scale_text(a)
        bound = (
            "QK normalisation (LayerNorm/RMSNorm on q and k) or logit soft-capping "
            "(cap * tanh(logits / cap)) keeps the logits bounded whatever the learning rate."
        )
        lr = "warm up the learning rate (or lower it) and clip gradients"
        if cause == "scale":
            steps = [
                f"Fix the attention scale: {scale}. Divide q.k by sqrt(head size) (for "
                "scaled_dot_product_attention, scale=None does)."
            ]
            if grew:
                steps.append(
                    f"The logits also grew during training (largest {first_logit:.3g} -> "
                    f"{largest:.3g}): {lr}."
                )
            steps.append(bound)
        elif cause == "built":
            early = self.collapsed_early.get(a.name)
            steps = [
                f"The attention was already collapsed at step {early}, before training could "
                "sharpen it: check the scale (q.k divided by sqrt(head size), not multiplied, "
                "and not scaled twice) and the initialisation of the q/k projections "
                "(std about 1/sqrt(width), or 0.02).",
                f"Then {lr}; {bound[0].lower()}{bound[1:]}",
            ]
        else:
            if cause == "grown" and first_logit is not None:
                what = f"The logits grew during training (largest {first_logit:.3g} -> "
            else:
                what = "The logits are far larger than sharp attention needs (largest "
            what += f"{largest:.3g})"
            steps = [f"{what}: {lr}.", bound, "Weight decay on the q/k projections helps."]
            if scale and (a.scale_ratio or 0.0) >= self.scale_ratio:
                steps.append(f"Check the scale too: {scale}.")
            elif scale:
                steps.append(f"The scale is the usual one ({scale}).")
        return " ".join(steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "first": {name: list(value) for name, value in self.first.items()},
            "collapsed_early": dict(self.collapsed_early),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.first = {
            name: (int(v[0]), v[1], v[2]) for name, v in (state.get("first") or {}).items()
        }
        self.collapsed_early = {
            name: int(v) for name, v in (state.get("collapsed_early") or {}).items()
        }


def _scale_text(a: AttentionStats) -> str:
    ratio = a.scale_ratio
    if ratio is None or a.scale is None or not a.head_dim:
        return ""
    usual = 1.0 / math.sqrt(a.head_dim)
    return (
        f"q.k is multiplied by {a.scale:.3g} with head size {a.head_dim}, {ratio:.3g}x the "
        f"usual 1/sqrt({a.head_dim}) = {usual:.3g}"
    )
