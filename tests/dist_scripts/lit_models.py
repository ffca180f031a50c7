"""LightningModules and data shared by the Lightning tests and the multi-process scripts."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script (DDP re-executes it): make tests.* importable
    sys.path.insert(0, str(ROOT))

from tests.support import digits, mlp  # noqa: E402

# Lightning's advice for real runs, irrelevant for these tiny CPU ones.
for pattern in (
    ".*does not have many workers.*",
    ".*number of training batches.*",
    ".*LeafSpec.*",
    ".*isinstance.*treespec.*",
    ".*precision.*is not supported.*",
    ".*bf16.*",
):
    warnings.filterwarnings("ignore", pattern)


class Classifier(L.LightningModule):
    """A digits classifier around any ``net`` (trained with plain SGD)."""

    def __init__(self, net: nn.Module, lr: float = 0.05, log_loss: bool = True) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.log_loss = log_loss  # off under torch.compile: dynamo cannot trace self.log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def deep_tanh(seed: int = 0) -> Classifier:
    """12 x Linear(64)+Tanh with N(0, 0.05) weights: the gradient fades towards the input."""
    torch.manual_seed(seed)
    return Classifier(mlp(12, nn.Tanh, std=0.05))


def healthy(seed: int = 0) -> Classifier:
    """A 4-layer ReLU MLP with kaiming init: trains normally."""
    torch.manual_seed(seed)
    return Classifier(mlp(4, nn.ReLU, init="kaiming"), lr=0.02)


def digits_loader(batch_size: int = 64, shuffle: bool = True, n: int | None = None) -> DataLoader:
    x, y = digits()
    if n is not None:
        x, y = x[:n], y[:n]
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer without the extras a test does not look at (each can be turned on)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)
