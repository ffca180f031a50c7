"""Per-unit sums of ReLU outputs, batched over a forward pass.

The probe on a ReLU needs, per unit, the sum of the output over the batch (> 0: the unit
was active at least once). In a deep, narrow network that is one tiny reduction per ReLU
call, and launching it costs more host time (a few microseconds) than its arithmetic. So
small outputs are kept (references, not copies) and summed together at the end of the
forward pass: one stack and one reduction per shape instead of one reduction per call.

Memory stays bounded: at most :data:`PENDING_BYTES` of outputs are held, each at most
:data:`PENDING_EACH` bytes (larger ones are summed at once, where the reduction costs more
than its launch anyway), until the watched model's forward pass returns (or until
``watcher.step()`` where its modules are called on their own). Only outputs that require
grad are held: autograd keeps those for the backward pass anyway (a ReLU's backward reads
its output; activation checkpointing, which drops them, leaves the 4 MiB bound), and their
values cannot change before they are summed (an in-place change of such an output fails
the backward pass). Recomputations inside the backward pass are summed at once.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from itertools import pairwise
from typing import Any

import torch

#: Outputs held until the end of the forward pass, in bytes: all of them, and each one.
PENDING_BYTES = 4 << 20
PENDING_EACH = 64 << 10

_F32 = torch.float32


def accumulate(
    store: MutableMapping[int, torch.Tensor], index: int, value: torch.Tensor
) -> None:
    """Add ``value`` to ``store[index]`` (a changed shape restarts the sum)."""
    previous = store.get(index)
    if previous is None or previous.shape != value.shape:
        store[index] = value  # a changed shape (dynamic model) restarts the sum
    else:
        store[index] = previous + value


def sum_dims(ndim: int, axis: int) -> list[int]:
    """The axes to sum over to get one number per unit on ``axis``."""
    return [d for d in range(ndim) if d != axis]


class UnitActivity(MutableMapping[int, torch.Tensor]):
    """Per-unit sums of each ReLU's outputs, by layer index (> 0: the unit was active).

    A flush of many outputs gives one stacked tensor of sums (one row per call). Cutting
    it into one tensor per layer costs a tensor object per row (~0.6 µs each: a
    quarter of a millisecond per pass of a 400-layer network), and the step's transfer
    puts them back together anyway. So the stacked rows are kept as they are until
    someone reads the sums one by one; :func:`unit_masks` hands them to the transfer
    whole where their rows are the layers in index order.

    >>> activity = UnitActivity()
    >>> activity.add_rows([0, 2], torch.tensor([[0.0, 1.0], [3.0, 0.0]]))
    >>> units, parts = unit_masks(activity)
    >>> units, [p.tolist() for p in parts]
    ([(0, 2), (2, 2)], [[0.0, 1.0, 3.0, 0.0]])
    >>> activity[2].tolist(), sorted(activity)
    ([3.0, 0.0], [0, 2])
    """

    __slots__ = ("_rows", "_sums")

    def __init__(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        #: (layer indices, their sums stacked) not yet cut into ``_sums``, in call order
        self._rows: list[tuple[list[int], torch.Tensor]] = []

    def add_rows(self, indices: list[int], rows: torch.Tensor) -> None:
        """Add ``rows[k]`` to the sums of layer ``indices[k]``, for every k."""
        self._rows.append((indices, rows))

    def _settle(self) -> None:
        """Cut the stacked rows into per-layer sums, accumulated in call order."""
        if not self._rows:
            return
        held, self._rows = self._rows, []
        for indices, rows in held:
            for index, value in zip(indices, rows.unbind(0)):
                accumulate(self._sums, index, value)

    def whole(self) -> tuple[list[tuple[int, int]], torch.Tensor] | None:
        """``([(index, units), ...] in index order, all sums as one flat tensor)`` when
        the sums are held only as stacked rows with the same layers, in increasing order
        (one pass of a network, or several passes alike); else None."""
        if self._sums or not self._rows:
            return None
        indices, total = self._rows[0]
        if any(a >= b for a, b in pairwise(indices)):
            return None
        for more_indices, more in self._rows[1:]:
            if more_indices != indices or more.shape != total.shape or more.dtype != total.dtype:
                return None
            total = total + more  # what accumulate does per layer, for all of them at once
        return [(index, total.shape[1]) for index in indices], total.reshape(-1)

    def __getitem__(self, index: int) -> torch.Tensor:
        self._settle()
        return self._sums[index]

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        self._settle()
        self._sums[index] = value

    def __delitem__(self, index: int) -> None:
        self._settle()
        del self._sums[index]

    def __iter__(self) -> Iterator[int]:
        self._settle()
        return iter(self._sums)

    def __len__(self) -> int:
        self._settle()
        return len(self._sums)


def unit_masks(
    activity: MutableMapping[int, torch.Tensor],
) -> tuple[list[tuple[int, int]], list[torch.Tensor]]:
    """``[(layer index, units), ...]`` in index order, and the sums in that order as
    tensors to concatenate (one, where the sums are still stacked)."""
    if isinstance(activity, UnitActivity):
        whole = activity.whole()
        if whole is not None:
            return whole[0], [whole[1]]
    units = [(index, activity[index].numel()) for index in sorted(activity)]
    return units, [activity[index] for index, _ in units]


class PendingSums:
    """ReLU outputs waiting to be summed per unit, in call order.

    >>> store = {}
    >>> pending = PendingSums()
    >>> pending.add(0, torch.tensor([[0.0, 1.0], [0.0, 2.0]], requires_grad=True), 1)
    True
    >>> pending.flush(store)
    >>> store[0].tolist()
    [0.0, 3.0]
    """

    # Parallel lists and a dict of groups (by what torch.stack needs alike), not one
    # tuple per output: objects that outlive the call make the garbage collector run
    # during the forward pass (~0.15 ms per pass of a 400-layer network).
    __slots__ = ("_bytes", "_groups", "_indices", "_outputs")

    def __init__(self) -> None:
        self._indices: list[int] = []
        self._outputs: list[torch.Tensor] = []
        #: (shape, dtype, device, unit axis) -> positions in the lists above
        self._groups: dict[tuple, list[int]] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._indices)

    def add(
        self,
        index: int,
        output: torch.Tensor,
        axis: int,
        shape: torch.Size | None = None,
        nbytes: int | None = None,
    ) -> bool:
        """Keep ``output`` (a ReLU's, ``axis``: its unit axis) to sum later. False when
        it must be summed now: too large, over the budget, or not kept by autograd.
        (``shape`` and ``nbytes``: the output's, when the caller has read them already:
        each read of a tensor attribute costs a call into torch, and this runs for every
        ReLU call of a monitored step.)"""
        if not output.requires_grad:
            return False  # not saved for backward: it could change before the pass ends
        size = output.nbytes if nbytes is None else nbytes
        if size > PENDING_EACH or self._bytes + size > PENDING_BYTES:
            return False
        key = (output.shape if shape is None else shape, output.dtype, output.device, axis)
        positions = self._groups.get(key)
        if positions is None:
            positions = self._groups[key] = []
        positions.append(len(self._indices))
        self._indices.append(index)
        self._outputs.append(output)
        self._bytes += size
        return True

    def flush(self, store: MutableMapping[int, torch.Tensor]) -> None:
        """Sum what is held into ``store`` (per layer index, in call order) and let go."""
        if not self._indices:
            return
        indices, outputs, groups = self._indices, self._outputs, self._groups
        self._indices, self._outputs, self._groups, self._bytes = [], [], {}, 0
        if len(groups) == 1:  # the usual case (outputs alike): no reordering to do
            ((shape, dtype, _, axis),) = groups
            rows = _sums(outputs, shape, dtype, axis)
            if isinstance(store, UnitActivity):
                store.add_rows(indices, rows)  # kept stacked: see UnitActivity
                return
            sums: Any = rows.unbind(0)
        else:
            sums = [None] * len(indices)
            for (shape, dtype, _, axis), positions in groups.items():
                rows = _sums([outputs[p] for p in positions], shape, dtype, axis)
                for position, row in zip(positions, rows.unbind(0)):
                    sums[position] = row
        for index, value in zip(indices, sums):
            accumulate(store, index, value)


def _sums(
    outputs: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype, axis: int
) -> torch.Tensor:
    """Per-unit sums of same-shaped outputs (one stack, one reduction): row k is the
    sums of ``outputs[k]``."""
    with torch.no_grad():  # the outputs require grad; their sums need no graph
        stacked = torch.stack(outputs)
        wanted = torch.float64 if dtype == torch.float64 else _F32
        if len(shape) == 1:
            rows = stacked.to(wanted)
        else:
            dims = [d + 1 for d in sum_dims(len(shape), axis)]
            rows = stacked.sum(dim=dims, dtype=wanted)
        return rows
