"""What the rules about the update share: which layers the optimizer moved, how far, and
where the loss stands (GW102, GW105, GW106, GW109)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..stats import LayerStats, StepStats
from .base import RuleContext, matrix_layers, median

#: A step of this size relative to the weights is far (1,000x) above float32's resolution:
#: a layer expected to move this much that did not move at all is not being updated.
VISIBLE_STEP = 1e3 * 2.0**-24


def not_updated_by_optimizer(layer: LayerStats) -> list[str]:
    """The layer's parameters that get a gradient but that the optimizer does not update
    (``"name (reason)"``)."""
    if not layer.not_updated or not layer.grad_norm:
        return []
    missing = set(layer.missing_grad)
    return [entry for entry in layer.not_updated if entry.split(" ", 1)[0] not in missing]


def stuck_layers(ctx: RuleContext) -> set[str]:
    """Layers whose gradients are not turned into updates: every parameter with a gradient
    is outside the optimizer (or in a group at lr 0), or the measured update is exactly
    zero while other layers moved. Their gradients pile up when ``zero_grad()`` only
    clears the optimizer's own parameters: a growing gradient there is not an explosion."""
    stats = ctx.stats
    cached = stats.__dict__.get("_stuck")
    if cached is not None:
        return cached
    stuck: set[str] = set()
    per_gradient: list[float] = []  # how far a step moved a layer per unit of gradient
    still: list[LayerStats] = []
    for layer in stats:
        ratio = layer.update_ratio
        if ratio and math.isfinite(ratio) and layer.grad_rms and layer.param_rms:
            per_gradient.append(ratio * layer.param_rms / layer.grad_rms)
        if not layer.grad_norm or ratio:
            continue
        # Left out by the optimizer, and nothing else in the layer moved (a layer whose
        # bias alone is left out still moves: its weight's gradient is used).
        if not_updated_by_optimizer(layer):
            stuck.add(layer.name)
        elif ratio == 0.0 and layer.grad_rms and layer.param_rms:
            still.append(layer)
    if still and per_gradient:
        scale = median(per_gradient)
        earlier = ctx.recent(16)[:-1]
        for layer in still:
            # A zero update is a mistake only where the step that the optimizer gave the
            # other layers per unit of gradient would have moved this one visibly: a
            # gradient too small for the weights' float precision leaves them unchanged
            # too ("w = w - 0"; GW101's case), and so does clipping that scales it down.
            expected = scale * (layer.grad_rms or 0.0) / (layer.param_rms or 1.0)
            if expected < VISIBLE_STEP:
                continue
            # The update measured is the previous step's: a module that skipped a recent
            # step (an expert the router did not pick, a branch not taken) may have
            # skipped that one too.
            if any(not _grad_norm(step, layer.name) for step in earlier):
                continue
            stuck.add(layer.name)
    stats.__dict__["_stuck"] = stuck
    return stuck


def _grad_norm(stats: StepStats, name: str) -> float | None:
    layer = stats.layers.get(name)
    return layer.grad_norm if layer is not None else None


def moving_ratios(ctx: RuleContext) -> list[tuple[str, float]]:
    """(layer, update ratio) of the weight layers whose update was measured, with weights
    of their own (a zero-initialised layer has no size to compare with) and updated by
    the optimizer, in forward order."""
    cached = ctx.stats.__dict__.get("_moving")
    if cached is not None:
        return cached
    stuck = stuck_layers(ctx)
    ctx.stats.__dict__["_moving"] = moving = [
        (s.name, s.update_ratio)
        for s in matrix_layers(ctx.stats)
        if s.update_ratio is not None and math.isfinite(s.update_ratio) and s.name not in stuck
    ]
    return moving


def loss_level(stats: StepStats) -> float | None:
    """The loss as the rules judge it: the median over the last steps when it was passed
    every step, else this step's value."""
    level = stats.recent_loss if stats.recent_loss is not None else stats.loss
    if level is None or not math.isfinite(level):
        return None
    return float(level)


def lr_text(stats: StepStats) -> str:
    """The optimizer and its learning rate as the user set them, for a hint."""
    info = stats.optimizer
    if info is None:
        return "the learning rate (pass optimizer= to gradwatch to see it here)"
    return f"{info.name}'s learning rate (lr={info.lr:g} now)"


class LossMemory:
    """The first loss level of the run and the highest learning rate seen, remembered by
    a rule (and saved in its checkpoint state)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.lowest: float | None = None
        self.top_lr: float | None = None

    def see(self, stats: StepStats) -> None:
        level = loss_level(stats)
        if self.first is None and level is not None:
            self.first = level
        if level is not None and (self.lowest is None or level < self.lowest):
            self.lowest = level
        info = stats.optimizer
        if info is not None and math.isfinite(info.lr):
            self.top_lr = info.lr if self.top_lr is None else max(self.top_lr, info.lr)

    def state(self) -> dict[str, Any]:
        return {"first": self.first, "lowest": self.lowest, "top_lr": self.top_lr}

    def load(self, state: Mapping[str, Any]) -> None:
        self.first = state.get("first")
        self.lowest = state.get("lowest")
        self.top_lr = state.get("top_lr")
