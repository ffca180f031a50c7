"""gradwatch + Weights & Biases: a deep tanh network whose gradient vanishes raises a W&B
alert, and the run gets per-layer gradient metrics and a gradient-flow chart.

Runs offline by default (no account, nothing sent) in a few seconds on a CPU:

    python examples/wandb_alerts.py
    wandb sync <the folder it prints>          # later, to upload the run
    WANDB_MODE=online python examples/wandb_alerts.py   # to send it (and the alert) now

Data: scikit-learn's bundled 8x8 digits (no download).
"""

from __future__ import annotations

import os

import torch
import wandb
from sklearn.datasets import load_digits
from torch import nn

import gradwatch
from gradwatch.integrations.wandb import WandbReporter
from gradwatch.reporters import default_reporters

STEPS = 150


def deep_tanh_mlp(depth: int = 12, width: int = 64) -> nn.Sequential:
    """12 Linear+Tanh layers with small weights: the gradient fades towards the input."""
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(64 if i == 0 else width, 10 if i == depth - 1 else width)
        nn.init.normal_(linear.weight, 0.0, 0.05)
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def main() -> None:
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(y)

    # Offline unless WANDB_MODE says otherwise: the example runs without a W&B account.
    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project="gradwatch-examples", name="deep-tanh", mode=mode)
    model = deep_tanh_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reporter = WandbReporter(run, alert_on_resolved=True)
    # The default reporters show the same findings in the terminal; W&B gets the alerts.
    watcher = gradwatch.watch(
        model, every_n_steps=10, reporters=[*default_reporters(), reporter]
    )

    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        watcher.step(optimizer=optimizer)  # after backward, before optimizer.step()
        optimizer.step()
        # Your own logging: gradwatch's values join this row; it never adds rows of its own.
        run.log({"loss": loss.item()})

    watcher.close()  # the findings table and run summary (run.finish() commits the last row)
    for finding in watcher.findings:
        print(f"finding: {finding.title} [{finding.severity}] at step {finding.step}")
    print(f"W&B alerts sent: {reporter.alerts_sent}")
    disabled, offline, sync_file = run.disabled, run.offline, run.settings.sync_file
    run.finish()
    if disabled:
        print("W&B is disabled (WANDB_MODE=disabled): nothing was written.")
    elif offline:
        print(f"offline run folder (upload with `wandb sync`): {os.path.dirname(sync_file)}")
        print(f"offline run written to: {sync_file}")


if __name__ == "__main__":
    main()
