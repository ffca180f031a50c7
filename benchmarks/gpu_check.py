"""GPU check: gradwatch never makes the GPU wait, and costs <= 1% at its defaults.

Two checks on a CUDA device (on a machine without one it says so and exits 0):

1. No host-device synchronisation. A deferred-mode watcher (the default on CUDA) with the
   every-step sentinel and ``loss=`` runs 60 steps of a ResNet-18-sized CNN and a
   GPT-2-small-sized transformer under ``torch.cuda.set_sync_debug_mode("error")``: any
   operation of gradwatch (or of the loop itself) that waits for the GPU raises. The run
   covers detail steps, ordinary monitored steps, unmonitored steps, and a NaN batch that
   trips the sentinel.
2. Overhead at the default interval: bare loop vs ``gradwatch.watch(model)`` with
   ``step(loss=loss)``, timed with the device synchronised only at block ends, in
   round-robin blocks; the ratio must be <= 1.01.

Run:  python benchmarks/gpu_check.py [--json FILE] [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch

LIMIT = 1.01


# -- models ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18's layout (11.7 M parameters), written out so that no torchvision is needed."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        widths, blocks, cin = (64, 128, 256, 512), [], 64
        for i, width in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class GPT(nn.Module):
    """GPT-2 small's shape: 12 pre-LN blocks, width 768, 12 heads, 50,257-token vocabulary,
    tied embedding and output (124 M parameters)."""

    def __init__(self, vocab: int = 50257, dim: int = 768, layers: int = 12, ctx: int = 1024):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        block = nn.TransformerEncoderLayer(dim, 12, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(n, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        return self.out(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def cases(device: torch.device):
    images = torch.randn(64, 3, 128, 128, device=device)
    labels = torch.randint(0, 1000, (64,), device=device)
    tokens = torch.randint(0, 50257, (8, 256), device=device)

    def cnn_loss(model, poison=False):
        x = images.clone()
        if poison:
            x[0, 0, 0, 0] = float("nan")
        return F.cross_entropy(model(x), labels)

    def gpt_loss(model, poison=False):
        logits = model(tokens[:, :-1])
        if poison:
            logits = logits * torch.full((), float("nan"), device=device)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    return {"resnet18": (ResNet18, cnn_loss), "gpt2-small": (GPT, gpt_loss)}


# -- checks ---------------------------------------------------------------------------


def sync_check(make, loss_of, device, steps: int) -> dict:
    """Run a watched loop under sync debug mode "error"; return what happened."""
    torch.manual_seed(0)
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    watcher = gradwatch.watch(model, reporters=[])
    assert watcher._use_deferred(torch.zeros(1, device=device)), "deferred mode expected on CUDA"
    for _ in range(2):  # allocator and kernel warm-up outside the check
        loss_of(model).backward()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    error = None
    poison_at = steps - 10  # an unmonitored step: the sentinel trips
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(steps):
            loss = loss_of(model, poison=step == poison_at)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            watcher.step(optimizer=opt, loss=loss)
            if step != poison_at:
                opt.step()
    except RuntimeError as exc:  # "called a synchronizing CUDA operation"
        error = f"step {step}: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    watcher.close()  # reads what is still in flight (allowed to wait: training is over)
    nan = [f for f in watcher.findings if f.code == "GW103"]
    return {
        "synchronising_call": error,
        "monitored_steps": [s.step for s in watcher.history][:12],
        "nan_found_at": nan[0].step if nan else None,
        "nan_injected_at": poison_at,
        "disabled": watcher.disabled,
    }


def overhead(make, loss_of, device, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    base = make().to(device)
    configs = {}
    for name in ("bare", "gradwatch"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        watcher = gradwatch.watch(model, reporters=[]) if name == "gradwatch" else None
        configs[name] = (model, opt, watcher, [])

    def run(name: str, n: int) -> float:
        model, opt, watcher, _ = configs[name]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            loss = loss_of(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if watcher is not None:
                watcher.step(optimizer=opt, loss=loss)
            opt.step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    for name in configs:  # warm-up past the first detail steps
        run(name, 50)
    for r in range(rounds):
        for name in (("bare", "gradwatch") if r % 2 == 0 else ("gradwatch", "bare")):
            configs[name][3].append(run(name, steps))
    bare = statistics.median(configs["bare"][3])
    watched = statistics.median(configs["gradwatch"][3])
    for _, _, watcher, _ in configs.values():
        if watcher is not None:
            watcher.close()
    return {"bare_ms": 1e3 * bare, "gradwatch_ms": 1e3 * watched, "ratio": watched / bare}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps of the sync check")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--block", type=int, default=45, help="steps per timed block")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (skipped).")
        return 0
    device = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ok = True
    for name, (make, loss_of) in cases(device).items():
        sync = sync_check(make, loss_of, device, args.steps)
        cost = overhead(make, loss_of, device, args.rounds, args.block)
        results[name] = {"sync": sync, "overhead": cost}
        passed = sync["synchronising_call"] is None and cost["ratio"] <= LIMIT
        ok = ok and passed and sync["nan_found_at"] is not None
        print(
            f"{name}: sync {'none' if sync['synchronising_call'] is None else 'FOUND'}"
            f" | NaN injected at {sync['nan_injected_at']}, found at {sync['nan_found_at']}"
            f" | defaults {cost['ratio']:.4f}x bare ({cost['bare_ms']:.2f} ms -> "
            f"{cost['gradwatch_ms']:.2f} ms)"
        )
        if sync["synchronising_call"]:
            print(f"  {sync['synchronising_call'][:500]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print("gpu_check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
