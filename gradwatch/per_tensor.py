"""Per-tensor statistics of many gradients at once (the detail steps' non-zero counts and
largest |g|): small tensors of one shape are stacked and reduced together, so a model of
hundreds of layers costs a few operations per shape instead of a few per tensor.

Every number is the one the tensor-by-tensor form gives: maxima and counts are exact,
and the sampled counts of larger tensors read the same entries and scale them by the
same factor.
"""

from __future__ import annotations

import torch

_F32 = torch.float32
_F64 = torch.float64

#: Zero shares of larger gradients are estimated from this many evenly strided entries
#: (standard error <= 0.8 percentage points); smaller ones are counted exactly.
ZERO_SAMPLE = 4096

#: Tensors up to this many values are stacked with others of their shape: for them the
#: cost of an operation is its overhead, not the data (and the stacked copy is small).
STACK_LIMIT = 1 << 14

#: (groups of positions stacked together, positions read one by one), in slot order
Groups = tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]


def shape_groups(tensors: list[torch.Tensor]) -> Groups:
    """Which tensors are reduced together: non-empty small tensors of one shape, dtype
    and device, two or more of them. The others are read one by one.

    >>> a, b, c = torch.ones(2, 3), torch.zeros(2, 3), torch.ones(5)
    >>> shape_groups([a, c, b])
    (((0, 2),), (1,))
    """
    by_kind: dict[tuple, list[int]] = {}
    singles: list[int] = []
    for k, t in enumerate(tensors):
        if 0 < t.numel() <= STACK_LIMIT:
            by_kind.setdefault((t.shape, t.dtype, t.device), []).append(k)
        else:
            singles.append(k)
    groups = []
    for members in by_kind.values():
        if len(members) > 1:
            groups.append(tuple(members))
        else:
            singles.extend(members)
    return tuple(groups), tuple(sorted(singles))


def _sample_stride(n: int) -> int:
    """Every how many entries a tensor of ``n`` values is read to count its non-zeros:
    1 (all of them) up to ZERO_SAMPLE values, else an odd stride (the samples walk across
    the columns of a matrix) that reads about ZERO_SAMPLE of them."""
    if n <= ZERO_SAMPLE:
        return 1
    stride = n // ZERO_SAMPLE
    return stride + (stride % 2 == 0)


def nonzero_count(grad: torch.Tensor) -> torch.Tensor:
    """Number of non-zero entries (a float32 scalar). Counting every entry of a large
    tensor costs more than the rest of a monitored step, so those are estimated from a
    strided sample."""
    flat = grad.reshape(-1)
    n = flat.numel()
    stride = _sample_stride(n)
    if stride == 1:
        return torch.count_nonzero(flat).to(_F32)
    sample = flat[::stride]
    return torch.count_nonzero(sample).to(_F32) * (n / sample.numel())


def _nonzero_counts(stacked: torch.Tensor) -> torch.Tensor:
    """:func:`nonzero_count` of each row of a (tensors, values) matrix."""
    n = stacked.shape[1]
    stride = _sample_stride(n)
    if stride == 1:
        return torch.count_nonzero(stacked, dim=1).to(_F32)
    sample = stacked[:, ::stride]
    return torch.count_nonzero(sample, dim=1).to(_F32) * (n / sample.shape[1])


def counts_and_maxima(
    tensors: list[torch.Tensor], groups: Groups, home: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero count (float32) and largest |value| (float64; 0 for an empty tensor) of
    each tensor, in order, on ``home``."""
    stacked_groups, singles = groups
    counts: list[torch.Tensor] = []
    maxima: list[torch.Tensor] = []
    for members in stacked_groups:
        stacked = torch.stack([tensors[k] for k in members]).reshape(len(members), -1)
        counts.append(_nonzero_counts(stacked).to(home))
        maxima.append(stacked.abs().amax(dim=1).to(device=home, dtype=_F64))
    if singles:
        counts.append(torch.stack([nonzero_count(tensors[k]).to(home) for k in singles]))
        maxima.append(torch.stack([_largest(tensors[k]).to(home) for k in singles]))
    order = [k for members in stacked_groups for k in members] + list(singles)
    if order == list(range(len(order))):
        return torch.cat(counts), torch.cat(maxima)
    # Back into slot order: each result goes to its tensor's position.
    where = torch.tensor(order).to(home, non_blocking=True)
    count_vec = torch.cat(counts)
    max_vec = torch.cat(maxima)
    return (
        torch.empty_like(count_vec).index_copy_(0, where, count_vec),
        torch.empty_like(max_vec).index_copy_(0, where, max_vec),
    )


def _largest(t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        return torch.zeros((), dtype=_F64, device=t.device)
    return t.abs().amax().to(_F64)
