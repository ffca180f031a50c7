"""GW109 tiny-updates: every layer's weights barely move at each step (flat vanishing)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import RATIO, Condition, Rule, RuleContext
from .updates import LossMemory, loss_level, lr_text, moving_ratios


class TinyUpdates(Rule):
    code = "GW109"
    slug = "tiny-updates"
    severity = "warning"
    summary = "every layer's weights barely move at each step: nothing is learning"
    explanation = """\
What it measures: the update-to-weight ratio |Δw|/|w| of every weight layer, measured
from the weights across one optimizer step (any optimizer). When the largest of them is
below `ratio` for `window` monitored steps, no layer learns: at that pace a weight
needs millions of steps to change by its own size (about 1e-3 per step is healthy).

Why it matters: the depth-relative vanishing-gradient check (GW101) compares layers
with each other; when the gradient is tiny in every layer alike (a saturating loss,
such as a GAN generator trained on log(1 - D(G(z))), or a loss scaled far down), the
profile is flat and only the size of the step shows it. Adam-like optimizers hide small
gradients (they divide by their scale) until the gradient falls to their eps.

How to fix it: for SGD, the step is lr x gradient: find why the gradient is tiny
everywhere (a saturating loss: use the non-saturating form, e.g. -log D(G(z)) for a GAN
generator; a loss divided by a large constant) or raise the learning rate; for Adam-like
optimizers, a gradient below eps is scaled away: lower eps or rescale the loss.

When it stays silent: some layer has no gradient at all or does not move at all (a
gradient cut off, dead units, or one below float precision: GW101, GW104, GW201 say
which); a converged
model (the loss, when passed, has fallen to half its first level or less); a schedule
that decays the learning rate (the optimizer's lr, when known, below 1/100 of its
highest value so far, as at the end of a cosine schedule); layers that are not updated
at all (GW105); zero-initialised layers."""
    defaults = {"ratio": 1e-6, "converged": 0.5, "decayed": 1e-2}
    threshold_docs = {
        "ratio": "largest |Δw|/|w| over the weight layers below which nothing learns",
        "converged": "loss level / first loss level at or below which the model has "
        "learnt (tiny steps then mean convergence)",
        "decayed": "lr / highest lr so far below which the schedule has decayed the steps",
    }
    threshold_specs = {"ratio": RATIO, "converged": RATIO, "decayed": RATIO}
    window = 3

    def __init__(self, **thresholds: Any) -> None:
        super().__init__(**thresholds)
        self._memory = LossMemory()

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        self._memory.see(stats)
        ratios = moving_ratios(ctx)
        if not ratios:
            return None
        largest = max(r for _, r in ratios)
        if largest >= self.t("ratio"):
            return []
        if any(r == 0.0 or not stats.layers[n].grad_norm for n, r in ratios):
            # Some layer has no gradient at all, or did not move at all (what moves it is
            # momentum running down): a gradient cut off, dead units, or one below float
            # precision. GW101, GW104 and GW201 tell which; this is not a flat loss.
            return None
        level, first = loss_level(stats), self._memory.first
        if level is not None and first is not None and level <= self.t("converged") * first:
            return []  # the model has learnt: small steps near the loss floor are expected
        info, top = stats.optimizer, self._memory.top_lr
        if info is not None and top is not None and info.lr < self.t("decayed") * top:
            return []  # the schedule is ending (cosine to 0): the steps shrink with it
        names = [n for n, _ in ratios]
        adaptive = info is not None and info.adaptive
        if adaptive:
            why = (
                f"{info.name} scales each gradient by its own size, so its steps shrink "
                f"only when the gradient falls towards eps={info.eps:g}: the gradients are "
                "that small"
                if info is not None and info.eps is not None
                else "the gradients fall below the optimizer's eps"
            )
            fix = "lower eps or rescale the loss, and find why the gradient is tiny everywhere"
        else:
            why = "the step is lr x gradient, and the gradient is tiny in every layer"
            fix = (
                "find why the gradient is tiny everywhere (a saturating loss: use its "
                "non-saturating form, e.g. -log D(G(z)) for a GAN generator; a loss divided "
                f"by a large constant), or raise {lr_text(stats)}"
            )
        return [
            Condition(
                key="flat",
                layers=tuple(names),
                message=(
                    f"one optimizer step changes the weights of every layer by at most "
                    f"{largest:.2g}x their size ({len(ratios)} weight layers; about 1e-3 is "
                    f"healthy): {why}"
                ),
                hint=fix[0].upper() + fix[1:] + ".",
                evidence={
                    "max_update_ratio": largest,
                    "layers_measured": len(ratios),
                    **({"optimizer": info.name, "lr": info.lr} if info is not None else {}),
                    **({"loss_level": level} if level is not None else {}),
                },
                score=-math.log10(max(largest, 1e-30)),
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self._memory.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._memory.load(state.get("memory", {}))
