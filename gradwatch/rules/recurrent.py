"""Exploding gradients through time: what GW102 reads in recurrent layers, and the hints
that speak of time steps.

Backpropagation through time multiplies the gradient by the hidden-to-hidden Jacobian
once per time step, so a recurrent weight matrix whose gain is above 1 (a large
``weight_hh`` init, an lr that inflated it) makes the gradient of early time steps grow
geometrically with the sequence length. The ``weight_hh`` gradient sums one term per
time step, each the gradient reaching that step times the hidden state before it. The
hidden state is bounded (tanh) like the input of the layers after the recurrent one, so
without growth through time that sum stays within a few times the later layers'
gradient (healthy RNN/LSTM/GRU classifiers measure 0.005-2x); two orders of magnitude
above it is the gradient of distant time steps blowing up.
"""

from __future__ import annotations

import math

from ..kinds import RECURRENT
from ..stats import LayerStats
from .base import Condition, RuleContext, format_layers, matrix_layers, median

#: Module classes of vanilla (ungated) recurrent layers, for which a gated one is a cure.
VANILLA_CLASSES = ("RNN", "RNNCell")


def recurrent_gradient(layer: LayerStats) -> float | None:
    """The gradient RMS of a recurrent layer's hidden-to-hidden weights (its whole gradient
    where they were not read apart)."""
    return layer.hh_grad_rms if layer.hh_grad_rms is not None else layer.grad_rms


def time_step_hint(ctx: RuleContext, names: list[str]) -> str:
    """What to do about a gradient that explodes through the time steps of ``names``."""
    gated = (
        " Use nn.LSTM or nn.GRU instead of a vanilla nn.RNN: their gates keep the gradient "
        "through time from multiplying up."
        if ctx.model.uses(*VANILLA_CLASSES)
        else ""
    )
    return (
        f"Backpropagation through time multiplies the gradient by {format_layers(names)}'s "
        "hidden-to-hidden weights once per time step. Clip gradients "
        "(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) before optimizer.step(); "
        "gradient_clip_val in Lightning, max_grad_norm in Hugging Face TrainingArguments). "
        "Initialise weight_hh orthogonally (nn.init.orthogonal_) or as a scaled identity "
        "with a gain of at most 1." + gated + " Backpropagate through fewer time steps "
        "(truncated BPTT: shorter sequences, or detach the hidden state every k steps)."
    )


def has_recurrent(ctx: RuleContext, names: list[str] | tuple[str, ...]) -> bool:
    """True when any of the named modules is a recurrent layer."""
    layers = ctx.stats.layers
    return any(name in layers and layers[name].kind == RECURRENT for name in names)


def through_time(ctx: RuleContext, factor: float) -> Condition | None:
    """A recurrent layer whose hidden-to-hidden gradient RMS is more than ``factor`` times
    the median gradient RMS of the weight layers after it (forward order)."""
    layers = matrix_layers(ctx.stats)
    flagged: list[tuple[float, LayerStats, float, float]] = []
    for position, layer in enumerate(layers):
        if layer.kind != RECURRENT:
            continue
        mine = recurrent_gradient(layer)
        later = [
            value
            for s in layers[position + 1 :]
            if (value := recurrent_gradient(s) if s.kind == RECURRENT else s.grad_rms)
        ]
        if mine is None or not later or not math.isfinite(mine):
            continue
        reference = median(later)
        if reference > 0 and mine > factor * reference:
            flagged.append((mine / reference, layer, mine, reference))
    if not flagged:
        return None
    flagged.sort(key=lambda item: -item[0])
    worst, layer, mine, reference = flagged[0]
    names = [item[1].name for item in flagged]
    which = "hidden-to-hidden (weight_hh) " if layer.hh_grad_rms is not None else ""
    evidence: dict[str, object] = {
        "growth": worst,
        "recurrent_grad_rms": mine,
        "later_layers_grad_rms": reference,
        "measure": "weight_hh gradient RMS" if layer.hh_grad_rms is not None else "gradient RMS",
    }
    if layer.ih_grad_rms is not None:
        evidence["ih_grad_rms"] = layer.ih_grad_rms
    return Condition(
        key="time",
        layers=tuple(names),
        message=(
            f"the {which}gradient of {format_layers(names)} is {worst:.3g}x that of the "
            f"layers after it ({reference:.2g} -> {mine:.2g} RMS): the gradient explodes "
            "through the time steps"
        ),
        hint=time_step_hint(ctx, names),
        evidence=evidence,
        score=math.log10(worst),
    )
