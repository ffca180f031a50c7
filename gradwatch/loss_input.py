"""What reached a loss function at a monitored step, as the host reads it back (see
:mod:`gradwatch.loss_contract` for how it is measured). Plain Python: the rules that judge
it must not need torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Losses over a class axis: they expect logits (cross_entropy) or log-probabilities (nll_loss).
CLASS_LOSSES = ("cross_entropy", "nll_loss")
#: Losses over independent outputs: probabilities (binary_cross_entropy) or logits (with_logits).
BINARY_LOSSES = ("binary_cross_entropy", "binary_cross_entropy_with_logits")
#: The statistics measured per call, in the order they travel.
VALUES = (
    "probability_rows",
    "log_probability_rows",
    "unit_interval",
    "saturated",
    "wrong_saturated",
    "non_negative",
    "dead_columns",
    "zeros",
)


@dataclass(frozen=True)
class LossInput:
    """One loss call of a monitored step and what its input looked like.

    ``function`` is the torch.nn.functional name (``nn.CrossEntropyLoss`` calls
    ``cross_entropy``); ``producer`` the innermost module of the model whose output is the
    loss's input (``None`` when the input was made after the model returned, e.g. by a
    functional softmax in the training step); ``last_layer`` the last module with parameters
    that ran before the loss; ``via`` the last operation that made the input (``"softmax"``,
    ``"sigmoid"``, ``"relu"``, ``"log_softmax"``, ... or ``""``: a weight layer or unknown).
    Shares are of the rows (class losses: rows along the class axis) or of the values
    (binary losses) that were checked (at most a few thousand, spread over the batch).

    >>> x = LossInput("cross_entropy", "3", "2", "softmax", classes=10, rows=64,
    ...               probability_rows=1.0)
    >>> x.expects_logits, x.producer_text
    (True, '3 (after 2)')
    """

    function: str
    producer: str | None
    last_layer: str | None
    via: str
    classes: int
    rows: int
    #: class losses: rows that are >= 0 and sum to 1 (probabilities)
    probability_rows: float = 0.0
    #: class losses: rows that are <= 0 and whose exp sums to at most 1 (log-probabilities)
    log_probability_rows: float = 0.0
    #: binary losses: values in [0, 1]
    unit_interval: float = 0.0
    #: binary losses: values exactly 0.0 or 1.0
    saturated: float = 0.0
    #: binary_cross_entropy: values exactly 0.0 or 1.0 with the target on the other side
    wrong_saturated: float = 0.0
    #: every value checked is >= 0 (1.0) or not (0.0)
    non_negative: float = 0.0
    #: columns (classes; outputs of a with-logits loss) exactly 0 in every row checked
    dead_columns: int = 0
    #: values exactly 0.0
    zeros: float = 0.0

    @property
    def expects_logits(self) -> bool:
        return self.function in ("cross_entropy", "binary_cross_entropy_with_logits")

    @property
    def layers(self) -> tuple[str, ...]:
        """The modules to name in a finding: the last weight layer, then the module whose
        output reached the loss (when it is another one)."""
        names = [n for n in (self.last_layer, self.producer) if n is not None]
        return tuple(dict.fromkeys(names))

    @property
    def producer_text(self) -> str:
        """The producing module in words, e.g. ``"3 (after 2)"`` or ``"the model's output"``."""
        producer = self.producer
        if producer is None:
            if self.last_layer is not None:
                return f"the output of {self.last_layer or '<root>'}"
            return "the model's output"
        shown = producer or "the model's forward"
        if self.last_layer is not None and self.last_layer != producer:
            return f"{shown} (after {self.last_layer or '<root>'})"
        return shown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossInput:
        return cls(**data)
