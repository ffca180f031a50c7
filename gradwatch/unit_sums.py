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

import torch

#: Outputs held until the end of the forward pass, in bytes: all of them, and each one.
PENDING_BYTES = 4 << 20
PENDING_EACH = 64 << 10

_F32 = torch.float32


def accumulate(store: dict[int, torch.Tensor], index: int, value: torch.Tensor) -> None:
    """Add ``value`` to ``store[index]`` (a changed shape restarts the sum)."""
    previous = store.get(index)
    if previous is None or previous.shape != value.shape:
        store[index] = value  # a changed shape (dynamic model) restarts the sum
    else:
        store[index] = previous + value


def sum_dims(ndim: int, axis: int) -> list[int]:
    """The axes to sum over to get one number per unit on ``axis``."""
    return [d for d in range(ndim) if d != axis]


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

    __slots__ = ("_bytes", "_items")

    def __init__(self) -> None:
        self._items: list[tuple[int, torch.Tensor, tuple]] = []
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

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
        # What torch.stack needs alike: read now, once, so that flush only compares
        key = (output.shape if shape is None else shape, output.dtype, output.device, axis)
        self._items.append((index, output, key))
        self._bytes += size
        return True

    def flush(self, store: dict[int, torch.Tensor]) -> None:
        """Sum what is held into ``store`` (per layer index, in call order) and let go."""
        if not self._items:
            return
        items, self._items, self._bytes = self._items, [], 0
        groups: dict[tuple, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault(item[2], []).append(position)
        if len(groups) == 1:  # the usual case (outputs alike): no reordering to do
            ((shape, dtype, _, axis),) = groups
            sums = _sums([output for _, output, _ in items], shape, dtype, axis)
        else:
            sums = [None] * len(items)
            for (shape, dtype, _, axis), positions in groups.items():
                rows = _sums([items[p][1] for p in positions], shape, dtype, axis)
                for position, row in zip(positions, rows):
                    sums[position] = row
        for (index, _, _), value in zip(items, sums):
            previous = store.get(index)
            if previous is None:
                store[index] = value  # (what accumulate does, without its call)
            else:
                accumulate(store, index, value)


def _sums(
    outputs: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype, axis: int
) -> tuple[torch.Tensor, ...]:
    """Per-unit sums of same-shaped outputs: one stack, one reduction, one per output."""
    with torch.no_grad():  # the outputs require grad; their sums need no graph
        stacked = torch.stack(outputs)
        wanted = torch.float64 if dtype == torch.float64 else _F32
        if len(shape) == 1:
            rows = stacked.to(wanted)
        else:
            dims = [d + 1 for d in sum_dims(len(shape), axis)]
            rows = stacked.sum(dim=dims, dtype=wanted)
        return rows.unbind(0)
