"""The one device-to-host transfer of a monitored step.

Synchronous mode reads the packed vector at once. Deferred mode (the default on CUDA)
starts a non-blocking copy into pinned host memory and reads it at the *next*
monitored step, by which time the copy has long finished: the GPU never waits for the
host, and findings arrive one monitored step late.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

M = TypeVar("M")


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
        self._pending: _Pending[M] | None = None

    def submit(self, packed: torch.Tensor, meta: M) -> list[tuple[M, list[float]]]:
        """Hand over this step's vector; return whatever is ready to read now."""
        if not self.deferred:
            return [(meta, packed.tolist())]
        ready = self.flush()
        if packed.is_cuda:
            buffer = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            buffer.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # nothing to overlap on the CPU; keeping the tensor is enough
            buffer, event = packed, None
        self._pending = _Pending(buffer, event, meta)
        return ready

    def flush(self) -> list[tuple[M, list[float]]]:
        """Read the copy still in flight, if any (at close, or before a synchronous read)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        if pending.event is not None:
            pending.event.synchronize()
        return [(pending.meta, pending.buffer.tolist())]

    @property
    def has_pending(self) -> bool:
        return self._pending is not None
