"""gradwatch in a plain Hugging Face Accelerate loop: where ``watcher.step()`` goes.

With gradient accumulation the gradients are final only on the micro-batch that completes
an accumulation window, where ``accelerator.sync_gradients`` is True: call
``watcher.step()`` there, before ``accelerator.clip_grad_norm_`` (so the statistics are of
the gradients your model produced, not of the clipped ones) and before
``optimizer.step()``. Watch the model itself (``accelerator.unwrap_model``); gradwatch
also unwraps DDP and ``torch.compile`` wrappers on its own.

A 20-layer sigmoid network trains on scikit-learn's digits (no download): gradwatch says
that the first layers get no gradient, and the network its fix suggests (ReLU, kaiming
init) trains without a finding. Under ``accelerate launch`` (several processes) the same
code combines the statistics across ranks; only the main process reports.

    python examples/accelerate_loop.py      (needs: pip install 'gradwatch[transformers]')
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch import nn

import gradwatch


def digits() -> torch.utils.data.TensorDataset:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.utils.data.TensorDataset(x, torch.tensor(y))


def mlp(depth: int, activation: type[nn.Module], init=None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(64, 10 if i == depth - 1 else 64)
        if init is not None:
            init(linear.weight)
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def train(title: str, model: nn.Module, epochs: int = 2) -> list[gradwatch.Finding]:
    accelerator = Accelerator(gradient_accumulation_steps=4)
    accelerator.print(f"\n=== {title} ===")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(
        digits(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # Every process measures (statistics are combined across ranks); the main one reports.
    reporters = None if accelerator.is_main_process else []
    watcher = gradwatch.watch(accelerator.unwrap_model(model), reporters=reporters)
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the last micro-batch of the window
                    watcher.step(step, optimizer=optimizer, loss=loss)  # final, not clipped
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    step += 1
                optimizer.step()
                optimizer.zero_grad()
    watcher.close()
    accelerator.print(f"{step} optimizer steps, final loss {loss.item():.3f}")
    return [f for f in watcher.findings if f.severity != "info"]


def main() -> None:
    torch.manual_seed(0)
    broken = train("20 sigmoid layers", mlp(20, nn.Sigmoid))
    fixed = train(
        "20 ReLU layers, kaiming init",
        mlp(20, nn.ReLU, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")),
    )
    print(
        f"\nbroken model: {len(broken)} finding(s) "
        f"({', '.join(sorted({f.code for f in broken})) or 'none'}); "
        f"fixed model: {len(fixed)} finding(s)"
    )


if __name__ == "__main__":
    main()
