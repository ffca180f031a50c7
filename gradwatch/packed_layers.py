"""The layers of an older monitored step, kept in a form the garbage collector skips.

Every :class:`~gradwatch.stats.LayerStats` kept in the history is an object Python's
cyclic garbage collector tracks, and a full collection walks every tracked object: 256
steps of a 400-layer model are 200,000 of them, a ~200 ms pause every few dozen
monitored steps. The rules read the layers of the last few steps only (at most 24 with
their default thresholds); older steps are read for their step-wide fields (the global
gradient norm, the loss scale). So once a step is older than that, its layers are kept
as plain tuples of numbers and strings, which CPython stops tracking once a collection
has seen them, and a :class:`~gradwatch.stats.LayerStats` is rebuilt, equal field by
field, for whoever reads one (a custom rule going further back, ``watcher.history``).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Mapping
from dataclasses import fields

from .stats import LayerStats, UnitMask  # noqa: F401  (UnitMask: doctest)

_MASK_FIELDS = ("zero_grad_units", "active_units", "positive_units")
#: the fields of a LayerStats that hold plain numbers, strings or tuples of strings
_PLAIN = tuple(f.name for f in fields(LayerStats) if f.name not in _MASK_FIELDS)
#: all of them read in one C-level call: packing a step is a few C loops over its layers
#: (a Python loop per layer would cost as much as the collections it saves)
_plain_of = operator.attrgetter(*_PLAIN)
_MASK_GETTERS = tuple(operator.attrgetter(name) for name in _MASK_FIELDS)


class PackedLayers(Mapping[str, LayerStats]):
    """A read-only ``{name: LayerStats}`` of one older step, stored as tuples.

    Reads like the dict it replaces (same names, same order, equal values); a layer
    once read is kept, so a rule reading it again at every step builds it once.

    >>> a = LayerStats("fc", "linear", depth=0.0, grad_norm=2.0, zero_grad_units=UnitMask(5, 4))
    >>> packed = PackedLayers({"fc": a})
    >>> packed["fc"] == a, list(packed), len(packed), packed.get("x")
    (True, ['fc'], 1, None)
    """

    __slots__ = ("_built", "_index", "_masks", "_rows")

    def __init__(self, layers: Mapping[str, LayerStats]) -> None:
        values = layers.values()
        #: name -> position; a dict of plain values is not tracked at all
        self._index = dict(zip(layers, itertools.count()))
        #: the plain fields of each layer: tuples of untracked values, which the
        #: collector stops walking once it has seen them
        self._rows = tuple(map(_plain_of, values))
        # The masks are the few shared UnitMask objects of their layers (see
        # collect.shared_mask): one tuple per mask field, in the layers' order.
        self._masks = tuple(tuple(map(get, values)) for get in _MASK_GETTERS)
        self._built: dict[str, LayerStats] | None = None

    def __getitem__(self, name: str) -> LayerStats:
        built = self._built
        if built is None:
            built = self._built = {}
        layer = built.get(name)
        if layer is None:
            i = self._index[name]
            kwargs = dict(zip(_PLAIN, self._rows[i]))
            for field_name, column in zip(_MASK_FIELDS, self._masks):
                kwargs[field_name] = column[i]
            layer = built[name] = LayerStats(**kwargs)
        return layer

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return f"PackedLayers({len(self._index)} layers)"
