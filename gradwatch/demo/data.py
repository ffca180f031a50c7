"""The demo's data: scikit-learn's bundled digits (1,797 8x8 images; nothing is downloaded),
split into a training and a held-out set and standardised with the training statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .extras import require

#: Share of the samples held out for the accuracy in the results table.
TEST_FRACTION = 0.2
#: The split does not change with --seed, so accuracies compare across seeds.
SPLIT_SEED = 0


@dataclass(frozen=True)
class Digits:
    """Standardised digits: ``x_*`` are (N, 64) floats, ``y_*`` (N,) class labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> Digits:
    """Load, split and standardise the digits (needs the ``demo`` extra: scikit-learn).

    >>> data = load_digits()  # doctest: +SKIP
    >>> data.x_train.shape, data.x_test.shape  # doctest: +SKIP
    (torch.Size([1438, 64]), torch.Size([359, 64]))
    """
    datasets = require(
        "sklearn.datasets", extra="demo", purpose="the demo's data (scikit-learn's digits)"
    )
    x_np, y_np = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(len(x) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(0)
    # Border pixels are always 0: their std is 0, and they stay 0 after scaling.
    std = x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return Digits(x[train], y[train], x[test], y[test])
