"""The every-step check's gradient sample: the same norm whatever path computes it (the
cheap one for a whole dense sample, the careful one for missing or sparse gradients)."""

from __future__ import annotations

import math

import torch

from gradwatch.sentinel import Sentinel


def _expected(grads: list[torch.Tensor | None]) -> float:
    dense = [g for g in grads if g is not None and g.layout is torch.strided]
    return float(torch.linalg.vector_norm(torch.cat([g.double() for g in dense])))


def test_sample_norm_follows_missing_sparse_and_retyped_gradients() -> None:
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(5)]
    sentinel = Sentinel(params)
    cases: list[list[torch.Tensor | None]] = []
    for step in range(4):  # whole dense sample: the buffer is made, then reused
        cases.append([torch.full((4,), 1.0 + step + i) for i in range(5)])
    unused = [torch.full((4,), 2.0 + i) for i in range(5)]
    unused[2] = None  # a parameter without gradient (an unused bias)
    cases += [unused, unused]
    sparse = [torch.full((4,), 3.0 + i) for i in range(5)]
    sparse[1] = torch.ones(4).to_sparse()  # left out of the sample, not an error
    cases.append(sparse)
    cases.append([torch.full((4,), 0.5 + i) for i in range(5)])  # whole again
    cases.append([torch.full((4,), 0.5 + i, dtype=torch.float64) for i in range(5)])

    for step, grads in enumerate(cases):
        for param, grad in zip(params, grads):
            if grad is not None and grad.dtype != param.dtype:
                param.data = param.data.to(grad.dtype)  # model.double() after starting
            param.grad = grad
        assert sentinel.observe(step) == []
        assert math.isclose(sentinel.state()["grads"][-1], _expected(grads), rel_tol=1e-6)
