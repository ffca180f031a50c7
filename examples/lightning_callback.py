"""gradwatch in a Lightning project: add one callback, change nothing else.

Trains two small digit classifiers on CPU (scikit-learn's bundled digits, no download):

1. a 12-layer tanh MLP with small initial weights: the gradient fades on its way back to
   the first layers, and gradwatch says so (GW101 vanishing-gradient) with the layers,
   the numbers and a fix, above Lightning's progress bar;
2. the fix it suggests, a ReLU MLP with kaiming (He) initialisation: no findings.

gradwatch measures every 15 optimizer steps (and at each step Lightning logs), and adds
per-layer gradient statistics under ``gradwatch/`` keys to the rows Lightning logs, next to
your own metrics; here a CSVLogger, whose metrics.csv the script reads back.

Run: python examples/lightning_callback.py   (about 10 seconds on a laptop CPU)
"""

from __future__ import annotations

import csv
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch.integrations.lightning import GradWatchCallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class DigitClassifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def mlp(depth: int, activation: type[nn.Module], init) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(64, 10 if i == depth - 1 else 64)
        init(linear.weight)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def digits() -> DataLoader:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    data = TensorDataset(x, torch.tensor(y))
    return DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))


def train(title: str, model: L.LightningModule, log_dir: Path) -> GradWatchCallback:
    print(f"\n=== {title} ===")
    watch = GradWatchCallback()  # measures every 15 steps, and when Lightning logs
    trainer = L.Trainer(
        max_epochs=4,  # 29 batches each
        log_every_n_steps=10,
        accelerator="cpu",
        callbacks=[watch],
        logger=CSVLogger(str(log_dir), name=title.split()[0]),
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, digits())

    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gradwatch/global_grad_norm")]
    first, last = "gradwatch/grad_rms/net.0", f"gradwatch/grad_rms/net.{len(model.net) - 1}"
    row = rows[-1]
    print(f"metrics.csv: {len(rows)} rows with gradwatch statistics; the last one:")
    print(f"  step {row['step']}, epoch {row['epoch']}, train_loss {float(row['train_loss']):.3f}")
    print(f"  {first} = {float(row[first]):.2e}   {last} = {float(row[last]):.2e}")
    announced = [f for f in watch.findings if f.status == "new"]
    print("findings:", ", ".join(f"{f.title} at step {f.step}" for f in announced) or "none")
    return watch


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        deep_tanh = DigitClassifier(
            mlp(12, nn.Tanh, lambda w: nn.init.normal_(w, 0.0, 0.05)), lr=0.05
        )
        broken = train("tanh-12 with small init", deep_tanh, Path(tmp))
        relu = DigitClassifier(
            mlp(4, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")), lr=0.02
        )
        fixed = train("relu-4 with kaiming init", relu, Path(tmp))
    assert any(f.code == "GW101" for f in broken.findings)
    assert not [f for f in fixed.findings if f.severity != "info"]


if __name__ == "__main__":
    main()
