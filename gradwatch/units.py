"""Which weight layer feeds which ReLU: the unit groups that dead-unit detection reads."""

from __future__ import annotations

from dataclasses import dataclass

from .layers import RELU, SATURATING_KINDS, UNIT_ROW_KINDS
from .stats import LayerStats, StepStats


@dataclass(frozen=True)
class UnitGroup:
    """One layer of units: the Linear/Conv that produces them and/or the ReLU after it."""

    producer: str | None
    activation: str | None
    depth: float

    @property
    def name(self) -> str:
        return self.producer if self.producer is not None else self.activation or ""


def unit_groups(stats: StepStats) -> list[UnitGroup]:
    """Pair each ReLU module with the Linear/Conv that feeds it (nearest before it in
    forward order, same number of units, norms in between allowed). Weight layers
    without a ReLU module are kept (they may feed a functional F.relu) unless a
    sigmoid/tanh follows them or they are the output layer."""
    ordered = stats.by_depth()
    groups: list[UnitGroup] = []
    claimed: set[str] = set()
    last_producer: LayerStats | None = None
    for position, layer in enumerate(ordered):
        if layer.kind in UNIT_ROW_KINDS:
            last_producer = layer
            follower = _next_activation(ordered, position)
            if follower is not None and follower.kind in SATURATING_KINDS:
                claimed.add(layer.name)  # saturation is GW202's business
            continue
        if layer.kind != RELU:
            continue
        size = layer.active_units.size if layer.active_units is not None else None
        producer = None
        if (
            last_producer is not None
            and last_producer.name not in claimed
            and (size is None or last_producer.units is None or last_producer.units == size)
        ):
            producer = last_producer.name
            claimed.add(producer)
        groups.append(UnitGroup(producer, layer.name, layer.depth or 0.0))
    weights = [s.name for s in ordered if s.kind in UNIT_ROW_KINDS]
    output_layer = weights[-1] if weights else None
    for layer in ordered:
        if layer.kind in UNIT_ROW_KINDS and layer.name not in claimed:
            if layer.name != output_layer:  # its rows are the model's outputs
                groups.append(UnitGroup(layer.name, None, layer.depth or 0.0))
    return sorted(groups, key=lambda g: g.depth)


def _next_activation(ordered: list[LayerStats], position: int) -> LayerStats | None:
    for layer in ordered[position + 1 :]:
        if layer.kind in (RELU, *SATURATING_KINDS):
            return layer
        if layer.kind in UNIT_ROW_KINDS:
            return None
    return None
