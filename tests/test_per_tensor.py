"""The detail steps' batched per-tensor statistics equal the tensor-by-tensor ones."""

from __future__ import annotations

import torch

from gradwatch.per_tensor import counts_and_maxima, nonzero_count, shape_groups


def _one_by_one(tensors: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    counts = [float(nonzero_count(t)) for t in tensors]
    maxima = [float(t.abs().amax().double()) if t.numel() else 0.0 for t in tensors]
    return counts, maxima


def test_batched_counts_and_maxima_equal_per_tensor_ones() -> None:
    torch.manual_seed(0)
    tensors = []
    for shape in [(32, 32), (32,), (70, 100), (32, 32), (5000,), (70, 100), (32,), (3, 0)]:
        t = torch.randn(shape)
        t[torch.rand(shape) < 0.3] = 0.0  # zero entries to count
        tensors.append(t)
    tensors[3][0, 0] = float("nan")  # NaN is the maximum, as amax() gives it
    tensors.append(torch.randn(32, 32, dtype=torch.bfloat16))
    tensors.append(torch.zeros(32, 32, dtype=torch.bfloat16))
    groups = shape_groups(tensors)
    assert any(len(members) > 1 for members in groups[0])  # something was batched
    counts, maxima = counts_and_maxima(tensors, groups, torch.device("cpu"))
    want_counts, want_maxima = _one_by_one(tensors)
    assert counts.tolist() == want_counts
    got = maxima.tolist()
    assert got[3] != got[3]  # NaN
    assert [v for k, v in enumerate(got) if k != 3] == [
        v for k, v in enumerate(want_maxima) if k != 3
    ]
