"""The depth profile that the vanishing and exploding rules compare: one number per
weight layer, in forward order, plus the facts their hints are built from."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..kinds import RELU
from ..stats import LayerStats, OptimizerInfo, StepStats
from .base import RuleContext, edge_size, matrix_layers, median

#: float32 has 24 significant bits: an update below 2**-24 of a weight leaves it unchanged.
FLOAT32_RESOLUTION = 2.0**-24
#: PyTorch's default Linear/Conv init has gain 1/sqrt(3) ~ 0.58; He init for ReLU sqrt(2).
HE_GAIN = math.sqrt(2.0)
#: ... and what tanh needs to keep the signal's scale (nn.init.calculate_gain("tanh")).
TANH_GAIN = 5.0 / 3.0


@dataclass
class Profile:
    layers: list[LayerStats]
    values: list[float]  # what is compared (gradient RMS, or Adam's relative step size)
    early: float
    late: float
    k: int

    @property
    def ratio(self) -> float:
        if self.late <= 0:
            return math.inf if self.early > 0 else 1.0
        return self.early / self.late

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.layers]


def effective_speed(rms: float, optimizer: OptimizerInfo | None) -> float:
    """How fast a layer with this gradient RMS learns, relative to its peers.

    Plain SGD moves weights in proportion to the gradient. Adam-like optimizers divide
    by the gradient's own running scale, so every layer steps at about ``lr`` until the
    gradient falls towards ``eps``: then the step shrinks by ``rms / (rms + eps)``.
    """
    if optimizer is not None and optimizer.adaptive and optimizer.eps:
        return rms / (rms + optimizer.eps)
    return rms


def build_profile(
    layers: Sequence[LayerStats], values: Sequence[float], min_layers: int
) -> Profile | None:
    if len(layers) < min_layers or any(not math.isfinite(v) for v in values):
        return None
    k = edge_size(len(layers))
    return Profile(list(layers), list(values), median(values[:k]), median(values[-k:]), k)


def gradient_profile(stats: StepStats, min_layers: int) -> Profile | None:
    """Gradient RMS of each weight layer, as the optimizer will feel it."""
    layers = [s for s in matrix_layers(stats) if s.grad_rms is not None]
    values = [effective_speed(s.grad_rms or 0.0, stats.optimizer) for s in layers]
    return build_profile(layers, values, min_layers)


def signal_profile(stats: StepStats, min_layers: int) -> Profile | None:
    """RMS of the gradient with respect to each weight layer's output: the backward
    signal itself, independent of the scale of each layer's input."""
    layers = [s for s in matrix_layers(stats) if s.output_grad_rms is not None]
    values = [s.output_grad_rms or 0.0 for s in layers]
    return build_profile(layers, values, min_layers)


def latest_param_rms(ctx: RuleContext, name: str) -> float | None:
    """Parameter RMS of a layer as last measured (carried over between detail steps)."""
    layer = ctx.stats.layers.get(name)
    return layer.param_rms if layer is not None else None


def init_gain(ctx: RuleContext, layers: Sequence[LayerStats]) -> float | None:
    """Median of param_rms * sqrt(fan_in) over Linear/Conv layers: 1.41 for He init,
    ~1 for Xavier on square layers, 0.58 for PyTorch's default."""
    gains = []
    for layer in layers:
        rms = latest_param_rms(ctx, layer.name)
        if rms is not None and layer.fan_in:
            gains.append(rms * math.sqrt(layer.fan_in))
    return median(gains) if gains else None


def activation_names(stats: StepStats, kinds: Sequence[str]) -> list[str]:
    return [s.name for s in stats.by_depth() if s.kind in kinds]


def has_relu(ctx: RuleContext) -> bool:
    return bool(activation_names(ctx.stats, (RELU,))) or ctx.model.uses("ReLU", "ReLU6")
