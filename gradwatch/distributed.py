"""Combining statistics across ranks (DDP, FSDP2) without risking a hang.

Under DDP every rank sees its own batch: activation statistics differ per rank while
gradients are already averaged. Under FSDP2 each rank holds a shard of each gradient,
so its norm is only local. Before the rules run, each monitored step sums the parts
that differ (sums of squares of shards, unit activity, counts) and takes the maximum
of the maxima, across the process group.

Every rank makes the same collective calls in the same order at every monitored step:
first a small header (is this rank healthy, how long are its vectors), then the data
only if every rank agreed. A rank whose statistics failed still sends the header, so
its peers learn of it and skip the data instead of waiting forever:

- failed before this step's header: it sends a failing header now, where its peers
  are waiting for one;
- failed after it (the peers have finished this step's collectives and gone on to
  train): it owes them the news and sends it at the next monitored step;
- a rank that learns of a peer's failure from the header sends nothing more: everyone
  knows, and an extra header would have no partner.

After that exchange no rank makes gradwatch collectives again.
"""

from __future__ import annotations

import torch

_F64 = torch.float64


def _dist():  # imported lazily: torch.distributed is optional on some builds
    import torch.distributed as dist

    return dist


def distributed_world_size() -> int:
    """World size of the default process group, 1 when there is none."""
    try:
        dist = _dist()
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size())
    except Exception:
        pass
    return 1


class PeerFailed(RuntimeError):
    """Another rank could not compute its statistics for this step."""


class Reducer:
    """Sums and maxima across ranks, or nothing when training runs in one process.

    ``enabled=None`` (the default) reduces whenever a process group with more than one
    rank is initialised; ``False`` keeps every rank's statistics local.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = enabled
        self._exchanged = False  # this monitored step's header went out
        self._owes_notice = False  # failed after the header: tell the peers next step
        self._settled = False  # every rank knows of a failure: no more collectives
        self._in_group = False  # has taken part in a header: peers count on this rank
        self._world: int | None = None

    @property
    def world_size(self) -> int:
        if self.enabled is False:
            return 1
        try:
            dist = _dist()
            if not (dist.is_available() and dist.is_initialized()):
                return 1
        except Exception:
            return 1
        if self._world is None:  # a process group's size never changes
            self._world = int(dist.get_world_size())
        return self._world

    @property
    def rank(self) -> int:
        if self.world_size <= 1:
            return 0
        return int(_dist().get_rank())

    @staticmethod
    def _collective_device() -> torch.device:
        """NCCL reduces on the GPU; gloo (and others) on the CPU."""
        backend = str(_dist().get_backend()).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def begin_step(self) -> None:
        """Start of a monitored step (call it on every rank, also once statistics are
        off): sends the failure notice owed since the last monitored step, if any."""
        self._exchanged = False
        if self._owes_notice:
            self._owes_notice = False
            self._send_failure()

    def header(self, ok: bool, lengths: tuple[int, ...], device: torch.device) -> bool:
        """Agree with the other ranks that all are healthy and sent the same layout."""
        dist = _dist()
        values = [0.0 if ok else 1.0, *map(float, lengths), *(-float(v) for v in lengths)]
        header = torch.tensor(values, dtype=_F64, device=device)
        self._exchanged = True
        self._in_group = True
        dist.all_reduce(header, op=dist.ReduceOp.MAX)
        failed = header[0].item() > 0
        n = len(lengths)
        highest = header[1 : 1 + n].tolist()
        lowest = [-v for v in header[1 + n :].tolist()]
        if failed:
            self._settled = True
            raise PeerFailed("statistics failed on another rank")
        return highest == lowest

    def reduce(
        self,
        sums: torch.Tensor,
        counts: torch.Tensor,
        masks: torch.Tensor,
        maxes: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.world_size <= 1 or self._settled:
            return sums, counts, masks, maxes
        dist = _dist()
        home = sums.device
        device = self._collective_device()
        lengths = (sums.numel(), counts.numel(), masks.numel(), maxes.numel())
        if not self.header(True, lengths, device):
            # Ranks saw different layers (dynamic control flow): keep local numbers.
            return sums, counts, masks, maxes
        joined = torch.cat([sums, counts, masks]).to(device)
        dist.all_reduce(joined, op=dist.ReduceOp.SUM)
        joined = joined.to(home)
        a, b = lengths[0], lengths[0] + lengths[1]
        sums, counts, masks = joined[:a], joined[a:b], joined[b:]
        if maxes.numel():
            maxes_d = maxes.to(device)
            dist.all_reduce(maxes_d, op=dist.ReduceOp.MAX)
            maxes = maxes_d.to(home)
        return sums, counts, masks, maxes

    def announce_failure(self) -> None:
        """Called by a rank whose statistics raised: tell the peers, do not hang them.

        Safe to call more than once, after ``enabled = False``, and on a rank that learnt
        of a peer's failure."""
        if self._settled or not (self._in_group or self.world_size > 1):
            return
        if self._exchanged:
            # The peers are past this step's collectives; a header now would meet their
            # next training collective instead. Tell them at the next monitored step.
            self._owes_notice = True
        else:
            self._send_failure()

    def _send_failure(self) -> None:
        self._settled = True
        try:
            self.header(False, (0, 0, 0, 0), self._collective_device())
        except PeerFailed:
            pass
