"""Per-step overhead of gradwatch and its peers, side by side in one process.

For each model, every configuration trains its own copy (same initial weights, same
batches) in short blocks, round-robin in a shuffled order each round, so that drift of
the machine hits all configurations alike. Blocks are timed in thread CPU time (torch
runs on this one thread), so other processes on the machine do not count. Each block's
mean step time includes the occasional monitored step; the reported figure is the
median over rounds, and the ratio is to the bare loop measured in the same rounds.

Configurations:
  bare              forward, backward, optimizer step
  gradwatch         gradwatch.watch(model) with default settings (every 15 steps)
  gradwatch+loss    the same with watcher.step(loss=loss): the sentinel also reads the loss
  gradwatch/1       gradwatch.watch(model, every_n_steps=1)
  wandb.watch       wandb.watch(model, log="gradients", log_freq=1), offline, plus the
                    run.log({"loss": ...}) call that commits it each step
  lightning         lightning.pytorch.utilities.grad_norm(model, norm_type=2) each step

Models: a 25-layer ReLU MLP, a residual CNN, a 4-layer transformer encoder, and a
GPT-2-small-shaped language model (12 blocks, built from a transformers config; needs
``pip install 'gradwatch[transformers]'``).

Run:  python benchmarks/overhead.py            (about 9 minutes on 2 CPU cores)
      python benchmarks/overhead.py --rounds 4 --models mlp,gpt2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

#: CPU time of this thread: with torch on one thread, all the work of a step, and none of
#: the time another process held the core.
clock = time.thread_time


# -- models ---------------------------------------------------------------------------


def mlp_case() -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """24 x (Linear(256) + ReLU) and a classifier, He (kaiming) init; batch 128."""
    layers: list[nn.Module] = []
    for _ in range(24):
        linear = nn.Linear(256, 256)
        # He init: with PyTorch's default init this depth vanishes (a sick model, which
        # gradwatch watches more closely); the benchmark measures a healthy one.
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(256, 10))
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    return model, lambda: (x, y)


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ResidualCNN(nn.Module):
    """Stem + 4 residual blocks (32 channels, BatchNorm) + linear head on 16x16 images."""

    def __init__(self, channels: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*(_Block(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def cnn_case():
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    return ResidualCNN(), lambda: (x, y)


class Encoder(nn.Module):
    """Embedding (vocabulary 1000) + 4-layer transformer encoder (d=128) + classifier."""

    def __init__(self, vocab: int = 1000, dim: int = 128, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 256, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def transformer_case():
    x, y = torch.randint(0, 1000, (16, 32)), torch.randint(0, 10, (16,))
    return Encoder(), lambda: (x, y)


class GPT2Small(nn.Module):
    """GPT-2-small-shaped, from ``transformers.GPT2Config``: 12 blocks like GPT-2 small, but
    width 128 (4 heads), a 2,048-token vocabulary and 64 positions, so that a step (batch
    of 4 x 32 tokens) takes tens of milliseconds on a CPU. Returns next-token logits
    flattened for cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=12, n_embd=128, n_head=4, vocab_size=2048, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )
        self.lm = GPT2LMHeadModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=tokens).logits
        return logits.reshape(-1, logits.shape[-1])


def gpt2_case():
    tokens = torch.randint(0, 2048, (4, 33))
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    return GPT2Small(), lambda: (x, y)


CASES = {
    "mlp": mlp_case,
    "cnn": cnn_case,
    "transformer": transformer_case,
    "gpt2": gpt2_case,
}


# -- configurations -------------------------------------------------------------------


class Config:
    """One way of training a copy of the model: a step function and a teardown."""

    def __init__(self, name: str, model: nn.Module, batch: Callable) -> None:
        self.name = name
        self.model = model
        self.batch = batch
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.before_step: Callable[[torch.Tensor], None] = lambda loss: None
        self.close: Callable[[], None] = lambda: None
        self.times: list[float] = []

    def step(self) -> None:
        x, y = self.batch()
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.before_step(loss)
        self.opt.step()


def make_configs(model: nn.Module, batch: Callable, wanted: list[str]) -> list[Config]:
    import gradwatch

    configs = []
    for name in wanted:
        config = Config(name, copy.deepcopy(model), batch)
        if name.startswith("gradwatch"):
            options = {"every_n_steps": 1} if name.startswith("gradwatch/1") else {}
            watcher = gradwatch.watch(
                config.model, reporters=[], optimizer=config.opt, **options
            )
            if name.endswith("+loss"):
                config.before_step = lambda loss, w=watcher: w.step(loss=loss)
            else:
                config.before_step = lambda loss, w=watcher: w.step()
            config.close = watcher.close
        elif name == "wandb.watch":
            import wandb

            run = wandb.run or wandb.init(project="gradwatch-bench", mode="offline")
            wandb.watch(config.model, log="gradients", log_freq=1)
            config.before_step = lambda loss, r=run: r.log({"loss": loss.item()})
            config.close = lambda m=config.model: wandb.unwatch(m)
        elif name == "lightning":
            from lightning.pytorch.utilities import grad_norm

            config.before_step = lambda loss, m=config.model: grad_norm(m, norm_type=2)
        configs.append(config)
    return configs


def measure(
    case: str, names: list[str], rounds: int, steps: int, warmup: int
) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model, batch = CASES[case]()
    configs = make_configs(model, batch, names)
    try:
        for config in configs:  # warm-up: allocator, caches, the first detail steps
            for _ in range(warmup):
                config.step()
        order = list(configs)
        shuffle = random.Random(0)
        for _ in range(rounds):
            shuffle.shuffle(order)  # no configuration always follows the same one
            for config in order:
                start = clock()
                for _ in range(steps):
                    config.step()
                config.times.append((clock() - start) / steps)
    finally:
        for config in configs:
            config.close()
    bare = statistics.median(next(c for c in configs if c.name == "bare").times)
    return {
        c.name: {"ms": 1e3 * statistics.median(c.times), "ratio": statistics.median(c.times) / bare}
        for c in configs
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn,transformer,gpt2")
    parser.add_argument(
        "--configs", default="bare,gradwatch,gradwatch+loss,gradwatch/1,wandb.watch,lightning"
    )
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="steps per block (15 divides it)")
    parser.add_argument(
        "--warmup", type=int, default=60, help="steps before timing (past the first detail steps)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="gradwatch-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs
    names = args.configs.split(",")
    if "bare" not in names:
        names.insert(0, "bare")
    results = {}
    for case in args.models.split(","):
        if case not in CASES:
            parser.error(f"unknown model {case!r}; choose from {', '.join(CASES)}")
        results[case] = measure(case, names, args.rounds, args.steps, args.warmup)
        print(f"{case}: done", file=sys.stderr)

    print(f"\nper-step time, ratio to bare (torch {torch.__version__}, {args.threads} thread)\n")
    header = "| configuration | " + " | ".join(results) + " |"
    print(header)
    print("|" + "---|" * (len(results) + 1))
    for name in names:
        cells = [
            f"{results[c][name]['ratio']:.3f}x ({results[c][name]['ms']:.2f} ms)" for c in results
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].run.finish()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, **results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
