"""The kinds of module gradwatch tells apart, as plain strings.

Kinds decide which statistics a module gets and how the rules read them. They live
here, apart from :mod:`gradwatch.layers` (which classifies ``nn.Module``\\ s and needs
torch), so that rule metadata, the ``gradwatch rules``/``explain`` commands and record
reading work without importing torch.

>>> LINEAR in UNIT_ROW_KINDS, SIGMOID in SATURATING_KINDS
(True, True)
"""

from __future__ import annotations

LINEAR = "linear"
CONV = "conv"
EMBEDDING = "embedding"
NORM = "norm"
ATTENTION = "attention"
#: RNN/LSTM/GRU and their cells: weight matrices applied at every time step (input-to-
#: hidden ``weight_ih*`` and hidden-to-hidden ``weight_hh*``); their gate rows are not
#: units that can die, and their tanh/sigmoid run inside one kernel, out of a hook's sight.
RECURRENT = "recurrent"
RELU = "relu"  # hard-gated: zero derivative where inactive, so units can die
SIGMOID = "sigmoid"
TANH = "tanh"
ACTIVATION = "activation"  # LeakyReLU, GELU, SiLU, ...: the gradient always flows
OTHER = "other"

#: Kinds whose weight rows are output units (a zero row means a unit got no gradient).
UNIT_ROW_KINDS = (LINEAR, CONV)
#: Kinds whose weight gradients carry the depth profile (dense, input-independent layout).
MATRIX_KINDS = (LINEAR, CONV, ATTENTION, RECURRENT)
SATURATING_KINDS = (SIGMOID, TANH)

__all__ = [
    "ACTIVATION",
    "ATTENTION",
    "CONV",
    "EMBEDDING",
    "LINEAR",
    "MATRIX_KINDS",
    "NORM",
    "OTHER",
    "RECURRENT",
    "RELU",
    "SATURATING_KINDS",
    "SIGMOID",
    "TANH",
    "UNIT_ROW_KINDS",
]
