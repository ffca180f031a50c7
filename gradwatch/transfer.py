"""The one device-to-host transfer of a monitored step.

Synchronous mode reads the packed vector at once. Deferred mode (the default on CUDA)
starts a non-blocking copy into pinned host memory and reads it at the *next*
monitored step, by which time the copy has long finished: the GPU never waits for the
host, and findings arrive one monitored step late.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

M = TypeVar("M")
#: copies kept in flight at most before the oldest is waited for
_MAX_PENDING = 8


@dataclass
class _Pending(Generic[M]):
    buffer: torch.Tensor
    event: Any
    meta: M


class HostTransfer(Generic[M]):
    """Moves packed statistics to the host, now or one monitored step later.

    >>> t = HostTransfer(deferred=True)
    >>> t.submit(torch.tensor([1.0]), "a")
    []
    >>> t.submit(torch.tensor([2.0]), "b")
    [('a', [1.0])]
    >>> t.flush()
    [('b', [2.0])]
    """

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self._pending: deque[_Pending[M]] = deque()

    def submit(self, packed: torch.Tensor, meta: M) -> list[tuple[M, list[float]]]:
        """Hand over this step's vector; return whatever is ready to read now.

        Deferred: copies that have finished are returned oldest first; one the GPU has
        not reached yet stays queued (asking the event does not wait), so the host
        never waits for the device."""
        if not self.deferred:
            return [*self.flush(), (meta, packed.tolist())]
        ready = self._ready()
        if packed.is_cuda:
            buffer = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            buffer.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # nothing to overlap on the CPU; keeping the tensor is enough
            buffer, event = packed, None
        self._pending.append(_Pending(buffer, event, meta))
        if len(self._pending) > _MAX_PENDING:  # a device that never catches up
            ready.extend(self._take(self._pending.popleft(), wait=True))
        return ready

    def poll(self) -> list[tuple[M, list[float]]]:
        """The copies that have finished by now, oldest first (never waits)."""
        return self._ready()

    def _ready(self) -> list[tuple[M, list[float]]]:
        out: list[tuple[M, list[float]]] = []
        while self._pending and (
            self._pending[0].event is None or self._pending[0].event.query()
        ):
            out.extend(self._take(self._pending.popleft(), wait=False))
        return out

    @staticmethod
    def _take(pending: _Pending[M], wait: bool) -> list[tuple[M, list[float]]]:
        if wait and pending.event is not None:
            pending.event.synchronize()
        return [(pending.meta, pending.buffer.tolist())]

    def flush(self) -> list[tuple[M, list[float]]]:
        """Read every copy still in flight, waiting for them (at close)."""
        out: list[tuple[M, list[float]]] = []
        while self._pending:
            out.extend(self._take(self._pending.popleft(), wait=True))
        return out

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)
