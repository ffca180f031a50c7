"""Exploding gradients through time: what GW102 reads in recurrent layers, and the hints
that speak of time steps.

Backpropagation through time multiplies the gradient by the hidden-to-hidden Jacobian
once per time step, so a recurrent weight matrix whose gain is above 1 (a large
``weight_hh`` init, an lr that inflated it) makes the gradient of early time steps grow
geometrically with the sequence length. The ``weight_hh`` gradient sums one term per
time step, each the gradient reaching that step times the hidden state before it. The
hidden state is bounded (tanh) like the input of the layers after the recurrent one, so
per input unit (the norm of a weight gradient over the square root of its columns: the
gradient arriving at all of a layer's outputs, times its typical input) that sum stays
within a few times the later layers' without growth through time. Healthy RNN, LSTM and
GRU classifiers and language models measure 0.02-5x; two orders of magnitude above it
is the gradient of distant time steps blowing up. (Per element, the RMS, would divide a
wide head, a vocabulary of 30,000 outputs, by its width, and a healthy LSTM language
model would look 7x above its head.)
"""

from __future__ import annotations

import math

from ..kinds import RECURRENT
from ..stats import LayerStats
from .base import Condition, RuleContext, format_layers, matrix_layers, median

#: Module classes of vanilla (ungated) recurrent layers, for which a gated one is a cure.
VANILLA_CLASSES = ("RNN", "RNNCell")


def per_input_gradient(layer: LayerStats) -> float | None:
    """A layer's weight gradient norm per input unit: for a recurrent layer, of its
    hidden-to-hidden matrices; for a Linear/Conv layer, of its weights (and bias) over
    the square root of its fan-in. None where neither is known.

    >>> per_input_gradient(LayerStats("head", "linear", grad_norm=8.0, fan_in=16))
    2.0
    >>> per_input_gradient(LayerStats("rnn", "recurrent", hh_grad_per_input=0.5))
    0.5
    """
    if layer.kind == RECURRENT:
        return layer.hh_grad_per_input
    if layer.fan_in and layer.grad_norm is not None:
        return layer.grad_norm / math.sqrt(layer.fan_in)
    return None


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
    """A recurrent layer whose hidden-to-hidden gradient per input unit is more than
    ``factor`` times the median of the weight layers after it (forward order)."""
    layers = matrix_layers(ctx.stats)
    flagged: list[tuple[float, LayerStats, float, float]] = []
    for position, layer in enumerate(layers):
        if layer.kind != RECURRENT:
            continue
        mine = per_input_gradient(layer)
        later = [v for s in layers[position + 1 :] if (v := per_input_gradient(s))]
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
    evidence: dict[str, object] = {
        "growth": worst,
        "hh_grad_per_input": mine,
        "later_layers_grad_per_input": reference,
        "hh_grad_rms": layer.hh_grad_rms,
        "ih_grad_rms": layer.ih_grad_rms,
    }
    return Condition(
        key="time",
        layers=tuple(names),
        message=(
            f"the hidden-to-hidden (weight_hh) gradient of {format_layers(names)} is "
            f"{worst:.3g}x that of the layers after it, per input unit ({reference:.2g} -> "
            f"{mine:.2g}): the gradient explodes through the time steps"
        ),
        hint=time_step_hint(ctx, names),
        evidence=evidence,
        score=math.log10(worst),
    )
