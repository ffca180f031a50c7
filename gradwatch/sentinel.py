"""The every-step sentinel: notice divergence and NaN at the step they start.

Monitored steps come every ``every_n_steps`` (15 by default): fine for slow problems, too
late for a run that diverges within ten steps or a batch that turns everything NaN. On
every other step the sentinel reads a few small numbers and decides whether the watcher
should measure *now*, while that step's gradients still exist:

- the norm of a small, fixed sample of gradients: the 1-D parameters (biases, norm
  scales) spread over the network, at most ``_BUDGET`` values (a tiny fraction of a
  model's gradients; reading them all every step would cost ~10% of a step);
- the loss, when ``watcher.step(loss=loss)`` passes it;
- the scale of a GradScaler, so that scaled gradients compare across steps.

It trips on a non-finite value (NaN/Inf gradient sample or loss) or on a surge: the
gradient sample above ``surge`` times its median over the last ``window`` steps and above
their maximum, or the loss far above its recent level. The numbers are computed on the
gradients' device; on CUDA they are copied without blocking and judged one step later
(the GPU never waits).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from .transfer import HostTransfer

_F32 = torch.float32
_STRIDED = torch.strided
#: Gradient values the sample may hold (about 0.3 MB in float32).
_BUDGET = 65_536
#: Tensors in the sample (one fused norm over them).
_MAX_TENSORS = 24


@dataclass(frozen=True)
class Trip:
    """Why the sentinel asks for a measurement at ``step``."""

    step: int
    reason: str  # "nonfinite", "surge", "loss-nonfinite", "loss-surge"
    value: float  # the sampled gradient norm (unscaled)
    baseline: float | None  # its median over the recent steps
    loss: float | None = None
    loss_baseline: float | None = None

    @property
    def factor(self) -> float | None:
        """How many times its recent median the gradient sample is."""
        if self.baseline is None or self.baseline <= 0 or not math.isfinite(self.value):
            return None
        return self.value / self.baseline


def sample_parameters(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters whose gradients the sentinel reads every step: 1-D ones (biases,
    norm scales) spread evenly over ``params`` (given in model order), else the smallest
    tensors, within the value budget.

    >>> ps = [torch.nn.Parameter(torch.zeros(n)) for n in (4, 8)] + [
    ...     torch.nn.Parameter(torch.zeros(3, 3))]
    >>> [p.numel() for p in sample_parameters(ps)]
    [4, 8]
    """
    small = [p for p in params if p.dim() <= 1]
    if not small:
        small = sorted(params, key=lambda p: p.numel())[:4]
    if len(small) > _MAX_TENSORS:
        step = len(small) / _MAX_TENSORS
        small = [small[int(i * step)] for i in range(_MAX_TENSORS)]
    chosen: list[torch.nn.Parameter] = []
    total = 0
    for p in sorted(small, key=lambda p: p.numel()):
        if total + p.numel() > _BUDGET and chosen:
            continue
        chosen.append(p)
        total += p.numel()
    order = {id(p): i for i, p in enumerate(params)}
    return sorted(chosen, key=lambda p: order.get(id(p), 0))


class Sentinel:
    """Decides, every step, whether this step needs a full measurement.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(3))
    >>> sentinel = Sentinel([p])
    >>> for step in range(10):
    ...     p.grad = torch.ones(3)
    ...     assert sentinel.observe(step) == []
    >>> p.grad = torch.full((3,), 100.0)
    >>> [t.reason for t in sentinel.observe(10)]
    ['surge']
    >>> p.grad = torch.full((3,), float("nan"))
    >>> [t.reason for t in sentinel.observe(11)], sentinel.observe(12)  # once per episode
    (['nonfinite'], [])
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        *,
        window: int = 16,
        surge: float = 10.0,
        min_history: int = 4,
        deferred: bool | str = "auto",
    ) -> None:
        self.params = sample_parameters(params)
        self._flat = all(p.dim() == 1 for p in self.params)  # no reshaping needed
        self._one_dtype = len({p.dtype for p in self.params}) <= 1
        self._sample_size = sum(p.numel() for p in self.params)
        self._buffer: torch.Tensor | None = None  # made at the first step, where grads are
        self._norm_out: torch.Tensor | None = None  # the norm, written in place
        self.window = window
        self.surge = surge
        self.min_history = min_history
        self._deferred_setting = deferred
        self._transfer: HostTransfer[int] = HostTransfer(False)
        self._grads: deque[float] = deque(maxlen=window)
        self._losses: deque[float] = deque(maxlen=window)
        #: (step, loss) as judged: on CUDA the watcher cannot read a loss tensor without
        #: waiting for the GPU, but a monitored step read later can take its loss from here
        self._judged_losses: deque[tuple[int, float]] = deque(maxlen=window)
        # A surge or a NaN that lasts trips once, not at every step: a NaN again only
        # after a finite step, a surge again only when it doubles the last one.
        self._in_nonfinite = False
        self._surge_level: float | None = None

    def observe(
        self, step: int, loss: Any = None, scale: torch.Tensor | None = None
    ) -> list[Trip]:
        """Read this step's sample; return the trips among the steps judged now (this
        one on the CPU, the previous one on CUDA)."""
        norm = self._whole_sample_norm()
        if norm is None:
            grads = [
                g for p in self.params if (g := p.grad) is not None and g.layout is _STRIDED
            ]
            norm = self._sample_norm(grads) if grads else None
        if norm is not None and norm.is_cuda:
            return self._observe_on_device(step, norm, loss, scale)
        loss_value = _host_float(loss)
        scale_value = _host_float(scale) if scale is not None else None
        values = [
            norm.item() if norm is not None else -1.0,
            loss_value if loss_value is not None else math.nan,
            scale_value if scale_value is not None else 1.0,
            1.0 if loss_value is not None else 0.0,
        ]
        # a sample left in flight by an earlier CUDA step
        trips = self.flush() if self._transfer.has_pending else []
        trip = self._judge(step, values)
        return [*trips, trip] if trip is not None else trips

    def _whole_sample_norm(self) -> torch.Tensor | None:
        """The usual step, made cheap: every sampled gradient there, dense, of the
        buffer's dtype and device. Right after a backward pass every line runs with cold
        caches (several times slower than warm), so this path checks nothing per tensor:
        a missing (None) or sparse gradient, or one on another device, makes ``torch.cat``
        raise, and the careful path takes over. None: take the careful path."""
        buffer = self._buffer  # made by the careful path, for a flat sample of one dtype
        if buffer is None or not self._flat:
            return None
        grads = [p.grad for p in self.params]
        if grads[0] is None or grads[0].dtype is not buffer.dtype:
            return None
        try:
            joined = torch.cat(grads, out=buffer)
        except (TypeError, RuntimeError):  # a None, a sparse gradient, another device
            # No buffer until the careful path sees the whole sample usable again (a
            # gradient that is always None, say an unused bias, raises no more).
            self._buffer = None
            return None
        return _norm(joined, out=self._norm_out)

    def _sample_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the sampled gradients: one concatenation and one norm (cheaper
        than a norm per tensor). When every sampled gradient is there, the concatenation
        goes into a buffer kept from step to step: no allocation at all, which matters
        more than it seems, since the first sizeable allocation after a backward pass pays
        for the allocator tidying up that pass's freed blocks, a cost that grows with
        depth and belongs to the training step, not to this check."""
        if len(grads) == 1:
            return _norm(grads[0].reshape(-1) if not self._flat else grads[0])
        if not self._flat:
            grads = [g.reshape(-1) for g in grads]
        if not self._one_dtype:
            return _norm(_cat32(grads))
        buffer = self._buffer
        if len(grads) == len(self.params):
            first = grads[0]
            if buffer is None or buffer.device != first.device or buffer.dtype != first.dtype:
                buffer = self._buffer = first.new_empty(self._sample_size)
                wide = first.dtype in (torch.float32, torch.float64)
                self._norm_out = first.new_empty((), dtype=first.dtype if wide else _F32)
            return _norm(torch.cat(grads, out=buffer), out=self._norm_out)
        return _norm(torch.cat(grads))

    def _observe_on_device(
        self, step: int, norm: torch.Tensor, loss: Any, scale: torch.Tensor | None
    ) -> list[Trip]:
        """CUDA: pack the four numbers on the device and copy them without blocking;
        they are judged at the next step, when the copy has long finished."""
        device = norm.device
        parts = [norm.reshape(1).to(_F32)]
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            parts.append(loss.detach().reshape(1).to(device=device, dtype=_F32))
        else:
            value = float(loss) if isinstance(loss, (int, float)) else math.nan
            parts.append(torch.full((1,), value, device=device))
        if scale is not None:
            parts.append(scale.detach().reshape(1).to(device=device, dtype=_F32))
        else:
            parts.append(torch.ones(1, device=device))
        parts.append(torch.full((1,), 1.0 if loss is not None else 0.0, device=device))
        self._transfer.deferred = self._deferred_setting is not False
        trips = []
        for judged, values in self._transfer.submit(torch.cat(parts), step):
            trip = self._judge(judged, values)
            if trip is not None:
                trips.append(trip)
        return trips

    def _judge(self, step: int, values: list[float]) -> Trip | None:
        norm, loss, scale, has_loss = values
        if norm < 0:
            return None
        value = norm / (scale if scale > 0 and math.isfinite(scale) else 1.0)
        loss_value = loss if has_loss > 0 else None
        grads, losses = self._grads, self._losses
        reason = None
        finite = math.isfinite(value)
        loss_finite = loss_value is None or math.isfinite(loss_value)  # None: no loss
        if not finite or not loss_finite:
            if not self._in_nonfinite:
                # Under a loss scaler an Inf gradient with a finite loss is a skipped
                # step: the watcher judges it with the scale at hand.
                reason = "nonfinite" if not finite else "loss-nonfinite"
            self._in_nonfinite = True
        else:
            self._in_nonfinite = False
            # A surge is far above the recent typical level *and* above everything in the
            # window: a run whose gradient fell by orders of magnitude has batches far
            # above its new median, but not above where it came from. (The maximum is
            # checked first: it is cheap, and most steps are not a new high.)
            enough = len(grads) >= self.min_history
            # (value > grads[-1] first: half the time it settles the test without max())
            if (
                enough
                and value > grads[-1]
                and value > max(grads)
                and value > self.surge * _median(grads) > 0
            ):
                if self._surge_level is None or value > 2.0 * self._surge_level:
                    reason = "surge"
                    self._surge_level = value
            else:
                self._surge_level = None
                if (
                    loss_value is not None
                    and len(losses) >= self.min_history
                    and loss_value > losses[-1]
                    and loss_value > max(losses)
                    and self._loss_surge(loss_value)
                ):
                    reason = "loss-surge"
        trip = None
        if reason is not None:
            trip = Trip(
                step,
                reason,
                value,
                _median(grads) if grads else None,
                loss_value,
                _median(losses) if losses else None,
            )
        if finite:
            grads.append(value)
        if loss_value is not None and loss_finite:
            losses.append(loss_value)
        if loss_value is not None:
            self._judged_losses.append((step, loss_value))
        return trip

    def _loss_surge(self, loss: float) -> bool:
        """The loss far above its recent level: more than 6 median absolute deviations
        and more than half its own magnitude above the median (a loss that has fallen by
        orders of magnitude has tiny deviations; the second test keeps its noise quiet)."""
        ordered = list(self._losses)
        centre = _median(ordered)
        spread = _median([abs(v - centre) for v in ordered])
        return loss - centre > max(6.0 * 1.4826 * spread, 0.5 * abs(centre))

    def flush(self) -> list[Trip]:
        """Judge a sample still in flight (deferred mode), e.g. at close."""
        trips = []
        for judged, values in self._transfer.flush():
            trip = self._judge(judged, values)
            if trip is not None:
                trips.append(trip)
        return trips

    def loss_at(self, step: int) -> float | None:
        """The loss passed at ``step``, once judged (None: not passed, or not yet judged:
        on CUDA a step is judged at the next one; only the last ``window`` are kept).

        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> sentinel = Sentinel([p])
        >>> p.grad = torch.ones(3)
        >>> _ = sentinel.observe(7, loss=torch.tensor(2.5))
        >>> sentinel.loss_at(7), sentinel.loss_at(8)
        (2.5, None)
        """
        for judged, loss in reversed(self._judged_losses):
            if judged == step:
                return loss
        return None

    def state(self) -> dict[str, Any]:
        return {"grads": list(self._grads), "losses": list(self._losses)}


def _norm(values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if values.dtype in (torch.float32, torch.float64):
        return torch.linalg.vector_norm(values, out=out)
    return torch.linalg.vector_norm(values, dtype=_F32, out=out)


def _cat32(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.to(_F32) for t in tensors])


def _host_float(value: Any) -> float | None:
    """A number on the host, or None; a CUDA tensor is never read here (that would sync)."""
    if isinstance(value, torch.Tensor):  # first: the usual loss
        if value.is_cuda or value.numel() != 1:
            return None
        return value.item()  # no detached copy made first
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _median(values: Any) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return math.nan
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
