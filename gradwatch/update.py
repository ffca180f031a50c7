"""The update: how far one optimizer step moved each watched layer's weights.

The update-to-weight ratio ``|Δw| / |w|`` of a layer is the classic "update/data ratio"
(about 1e-3 is healthy; far above 1e-2 the steps are too large, far below 1e-6 the layer
does not learn). It is measured from the weights themselves, so it is the same for every
optimizer: SGD, Adam, AdamW, Lion, Adafactor, a custom one, with clipping, weight decay
and any schedule.

How, without a host sync on the steps in between and in bounded memory:

- on the ``watcher.step()`` call just before a monitored step, a strided sample of each
  watched module's largest parameter (its weight; at most ``PER_TENSOR`` entries each,
  ``TOTAL`` in all) is copied into one buffer by one ``torch.cat`` over views made once
  (views of a parameter stay valid while the optimizer updates it in place); when that
  call is itself a monitored step, the sample it just measured is the snapshot (the
  weights have not moved in between), so steps monitored back to back gather once;
- one optimizer step later, at the monitored step, the same sample is taken again and the
  squared differences and squared weights are summed per parameter by one
  ``segment_reduce``. Those sums travel at the end of the monitored step's vector (still
  one host transfer), and :func:`read_updates` turns them into
  :attr:`LayerStats.update_ratio <gradwatch.stats.LayerStats.update_ratio>`.

Each sampled entry is weighted by its tensor's size over its sample size, so the ratio is
an estimate for the whole tensor, not for the sample. Storage replaced since the views
were made (``p.data = ...``, ``model.half()``) is noticed at the monitored step: that
step is not measured and the views are made anew. Under FSDP2 each rank samples its own
shard: the ratio is a ratio, so a shard is as good a sample as any.

:class:`OptimizerCoverage` reads the optimizer's ``param_groups``: watched parameters it
never updates (missing from every group, or in a group whose learning rate is 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .collect import param_table
from .layers import LayerInfo
from .stats import StepStats

_F32 = torch.float32
_F64 = torch.float64
#: Entries sampled from one tensor at most (an estimate within a few percent).
PER_TENSOR = 2048
#: Entries sampled in all (128 KiB in float32; two buffers exist at a monitored step).
TOTAL = 32_768

try:  # DTensor (FSDP2 shards); absent on old builds
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # pragma: no cover - depends on the build
    _DTensor = None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    if _DTensor is not None and isinstance(tensor, _DTensor):
        return tensor.to_local()
    return tensor


@dataclass
class UpdateLayout:
    """How to read the update sums at the end of a monitored step's vector."""

    #: (module index, parameter name) of each sampled parameter, in vector order
    params: list[tuple[int, str]]
    #: whether each had a gradient at the step whose update is measured (a module that
    #: did not run then, such as an expert the router did not pick, was not updated)
    had_grad: list[bool] | None = None

    @property
    def length(self) -> int:
        return 2 * len(self.params)


class UpdateSampler:
    """Samples the watched weights one step before a monitored step and measures how far
    the optimizer moved them by the monitored step.

    >>> import torch
    >>> from gradwatch.layers import discover
    >>> model = torch.nn.Linear(4, 4)
    >>> sampler = UpdateSampler(discover(model))
    >>> sampler.snapshot(0)
    >>> with torch.no_grad():
    ...     _ = model.weight.mul_(1.01)
    ...     _ = model.bias.mul_(1.01)
    >>> sums, layout = sampler.measure(1)
    >>> stats = {}
    >>> ratios = update_ratios(sums.tolist(), layout)
    >>> round(ratios[0], 4)
    0.01
    """

    def __init__(self, layers: list[LayerInfo]) -> None:
        # One tensor per module, its largest (the weight of a Linear/Conv/Embedding/Norm):
        # the classic ratio is the weight's, and a gather's host cost grows per tensor.
        largest: dict[int, tuple[int, str, torch.Tensor]] = {}
        for index, pname, param, numel, _ in param_table([la for la in layers if la.params]):
            if param.requires_grad and (index not in largest or numel > largest[index][2].numel()):
                largest[index] = (index, pname, param)
        self._entries = list(largest.values())
        self._sharded = _DTensor is not None and any(
            isinstance(p, _DTensor) for _, _, p in self._entries
        )
        self._views: list[torch.Tensor] | None = None
        self._pointers: list[int] = []
        self._layout = UpdateLayout([])
        self._segments: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self._snapshot: torch.Tensor | None = None
        self._label: int | None = None
        #: (step, views, sample) of the weights the last :meth:`measure` read
        self._measured: tuple[int, list[torch.Tensor], torch.Tensor] | None = None
        self._had_grad: list[bool] | None = None
        self._params: list[torch.Tensor] = []

    def snapshot(self, label: int) -> None:
        """Sample the weights as they are before the optimizer step of step ``label``."""
        measured, self._measured = self._measured, None
        if measured is not None and measured[0] == label and measured[1] is self._views:
            # Measured at this same step (monitored steps back to back): the weights have
            # not moved since, so that sample is this one, without a second gather.
            self._snapshot = measured[2]
        else:
            if self._views is None:  # storage is checked at the monitored step, not here
                self._build(self._current_pointers())
            self._snapshot = self._gather()
        self._label = label
        self._had_grad = [p.grad is not None for p in self._params]

    def measure(self, label: int) -> tuple[torch.Tensor, UpdateLayout] | None:
        """Per-parameter sums (squared change, then squared weight) since the snapshot
        taken at step ``label - 1``, as one float64 vector; None without such a snapshot
        (the first step, a step number that jumped, the model's parameters replaced)."""
        before, taken = self._snapshot, self._label
        self._snapshot, self._label, self._measured = None, None, None
        if before is None or taken != label - 1 or self._views is None:
            return None
        if self._current_pointers() != self._pointers:
            self._views = None  # storage replaced: the views are stale, build them anew
            return None
        now = self._gather()
        self._measured = (label, self._views, now)
        assert self._segments is not None and self._weights is not None
        assert self._lengths is not None
        # float32 at least (a bf16 difference would round); float64 weights stay float64
        work = _F64 if now.dtype == _F64 else _F32
        now, before = now.to(work), before.to(work)
        # row 0: the change, row 1: the weight; summed per parameter
        both = torch.stack([now - before, before]).square_().mul_(self._weights).to(_F64)
        layout = UpdateLayout(self._layout.params, self._had_grad)
        return _segment_sums(both, self._lengths, self._segments).reshape(-1), layout

    def _current_pointers(self) -> list[int]:
        if self._sharded:
            return [_local(param).data_ptr() for _, _, param in self._entries]
        return [param.data_ptr() for _, _, param in self._entries]

    def _build(self, pointers: list[int]) -> None:
        """Views of a strided sample of every parameter, their segment ids and weights."""
        budget = max(16, min(PER_TENSOR, TOTAL // max(1, len(self._entries))))
        views: list[torch.Tensor] = []
        sampled: list[torch.Tensor] = []
        params: list[tuple[int, str]] = []
        sizes: list[int] = []
        weights: list[float] = []
        for index, pname, param in self._entries:
            local = _dense_view(_local(param.detach()))
            if local is None:
                continue
            flat = local.view(-1)
            n = flat.numel()
            stride = max(1, -(-n // budget))
            if stride > 1 and stride % 2 == 0:
                stride += 1  # odd: the samples walk across the columns of a matrix
            view = flat[::stride]
            views.append(view)
            sampled.append(param)
            params.append((index, pname))
            sizes.append(view.numel())
            weights.append(n / view.numel())
        self._views = views
        self._params = sampled
        self._pointers = pointers
        self._layout = UpdateLayout(params)
        if not views:
            self._segments = self._weights = None
            return
        device = views[0].device
        counts = torch.tensor(sizes)
        self._lengths = counts.expand(2, len(sizes)).contiguous().to(device)
        self._segments = torch.repeat_interleave(torch.arange(len(sizes)), counts).to(device)
        self._weights = torch.repeat_interleave(torch.tensor(weights, dtype=_F32), counts).to(
            device
        )
        self._one_kind = all(v.dtype == views[0].dtype and v.device == device for v in views)

    def _gather(self) -> torch.Tensor:
        views = self._views or []
        if not views:
            return torch.zeros(0, dtype=_F32)
        if self._one_kind:
            return torch.cat(views)  # a new tensor: the views themselves move on
        device = views[0].device
        return torch.cat([v.to(device=device, dtype=_F32) for v in views])


def _segment_sums(
    values: torch.Tensor, lengths: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """Sums of consecutive runs of each row's entries (``lengths``, one row of them per
    row of ``values``): exact, one operation (``index_add_`` on builds without
    ``segment_reduce``)."""
    try:
        return torch.segment_reduce(values, "sum", lengths=lengths, axis=1)
    except (AttributeError, RuntimeError, NotImplementedError):
        out = torch.zeros(len(values), lengths.shape[1], dtype=values.dtype, device=values.device)
        return out.index_add_(1, segments, values)


def _dense_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor with its dimensions in memory order (a channels_last weight is dense
    but not contiguous), so that it flattens to a view; None when it cannot."""
    if not tensor.is_floating_point() or not tensor.numel():
        return None
    if not tensor.is_contiguous():
        order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
        tensor = tensor.permute(order)
        if not tensor.is_contiguous():
            return None
    return tensor


def update_ratios(values: list[float], layout: UpdateLayout) -> dict[int, float]:
    """Module index -> ``|Δw| / |w|`` from the transferred sums (inf for weights that were
    all zero and moved). When no sampled weight moved at all, no optimizer step
    ran between the two samples (``step()`` called per micro-batch of an accumulation, a
    step skipped by a GradScaler, no optimizer yet): nothing was measured."""
    n = len(layout.params)
    if not any(values[:n]):
        return {}
    out: dict[int, float] = {}
    had_grad = layout.had_grad or [True] * n
    for (index, _), change, size, used in zip(layout.params, values[:n], values[n:], had_grad):
        if not used and not change:
            continue  # no gradient at that step, so no update was due: not measured
        if size > 0:
            out[index] = math.sqrt(change) / math.sqrt(size)
        elif change != 0:  # moved away from all-zero weights (NaN stays NaN)
            out[index] = math.inf if change == change else math.nan
    return out


def moved(values: list[float], layout: UpdateLayout) -> set[tuple[int, str]]:
    """(module index, parameter name) of the sampled parameters (the largest of each
    module) that changed."""
    return {param for param, change in zip(layout.params, values) if change}


def read_updates(
    stats: StepStats, values: list[float], layout: UpdateLayout, names: Mapping[int, str]
) -> None:
    """Fill :attr:`LayerStats.update_ratio` from the update sums of a monitored step."""
    for index, ratio in update_ratios(values, layout).items():
        layer = stats.layers.get(names.get(index, ""))
        if layer is not None:
            layer.update_ratio = ratio


# -- what the optimizer updates --------------------------------------------------------


def _groups(optimizer: Any) -> list[Mapping[str, Any]] | None:
    inner = getattr(optimizer, "optimizer", None)  # Lightning's LightningOptimizer
    if inner is not None and hasattr(inner, "param_groups"):
        optimizer = inner
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, (list, tuple)) or not groups:
        return None
    return groups


def _lr(group: Mapping[str, Any]) -> float | None:
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        if lr.is_cuda or lr.numel() != 1:
            return None  # reading a learning rate kept on the GPU would make it wait
        lr = lr.item()
    try:
        return float(lr) if lr is not None else None
    except (TypeError, ValueError):
        return None


class OptimizerCoverage:
    """Which watched parameters the optimizer never updates, and why. Recomputed only
    when the optimizer's groups (their number, sizes or learning rates) change.

    >>> import torch
    >>> from gradwatch.layers import discover
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    >>> OptimizerCoverage(discover(model)).left_out(opt)[1]
    ['weight (not in the optimizer)', 'bias (not in the optimizer)']
    """

    def __init__(self, layers: Iterable[LayerInfo]) -> None:
        self._entries = [
            (index, pname, param)
            for index, pname, param, _, _ in param_table([la for la in layers if la.params])
            if param.requires_grad
        ]
        self._key: tuple | None = None
        self._result: dict[int, list[str]] = {}

    def left_out(self, optimizer: Any) -> dict[int, list[str]]:
        """Module index -> ``"name (reason)"`` for each parameter the optimizer does not
        move: in no param group, or in a group with lr 0 while another group's lr is not
        (every group at lr 0 is a schedule's first or last step, not a mistake). Nothing
        for an optimizer that holds none of the watched parameters (it holds copies)."""
        groups = _groups(optimizer)
        if groups is None:
            return {}
        lrs = [_lr(g) for g in groups]
        key = (
            id(optimizer),
            tuple(
                (id(g.get("params")), len(g.get("params", ())), lr) for g, lr in zip(groups, lrs)
            ),
        )
        if key == self._key:
            return self._result
        where: dict[int, int] = {}
        for k, group in enumerate(groups):
            for param in group.get("params", ()):
                where.setdefault(id(param), k)
        some_moving = any(lr is None or lr > 0 for lr in lrs)
        result: dict[int, list[str]] = {}
        if not any(id(param) in where for _, _, param in self._entries):
            # It holds copies (fp32 master weights, DeepSpeed's flat buffers): which of
            # the model's parameters it updates cannot be read from its groups.
            self._key, self._result = key, result
            return result
        for index, pname, param in self._entries:
            k = where.get(id(param))
            if k is None:
                reason = "not in the optimizer"
            elif lrs[k] == 0 and some_moving:
                reason = f"lr is 0 in param group {k}"
            else:
                continue
            result.setdefault(index, []).append(f"{pname} ({reason})")
        self._key, self._result = key, result
        return result
