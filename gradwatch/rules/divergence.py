"""GW106 diverging: optimizer steps far larger than the weights, or a loss that climbs by
orders of magnitude or keeps climbing, whatever the optimizer."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from .base import (
    POSITIVE,
    Condition,
    Rule,
    RuleContext,
    format_layers,
    greater_than,
    median,
    whole_at_least,
)
from .updates import LossMemory, loss_level, lr_text, moving_ratios

#: Loss levels compared for a steady climb are taken at least this many steps apart (the
#: level is a median over the last 16 steps: closer ones share most of their values).
_LEVEL_SPACING = 8


class Diverging(Rule):
    code = "GW106"
    slug = "diverging"
    severity = "error"
    summary = "updates far larger than the weights, or a loss that climbs: training diverges"
    explanation = """\
What it measures, for any optimizer (SGD, Adam, AdamW, Lion, Adafactor, custom):
- updates too large: the update-to-weight ratio |Δw|/|w| of each weight layer, measured
  from the weights across one optimizer step. When its median over the weight layers is
  above `update_ratio` for `window` monitored steps, or above `update_at_once` at a
  single one, every step rewrites the weights by a large part of their own size (about
  1e-3 is healthy). Layers whose weights were zero, and layers the optimizer does not
  update, are left out;
- the loss (when passed: watcher.step(loss=loss)), as the median over the last steps:
  above `loss_factor` times its first level and still rising (for 3 monitored steps;
  at once above 10x that or with a median update ratio above `ratio_with_loss`), or
  risen by more than
  `rise` times at each of the last `rising_steps` comparisons (levels at least 8 steps
  apart): a steady climb that never looks like a jump;
- both together: the loss level above `loss_rise` times its lowest so far and still
  rising, while the median update ratio is above `ratio_with_loss` (each step rewrites
  a sizeable part of the weights), for `window` monitored steps. This is how a learning
  rate that is too large for Adam shows before the loss peaks.

Why it matters: a learning rate far too large for the optimizer (Adam normalises the
gradient, so its steps are about lr per weight however small the gradient is) makes
the weights jump around; the loss then climbs and ends at chance level or NaN. The
gradient itself may look ordinary: this is judged from what the step did.

How to fix it: lower the learning rate (the finding names it; 3-10x lower is a first
try), add or lengthen a warm-up, clip gradients (clip_grad_norm_), and for Adam-like
optimizers check eps and the betas.

When it stays silent: healthy steps (ratios around 1e-3, even 1e-2); noisy small-batch
training (the loss level is a median over steps, and a climb must last); an lr warm-up;
cosine restarts (SGDR: one jump, then the loss falls); a loss that jumps once when the
data changes (a curriculum) and then recovers; a negative loss (a log-likelihood: its
ratios mean nothing)."""
    defaults = {
        "update_ratio": 0.3,
        "update_at_once": 1.0,
        "loss_factor": 10.0,
        "loss_rise": 2.0,
        "ratio_with_loss": 0.05,
        "rise": 2.0,
        "rising_steps": 3,
    }
    threshold_docs = {
        "update_ratio": "median |Δw|/|w| over weight layers above which, for `window` "
        "monitored steps, the steps are too large",
        "update_at_once": "median |Δw|/|w| above which it is announced at once",
        "loss_factor": "loss level / first loss level above which a loss still rising "
        "since the previous monitored step diverges",
        "loss_rise": "loss level / its lowest level so far above which a rising loss, "
        "with updates above `ratio_with_loss`, diverges",
        "ratio_with_loss": "median |Δw|/|w| above which a loss rising by `loss_rise` is "
        "blamed on too large steps",
        "rise": "factor by which the loss level must rise at each comparison of a climb",
        "rising_steps": "comparisons in a row the loss level must rise by `rise`",
    }
    threshold_specs = {
        "update_ratio": POSITIVE,
        "update_at_once": POSITIVE,
        "loss_factor": greater_than(1.0),
        "loss_rise": greater_than(1.0),
        "ratio_with_loss": POSITIVE,
        "rise": greater_than(1.0),
        "rising_steps": whole_at_least(1),
    }
    window = 2
    fast = True

    def __init__(self, **thresholds: Any) -> None:
        super().__init__(**thresholds)
        self._memory = LossMemory()
        self._levels: deque[tuple[int, float]] = deque(maxlen=16)
        self._last: float | None = None  # the loss level at the previous monitored step

    def check(self, ctx: RuleContext) -> list[Condition] | None:
        stats = ctx.stats
        self._memory.see(stats)
        level = loss_level(stats)
        spaced = not self._levels or stats.step - self._levels[-1][0] >= _LEVEL_SPACING
        if level is not None and spaced:
            self._levels.append((stats.step, level))
        out: list[Condition] = []
        update = self._update(ctx)
        if update is not None:
            out.append(update)
        loss = self._loss(ctx, level, spaced)
        if loss is not None:
            out.append(loss)
        both = self._loss_with_updates(ctx, level)
        if both is not None:
            out.append(both)
        if level is not None:
            self._last = level
        if not out and level is None and not moving_ratios(ctx):
            return None
        return out

    def _update(self, ctx: RuleContext) -> Condition | None:
        ratios = moving_ratios(ctx)
        if not ratios:
            return None
        middle = median([r for _, r in ratios])
        if middle <= self.t("update_ratio"):
            return None
        names = [n for n, r in ratios if r > self.t("update_ratio")]
        at_once = middle > self.t("update_at_once")
        return Condition(
            key="update",
            layers=tuple(names),
            message=(
                f"one optimizer step changes the weights by {middle:.3g}x their size (median "
                f"|Δw|/|w| over {len(ratios)} weight layers; about 1e-3 is healthy), up to "
                f"{max(r for _, r in ratios):.3g}x in {format_layers(names)}: training is "
                "diverging"
            ),
            hint=f"Lower {lr_text(ctx.stats)}: try 3-10x lower, with a warm-up; clip "
            "gradients (torch.nn.utils.clip_grad_norm_).",
            evidence={
                "median_update_ratio": middle,
                "max_update_ratio": max(r for _, r in ratios),
                "layers_measured": len(ratios),
                **_lr_evidence(ctx),
            },
            score=math.log10(middle / self.t("update_ratio")) + 1.0,
            window=1 if at_once else None,
        )

    def _loss(self, ctx: RuleContext, level: float | None, spaced: bool) -> Condition | None:
        first = self._memory.first
        if level is None or first is None or first <= 0 or level <= 0:
            return None
        levels = [v for _, v in self._levels]
        rising = self._last is not None and level > self._last
        factor = level / first
        n = int(self.t("rising_steps"))
        climb = spaced and len(levels) > n and all(
            later > self.t("rise") * earlier
            for earlier, later in zip(levels[-n - 1 : -1], levels[-n:])
        )
        far = factor > self.t("loss_factor") and rising
        if not (far or climb):
            return None
        text = (
            f"the loss rose to {level:.3g}, {factor:.3g}x its first level ({first:.3g})"
            if far
            else f"the loss kept rising over the last {n} checks "
            f"({' -> '.join(f'{v:.3g}' for v in levels[-n - 1 :])})"
        )
        middle = None
        ratios = moving_ratios(ctx)
        if ratios:
            middle = median([r for _, r in ratios])
        return Condition(
            key="loss",
            layers=(),
            message=text
            + (
                f"; one step changes the weights by {middle:.2g}x their size"
                if middle is not None
                else ""
            )
            + ": training is diverging",
            hint=f"Lower {lr_text(ctx.stats)}: try 3-10x lower, with a warm-up; clip "
            "gradients (torch.nn.utils.clip_grad_norm_); check the data of the last steps "
            "if the loss rose with it.",
            evidence={
                "loss_level": level,
                "first_loss_level": first,
                "factor": factor,
                "levels": levels[-n - 1 :],
                **({"median_update_ratio": middle} if middle is not None else {}),
                **_lr_evidence(ctx),
            },
            score=math.log10(max(factor, 1.0)) + 1.0,
            # Orders of magnitude above where training started, or with steps that
            # rewrite the weights: at once. Otherwise it must last (a run resumed near
            # its floor meets harder data, and its loss level climbs for a while as the
            # new losses fill the median).
            window=1
            if climb
            or factor > 10 * self.t("loss_factor")
            or (middle is not None and middle > self.t("ratio_with_loss"))
            else 3,
        )

    def _loss_with_updates(self, ctx: RuleContext, level: float | None) -> Condition | None:
        """The loss climbing well above its best while every step rewrites a sizeable part
        of the weights: the steps are too large (a data change or a restart of the
        schedule raises the loss too, but not with such steps)."""
        lowest = self._memory.lowest
        if level is None or lowest is None or lowest <= 0 or self._last is None:
            return None
        if level <= self.t("loss_rise") * lowest or level <= self._last:
            return None
        ratios = moving_ratios(ctx)
        if not ratios:
            return None
        middle = median([r for _, r in ratios])
        if middle <= self.t("ratio_with_loss"):
            return None
        names = [n for n, r in ratios if r > self.t("ratio_with_loss")]
        return Condition(
            key="loss-and-update",
            layers=tuple(names),
            message=(
                f"the loss rose to {level:.3g}, {level / lowest:.3g}x its lowest level "
                f"({lowest:.3g}), while each optimizer step changes the weights by "
                f"{middle:.2g}x their size (median |Δw|/|w| over {len(ratios)} weight "
                "layers; about 1e-3 is healthy): training is diverging"
            ),
            hint=f"Lower {lr_text(ctx.stats)}: try 3-10x lower, with a warm-up; clip "
            "gradients (torch.nn.utils.clip_grad_norm_).",
            evidence={
                "loss_level": level,
                "lowest_loss_level": lowest,
                "median_update_ratio": middle,
                **_lr_evidence(ctx),
            },
            score=math.log10(level / lowest),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self._memory.state(), "levels": [list(x) for x in self._levels]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._memory.load(state.get("memory", {}))
        self._levels.clear()
        self._levels.extend((int(s), float(v)) for s, v in state.get("levels", []))


def _lr_evidence(ctx: RuleContext) -> dict[str, Any]:
    info = ctx.stats.optimizer
    return {"optimizer": info.name, "lr": info.lr} if info is not None else {}
