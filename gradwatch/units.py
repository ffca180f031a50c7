"""Which weight layer feeds which ReLU: the unit groups that dead-unit detection reads."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from .kinds import RECURRENT, RELU, SATURATING_KINDS, UNIT_ROW_KINDS
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
    return list(shared_groups(stats))


def shared_groups(stats: StepStats) -> tuple[UnitGroup, ...]:
    """:func:`unit_groups`, as the tuple shared by every step with the same layers."""
    cached = stats.__dict__.get("_unit_groups")
    if cached is not None:
        return cached
    ordered = stats.by_depth()
    # The pairing depends only on the layers' names, kinds, order and sizes, which stay
    # the same from step to step: the groups are worked out once and shared by the steps
    # (the history then holds one set of groups, not one per step for the garbage
    # collector to walk).
    key = (
        tuple(map(_STRUCTURE, ordered)),
        tuple(None if m is None else m.size for m in map(_ACTIVE, ordered)),
    )
    shared = _SHARED_GROUPS.get(key)
    if shared is None:
        if len(_SHARED_GROUPS) >= _SHARED_LIMIT:
            _SHARED_GROUPS.clear()
            _SAME_GROUPS.clear()
        groups = tuple(_pair(ordered))
        # Keys that differ only where it does not change the pairing (a ReLU measured at
        # one step and not at the next) get the very same tuple: the per-step tables of
        # alive units (alive_table) are then known to be complete by identity.
        shared = _SHARED_GROUPS[key] = _SAME_GROUPS.setdefault(groups, groups)
    stats.__dict__["_unit_groups"] = shared
    return shared


#: Unit groups of the layer structures seen lately (a few: several watchers, a model that
#: changes), keyed by what the pairing reads.
_SHARED_GROUPS: dict[tuple, tuple[UnitGroup, ...]] = {}
_SAME_GROUPS: dict[tuple[UnitGroup, ...], tuple[UnitGroup, ...]] = {}
_SHARED_LIMIT = 8


def _pair(ordered: list[LayerStats]) -> list[UnitGroup]:
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
        if layer.kind == RECURRENT:
            last_producer = None  # a ReLU after it reads the recurrent layer's output
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
    if weights:
        claimed.add(weights[-1])  # the output layer's rows are the model's outputs
    for layer in ordered:
        if layer.kind in UNIT_ROW_KINDS and layer.name not in claimed:
            groups.append(UnitGroup(layer.name, None, layer.depth or 0.0))
    return sorted(groups, key=lambda g: g.depth)


_ACTIVATIONS = (RELU, *SATURATING_KINDS)
#: what :func:`_pair` reads of each layer (read in C: this runs at every step)
_STRUCTURE = attrgetter("name", "kind", "depth", "units")
_ACTIVE = attrgetter("active_units")


def _next_activation(ordered: list[LayerStats], position: int) -> LayerStats | None:
    for later in range(position + 1, len(ordered)):  # no slice: that copies the tail
        layer = ordered[later]
        if layer.kind in _ACTIVATIONS:
            return layer
        if layer.kind in UNIT_ROW_KINDS:
            return None
    return None


def alive_bits(group: UnitGroup, stats: StepStats) -> tuple[int, int, str] | None:
    """Units of a group seen alive at one step, as plain numbers: (bits of the alive
    units, units, how seen); None if unknown.

    In order of preference: the ReLU module's output (> 0 somewhere); the producer's
    non-zero gradient rows; and where no gradient reaches the producer at all, its
    pre-activations (a unit never positive is dead behind a ReLU, and a layer of such
    units blocks every gradient, which is why the rows show nothing).

    Asked about every group at every step, by several rules and about the last few steps,
    so worked out once per group and step. Kept as a tuple of plain numbers, which the
    garbage collector stops walking (a mask object per group and step, kept with the
    history, made every collection walk them all)."""
    memo = _alive_memo(stats)
    key = (group.producer, group.activation)  # cheaper to hash than the dataclass
    found = memo.get(key, _UNSEEN)
    if found is _UNSEEN:
        found = memo[key] = _alive(group, stats)
    return found


_UNSEEN = object()


def _alive_memo(stats: StepStats) -> dict[tuple[str | None, str | None], tuple | None]:
    """What :func:`alive_bits` worked out at this step, by (producer, activation)."""
    memo = stats.__dict__.get("_alive_bits")
    if memo is None:
        memo = stats.__dict__["_alive_bits"] = {}
    return memo


def dead_share_of(seen: tuple[int, int, str] | None) -> float | None:
    """Share of dead units from :func:`alive_bits`'s answer (None when not seen).

    >>> dead_share_of((0b0111, 4, "activations")), dead_share_of(None)
    (0.25, None)
    """
    if seen is None or not seen[1]:
        return None
    return 1.0 - seen[0].bit_count() / seen[1]


def alive_table(
    stats: StepStats, groups: tuple[UnitGroup, ...]
) -> dict[tuple[str | None, str | None], tuple[int, int, str] | None]:
    """:func:`alive_bits` of each of ``groups`` (a :func:`shared_groups` tuple) at one
    step, keyed by (producer, activation): for the rules that read every group at each
    of the last steps, a dictionary look-up each instead of a call."""
    memo = _alive_memo(stats)
    if stats.__dict__.get("_alive_for") is not groups:  # filled for these groups once
        for group in groups:
            key = (group.producer, group.activation)
            if key not in memo:
                memo[key] = _alive(group, stats)
        stats.__dict__["_alive_for"] = groups
    return memo


def _alive(group: UnitGroup, stats: StepStats) -> tuple[int, int, str] | None:
    if group.activation is not None:
        act = stats.layers.get(group.activation)
        if act is not None and act.active_units is not None:
            return act.active_units.bits, act.active_units.size, "activations"
    if group.producer is None:
        return None
    producer = stats.layers.get(group.producer)
    if producer is None or producer.grad_norm is None:
        return None
    if producer.grad_norm > 0 and producer.zero_grad_units is not None:
        zero = producer.zero_grad_units  # its complement: the rows that got a gradient
        return ~zero.bits & ((1 << zero.size) - 1), zero.size, "weight-gradient rows"
    if producer.grad_norm == 0 and producer.positive_units is not None:
        return producer.positive_units.bits, producer.positive_units.size, "pre-activations"
    return None


def dead_fraction(group: UnitGroup, stats: StepStats) -> float | None:
    """Share of the group's units seen dead at one step (None when not seen)."""
    return dead_share_of(alive_bits(group, stats))


def dead_share(steps: list[StepStats]) -> dict[UnitGroup, float]:
    """Each group's share of dead units as last seen: at the most recent of ``steps``
    (newest last) that shows its units (between detail steps, a blocked layer may be
    visible only at the last detail step)."""
    if not steps:
        return {}
    # Asked by several rules at each step, about the same recent steps: worked out once.
    # (Keyed by the steps' ids, not the steps: a step holding its predecessors would keep
    # the whole history alive.)
    memo = steps[-1].__dict__.setdefault("_dead_share", {})
    key = tuple(map(id, steps))
    found = memo.get(key)
    if found is None:
        found = memo[key] = _dead_share(steps)
    return dict(found)


def _dead_share(steps: list[StepStats]) -> dict[UnitGroup, float]:
    out = {}
    groups = shared_groups(steps[-1])
    tables = [alive_table(stats, groups) for stats in reversed(steps)]
    for group in groups:
        key = (group.producer, group.activation)
        for table in tables:
            share = dead_share_of(table[key])
            if share is not None:
                out[group] = share
                break
    return out


def recent_blockers(steps: list[StepStats]) -> list[UnitGroup]:
    """Groups whose units are all dead as last seen: no gradient passes them."""
    return [group for group, share in dead_share(steps).items() if share >= 1.0]


def mostly_dead(steps: list[StepStats], share: float = 0.5) -> list[str]:
    """Names of the groups with more than ``share`` of their units dead, as last seen."""
    return [group.name for group, dead in dead_share(steps).items() if dead > share]
