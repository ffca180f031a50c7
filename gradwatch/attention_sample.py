"""The rows of attention that gradwatch measures, and their statistics.

Each captured call keeps a small, fixed sample of its logit rows (at most
``SAMPLE_SLICES`` batch x head slices and ``SAMPLE_ROWS`` rows in all): a couple of
indexing ops at the call. For a ``scaled_dot_product_attention`` call without an explicit
mask (causal or none) even the logits wait: the call keeps copies of its sampled query
rows and of the keys of their slices (:class:`PendingLogits`, two copy kernels, within
the per-call budget), and the logits of all such calls of one shape are computed by one
batched product, scale and mask when the step is packed: on a CPU bit for bit what the
call would have computed alone (a GPU's batched product may pick another kernel and
round differently in the last bit). The statistics of every call of a step are computed
together when the step is packed (one batch of ops per step, not per call) and travel in
the step's single vector; :func:`read_back` turns them into
:class:`~gradwatch.stats.AttentionStats` on the host.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .stats import MASK_LEVEL, MIN_KEYS, SATURATED_PROBABILITY, AttentionStats

_F32 = torch.float32

#: Batch x head slices and rows per call in the sample (rows spread over the slices).
SAMPLE_SLICES = 16
SAMPLE_ROWS = 256
#: Logits a call's sample may hold (512 KB in float32; it lives until the step is
#: measured): rows with many keys are sampled more sparsely, down to MIN_SAMPLE_ROWS.
SAMPLE_VALUES = 1 << 17
MIN_SAMPLE_ROWS = 32
#: Per-call values: rows judged, saturated rows, sampled rows with every key masked,
#: sampled rows, sum of normalised entropies (all summed across ranks); on detail steps
#: also NaN/Inf probability rows, NaN/+Inf logit rows, rows with every key masked (full
#: counts over the whole call).
BASE_VALUES = 5
DETAIL_VALUES = 3


@dataclass(slots=True)
class AttentionCall:
    """One captured attention call: host facts, and its sample still on the device."""

    module: str  # the module that made the call (the attention module)
    softmax: str  # the nn.Softmax module that computed the probabilities, else ""
    via: str  # "softmax", "nn.Softmax" or "scaled_dot_product_attention"
    keys: int
    rows: int  # rows of the whole call (batch x heads x queries)
    depth: float | None  # position among the watched modules in forward order (detail)
    #: (sampled rows, keys) float32 logits; released once the step is packed
    sample: torch.Tensor | None
    detail: bool = False  # full-tensor counts were taken (detail step)
    detail_values: torch.Tensor | None = None  # DETAIL_VALUES float32; released when packed
    scale: float | None = None  # factor applied to q.k (when seen)
    head_dim: int | None = None
    confirmed: bool = False  # its probabilities weighted a matrix product
    #: what ``sample`` is computed from when the step is packed (``sample`` is None
    #: until then)
    pending: PendingLogits | None = None


@dataclass(slots=True)
class PendingLogits:
    """A scaled_dot_product_attention call whose sampled logits are computed when the
    step is packed, batched with the other calls of its shape."""

    rows: torch.Tensor  # (..., sampled rows, head size) float32 copy of q's sampled rows
    keys: torch.Tensor  # (..., keys, head size) float32 copy of k (later edits of k unseen)
    scale: float
    causal: bool
    plan: Plan


@dataclass(frozen=True)
class Plan:
    """Where the sample of a (..., queries, keys) call lies."""

    index: tuple[torch.Tensor, ...]  # per leading axis (slices, 1), then rows (1, rows)
    lead: tuple[tuple[int, ...], ...]  # per leading axis, the sampled indices
    rows: torch.Tensor  # the sampled query positions
    row_list: tuple[int, ...]
    size: int  # sampled rows in all
    device: torch.device
    #: every (batch, head) slice is in the sample: only rows are picked, and the keys of
    #: scaled_dot_product_attention are used in place, not copied
    every_slice: bool = False


_PLANS: dict[tuple, Plan] = {}
#: index tensors and masks built once per shape (bounded)
_CACHE: dict[tuple, Any] = {}


def _remember(key: tuple, value: Any) -> None:
    if len(_CACHE) > 256:
        _CACHE.clear()
    _CACHE[key] = value


def _cached(key: tuple, make: Any) -> Any:
    found = _CACHE.get(key)
    if found is None:
        found = make()
        _remember(key, found)
    return found


def sample_plan(lead: tuple[int, ...], queries: int, device: torch.device, keys: int = 0) -> Plan:
    """Which (batch, head) slices and query rows to measure: at most SAMPLE_SLICES slices,
    taken with a stride coprime with their number (so that the sample walks across heads
    and batch entries alike), and SAMPLE_ROWS rows in all (fewer when ``keys`` is large:
    SAMPLE_VALUES logits at most, but MIN_SAMPLE_ROWS rows at least), evenly spread over
    the query positions, the last one included (in a causal model it sees every key).

    >>> plan = sample_plan((2, 4), 6, torch.device("cpu"))
    >>> plan.size, plan.lead
    (48, ((0, 0, 0, 0, 1, 1, 1, 1), (0, 1, 2, 3, 0, 1, 2, 3)))
    """
    budget = max(MIN_SAMPLE_ROWS, min(SAMPLE_ROWS, SAMPLE_VALUES // max(1, keys)))
    key = (lead, queries, device, budget)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    n = math.prod(lead)
    n_slices = max(1, min(n, SAMPLE_SLICES))
    stride = max(1, n // n_slices)
    while n > 1 and math.gcd(stride, n) != 1:
        stride += 1
    flat = sorted({(k * stride) % n for k in range(n_slices)}) if n else [0]
    per_axis: list[list[int]] = [[] for _ in lead]
    for index in flat:
        for axis in range(len(lead) - 1, -1, -1):
            index, here = divmod(index, lead[axis])
            per_axis[axis].append(here)
    count = max(1, min(queries, budget // len(flat)))
    if count == 1:
        rows = [queries - 1]
    else:
        rows = sorted({round(i * (queries - 1) / (count - 1)) for i in range(count)})
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    index = tuple(torch.tensor(a, dtype=torch.long, device=device).unsqueeze(1) for a in per_axis)
    plan = Plan(
        index=(*index, row_index.unsqueeze(0)),
        lead=tuple(tuple(a) for a in per_axis),
        rows=row_index,
        row_list=tuple(rows),
        size=len(flat) * len(rows),
        device=device,
        every_slice=len(flat) == n,
    )
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def gather_rows(t: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The sampled rows of a (..., queries, last) tensor as (rows, last), in float32 (one
    indexing op; nothing else is copied)."""
    picked = t.index_select(-2, plan.rows) if plan.every_slice else t[plan.index]
    return picked.reshape(-1, t.shape[-1]).to(_F32)


def defer_sdpa_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    plan: Plan,
) -> PendingLogits | None:
    """What :func:`sdpa_logits` needs, kept for the step's one batched product: copies of
    the sampled query rows and of the keys of their slices, for calls without an explicit
    mask whose kept keys fit the per-call budget (SAMPLE_VALUES, like a sample). None
    otherwise, and for grouped-query heads when every slice is sampled: the logits are
    then computed at the call."""
    if mask is not None:
        return None
    if plan.every_slice:
        if q.shape[:-2] != k.shape[:-2] or k.numel() > SAMPLE_VALUES:
            return None
        # index_select copies; k is copied so that a later in-place edit is not seen
        rows, keys = q.index_select(-2, plan.rows), k.to(_F32, copy=True)
    else:
        slices = plan.size // len(plan.row_list)
        if slices * k.shape[-2] * k.shape[-1] > SAMPLE_VALUES:
            return None
        rows, keys = _sampled_slices(q, k, plan)  # indexing copies both (q has lead axes)
    return PendingLogits(
        rows=rows.to(_F32), keys=keys.to(_F32), scale=scale, causal=causal, plan=plan
    )


def _resolve(calls: list[AttentionCall]) -> None:
    """The samples of calls with pending logits: one product per (shape, scale, mask)
    group. Each call's slice of the batched product equals the product the call would
    have computed alone (the same matmul per slice, then the same scale and mask)."""
    groups: dict[tuple, list[AttentionCall]] = {}
    for call in calls:
        p = call.pending
        if p is not None:
            key = (p.rows.shape, p.keys.shape, p.scale, p.causal, id(p.plan), p.rows.device)
            groups.setdefault(key, []).append(call)
    for group in groups.values():
        first = group[0].pending
        pending = [call.pending for call in group]
        with full_precision(first.rows.device):
            rows = torch.stack([p.rows for p in pending])
            keys = torch.stack([p.keys for p in pending])
            z = torch.matmul(rows, keys.transpose(-1, -2)).mul_(first.scale)
        n_keys = first.keys.shape[-2]
        if first.causal:
            z = z.masked_fill_(_later(first.plan, n_keys), -math.inf)
        for call, logits in zip(group, z.unbind(0)):
            call.sample = logits.reshape(-1, n_keys)
            call.pending = None


def full_precision(device: torch.device) -> Any:
    """Autocast off while the statistics are taken (a product inside an autocast region
    would be taken in half precision), entered only where autocast is on: entering a
    context costs ~6 us of host time per call, and most models train without."""
    try:
        if not torch.is_autocast_enabled(device.type):
            return contextlib.nullcontext()
    except (RuntimeError, TypeError):  # a device type autocast does not know
        pass
    return torch.autocast(device.type, enabled=False)


def sdpa_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    plan: Plan,
) -> torch.Tensor:
    """The logits of the sampled rows of ``scaled_dot_product_attention(q, k, ...)``:
    (rows, keys) float32, masked keys at -inf (boolean masks) or with the additive mask
    added, keys after the query at -inf when ``causal`` (top-left aligned, as SDPA)."""
    keys = k.shape[-2]
    if plan.every_slice:
        z = _every_slice_logits(q.index_select(-2, plan.rows), k)
        if z is not None:
            z = z.mul_(scale).reshape(-1, len(plan.row_list), keys)  # (slices, rows, keys)
            return _masked(z, q, mask, causal, plan, keys)
    qs, ks = _sampled_slices(q, k, plan)
    z = torch.matmul(qs.to(_F32), ks.to(_F32).transpose(-1, -2)).mul_(scale)
    return _masked(z, q, mask, causal, plan, keys)


def _sampled_slices(
    q: torch.Tensor, k: torch.Tensor, plan: Plan
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slices, rows, head size) sampled rows of q, and (slices, keys, head size) the keys
    of their slices (copies, but for k of a call without leading axes)."""
    lead_shape = q.shape[:-2]
    qs = q[plan.index] if len(plan.index) > 1 else q.index_select(-2, plan.rows).unsqueeze(0)
    if not lead_shape:
        return qs, k.unsqueeze(0)
    # grouped-query attention (fewer key heads) and broadcast axes map each sampled
    # query slice onto its key slice: index * key size // query size
    k_lead = tuple(k.shape[:-2])
    k_index = _CACHE.get(("k", plan.lead, k_lead, lead_shape, plan.device))
    if k_index is None:
        k_index = tuple(
            torch.tensor(
                [i * k_lead[axis] // lead_shape[axis] for i in plan.lead[axis]],
                dtype=torch.long,
                device=plan.device,
            )
            for axis in range(len(lead_shape))
        )
        _remember(("k", plan.lead, k_lead, lead_shape, plan.device), k_index)
    return qs, k[k_index]


def _every_slice_logits(qs: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q.k for the sampled rows of every slice, with k used in place: equal leading
    shapes, or grouped-query heads (axis -3 of q a multiple of k's). None otherwise."""
    qs, k = qs.to(_F32), k.to(_F32)
    if qs.shape[:-2] == k.shape[:-2]:
        return torch.matmul(qs, k.transpose(-1, -2))
    if qs.dim() >= 3 and qs.shape[:-3] == k.shape[:-3] and qs.shape[-3] % k.shape[-3] == 0:
        groups = qs.shape[-3] // k.shape[-3]
        grouped = qs.unflatten(-3, (k.shape[-3], groups))  # query head h -> key head h // g
        z = torch.matmul(grouped, k.unsqueeze(-3).transpose(-1, -2))
        return z.flatten(-4, -3)
    return None


def _masked(
    z: torch.Tensor,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    plan: Plan,
    keys: int,
) -> torch.Tensor:
    """(rows, keys) logits with the call's mask applied to (slices, rows, keys) ``z``."""
    lead_shape = q.shape[:-2]
    if isinstance(mask, torch.Tensor):
        m = mask
        while m.dim() < q.dim():
            m = m.unsqueeze(0)
        zero = _cached(
            ("zero", plan.device),
            lambda: torch.zeros((1, 1), dtype=torch.long, device=plan.device),
        )
        m_index = tuple(
            plan.index[axis] if m.shape[axis] > 1 else zero for axis in range(len(lead_shape))
        )
        rows = plan.index[-1] if m.shape[-2] > 1 else zero
        ms = m[(*m_index, rows)] if m_index else m[..., rows.squeeze(0), :].unsqueeze(0)
        z = z.masked_fill(~ms, -math.inf) if ms.dtype == torch.bool else z + ms.to(_F32)
    elif causal:
        # in place: z is a fresh product of the sample
        z = z.masked_fill_(_later(plan, keys), -math.inf)
    return z.reshape(-1, keys)


def _later(plan: Plan, keys: int) -> torch.Tensor:
    """(sampled rows, keys): the keys after each sampled query (masked when causal)."""
    return _cached(
        ("causal", plan.row_list, keys, plan.device),
        lambda: torch.arange(keys, device=plan.device).unsqueeze(0) > plan.rows.unsqueeze(1),
    )


def _owners(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """For rows concatenated from calls of these sizes, the position of each row's call."""
    return _cached(
        ("owners", sizes, device),
        lambda: torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
        ),
    )


def row_statistics(
    logits: torch.Tensor, owners: torch.Tensor, calls: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per call, the BASE_VALUES sums and the largest |logit|, from (rows, keys) logits.

    A key is masked where its logit is at or below ``MASK_LEVEL`` (-inf, finfo.min, the
    -1e4 and -1e9 of additive masks). Rows with fewer than ``MIN_KEYS`` unmasked keys
    are not judged: the first token of a causal sequence attends to itself alone, and a
    one-key row is one-hot by construction. Entropy is normalised by the log of each
    row's own number of unmasked keys (1: uniform, 0: one-hot).

    >>> z = torch.tensor([[0.0, 0.0], [30.0, 0.0], [0.0, -math.inf]])
    >>> sums, largest = row_statistics(z, torch.zeros(3, dtype=torch.long), 1)
    >>> [round(v, 3) for v in sums[0].tolist()], largest.tolist()
    ([2.0, 1.0, 0.0, 3.0, 1.0], [30.0])
    >>> row_statistics(torch.full((1, 2), -math.inf), torch.zeros(1, dtype=torch.long), 1)[1]
    tensor([-inf])
    """
    valid = logits > MASK_LEVEL  # NaN logits count as masked
    keys = valid.sum(-1, dtype=_F32)
    probs = torch.softmax(logits, -1)  # a row with every key at -inf: NaN, not judged
    judged = keys >= MIN_KEYS
    saturated = judged & (probs.amax(-1) > SATURATED_PROBABILITY)
    flags = torch.stack([judged, saturated, keys == 0, torch.ones_like(judged)], 1).to(_F32)
    entropy = torch.special.entr(probs).sum(-1) / keys.clamp(min=2).log()
    entropy = entropy.where(judged, 0.0).nan_to_num(0.0).unsqueeze(1)
    per_row = torch.cat([flags, entropy], 1)
    sums = per_row.new_zeros(calls, BASE_VALUES).index_add_(0, owners, per_row)
    # -inf, not 0, where nothing was seen (a call with no sampled row, a row with every
    # key masked): read back as "not measured" instead of a largest logit of 0.
    largest = logits.abs().where(valid, -math.inf).amax(-1)
    maxima = largest.new_full((calls,), -math.inf).scatter_reduce_(0, owners, largest, "amax")
    return sums, maxima


def pack(calls: list[AttentionCall]) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """The statistics of a step's calls: (pieces summed across ranks, pieces maximised
    across ranks, the calls in the order the pieces hold them)."""
    if not calls:
        return [], [], []
    _resolve(calls)
    groups: dict[int, list[AttentionCall]] = {}
    for call in calls:  # one batch per number of keys (cross-attention may differ)
        groups.setdefault(call.sample.shape[-1], []).append(call)
    ordered = [call for group in groups.values() for call in group]
    sums: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    for group in groups.values():
        logits = torch.cat([call.sample for call in group]) if len(group) > 1 else group[0].sample
        sizes = tuple(call.sample.shape[0] for call in group)
        group_sums, group_max = row_statistics(logits, _owners(sizes, logits.device), len(group))
        sums.append(group_sums.reshape(-1))
        maxima.append(group_max)
    detail = [call.detail_values for call in ordered if call.detail_values is not None]
    if detail:
        sums.append(torch.cat(detail))
    for call in ordered:  # statistics in flight (deferred on CUDA) hold no samples
        call.sample = call.detail_values = None
    return sums, maxima, ordered


def summed_length(calls: list[AttentionCall]) -> int:
    return BASE_VALUES * len(calls) + DETAIL_VALUES * sum(1 for call in calls if call.detail)


def read_back(
    calls: list[AttentionCall], sums: list[float], maxima: list[float]
) -> dict[str, AttentionStats]:
    """Per attention module, the statistics of all its calls at this step (``calls`` in
    the order :func:`pack` returned them)."""
    out: dict[str, AttentionStats] = {}
    totals: dict[str, list[float]] = {}
    detail_pos = BASE_VALUES * len(calls)
    for position, (call, largest) in enumerate(zip(calls, maxima)):
        values = sums[BASE_VALUES * position : BASE_VALUES * (position + 1)]
        stats = out.get(call.module)
        if stats is None:
            stats = out[call.module] = AttentionStats(
                name=call.module, softmax=call.softmax, via=call.via
            )
            totals[call.module] = [0.0] * BASE_VALUES
        acc = totals[call.module]
        for j, value in enumerate(values):
            acc[j] += value
        stats.calls += 1
        stats.keys = max(stats.keys, call.keys)
        stats.rows += call.rows
        if largest != -math.inf:  # -inf: this call had no unmasked logit to measure
            stats.max_logit = (
                largest if stats.max_logit is None else _max(stats.max_logit, largest)
            )
        if call.scale is not None and stats.scale is None:
            stats.scale, stats.head_dim = call.scale, call.head_dim
        elif stats.head_dim is None:
            stats.head_dim = call.head_dim
        if call.depth is not None and stats.depth is None:
            stats.depth = call.depth
        if call.detail:
            nonfinite, bad_logits, masked = sums[detail_pos : detail_pos + DETAIL_VALUES]
            detail_pos += DETAIL_VALUES
            stats.nonfinite_rows = (stats.nonfinite_rows or 0) + int(nonfinite)
            stats.nonfinite_logit_rows = (stats.nonfinite_logit_rows or 0) + int(bad_logits)
            stats.fully_masked_rows = (stats.fully_masked_rows or 0) + round(masked)
    for name, stats in out.items():
        judged, saturated, masked, sampled, entropy = totals[name]
        stats.judged_rows = int(judged)
        stats.sampled_rows = int(sampled)
        if judged:
            stats.saturated_fraction = saturated / judged
            stats.entropy = entropy / judged
        if sampled:
            stats.masked_row_fraction = masked / sampled
    return out


def _max(a: float, b: float) -> float:
    return a if a != a or a >= b else b  # NaN wins
