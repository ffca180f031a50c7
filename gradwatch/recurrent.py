"""Recurrent layers (RNN, LSTM, GRU and their cells): what sets them apart for gradwatch.

A recurrent layer applies the same two weight matrices at every time step: input-to-hidden
(``weight_ih*``) and hidden-to-hidden (``weight_hh*``). Backpropagation through time
multiplies the gradient by the hidden-to-hidden Jacobian once per step, so an explosion
through time shows first and most in ``weight_hh``; and because the hidden state is
bounded (tanh) like the input of the layer after it, the ``weight_hh`` gradient per input
unit (``|dW_hh| / sqrt(columns)``) compares fairly with that layer's, whatever the scale
of the data and however many outputs that layer has (a language model's vocabulary).

Their outputs are tuples (the output sequence, or a ``PackedSequence``, and the final
state ``h_n`` / ``(h_n, c_n)``); a classifier often reads only the final state, so the
gradient flowing back into the layer's output is the gradient reaching any of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .kinds import RECURRENT
from .stats import LayerStats

HIDDEN_TO_HIDDEN = "weight_hh"
INPUT_TO_HIDDEN = "weight_ih"


def floating_tensors(output: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor of a module output, in order (a ``PackedSequence``
    gives its data).

    >>> out = (torch.zeros(2, 3), (torch.ones(1, 3), torch.ones(1, 3)))
    >>> [tuple(t.shape) for t in floating_tensors(out)]
    [(2, 3), (1, 3), (1, 3)]
    """
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
        return
    if isinstance(output, (tuple, list)):
        for item in output:
            yield from floating_tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from floating_tensors(item)


def state_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors of a recurrent layer's output after the first (its final state), that
    a gradient can reach."""
    tensors = list(floating_tensors(output))[1:]
    return [t for t in tensors if t.requires_grad]


def split_gradients(
    slots: Sequence[Any],
    sumsq: Sequence[float],
    kinds: Mapping[int, str],
    stats: Mapping[int, LayerStats],
) -> None:
    """Fill ``hh_grad_rms``, ``hh_grad_per_input`` and ``ih_grad_rms`` of recurrent layers
    from the squared gradient norm of each of ``slots`` (``sumsq``, in slot order)."""
    sums: dict[tuple[int, str], list[float]] = {}  # squared norm, elements, input columns
    for slot, squared in zip(slots, sumsq):
        if kinds.get(slot.layer) != RECURRENT:
            continue
        for prefix in (HIDDEN_TO_HIDDEN, INPUT_TO_HIDDEN):
            if slot.name.startswith(prefix):
                total = sums.setdefault((slot.layer, prefix), [0.0, 0.0, 0.0])
                total[0] += squared
                total[1] += slot.numel
                total[2] += slot.param.shape[-1] if slot.param.dim() >= 2 else 1
    for (index, prefix), (sumsq, numel, columns) in sums.items():
        layer = stats.get(index)
        if layer is None or not numel:
            continue
        if prefix == HIDDEN_TO_HIDDEN:
            layer.hh_grad_rms = _root(sumsq / numel)
            layer.hh_grad_per_input = _root(sumsq / columns)
        else:
            layer.ih_grad_rms = _root(sumsq / numel)


def _root(value: float) -> float:
    return math.sqrt(value) if value >= 0 else value  # NaN stays NaN
