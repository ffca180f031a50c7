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
  floor             the least a per-layer monitor can do each step: a forward hook on each
                    ReLU module that keeps which units fired, and one fused norm pass over
                    all gradients, read back with the masks in one transfer (what
                    ``gradwatch/1`` is compared with: issue 19 asks for at most 1.10x it)

Models: a 25-layer ReLU MLP (batch 128, and batch 64: a cheap step), a residual CNN, a
4-layer transformer encoder, and a GPT-2-small-shaped language model (12 blocks, built
from a transformers config; needs ``pip install 'gradwatch[transformers]'``).

In one process, two copies of the same bare model can differ by ~2% (memory layout), so
the run is repeated in fresh processes (--processes, default 3) and the median ratio is
reported with the lowest and highest of a process.

Run:  python benchmarks/overhead.py            (about 25 minutes on 2 CPU cores)
      python benchmarks/overhead.py --processes 1 --rounds 4 --models mlp,gpt2
      python benchmarks/overhead.py --readme     (rewrites the README's table)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from own_hooks import OwnHooks  # next to this file

#: CPU time of this thread: with torch on one thread, all the work of a step, and none of
#: the time another process held the core.
clock = time.thread_time


# -- models ---------------------------------------------------------------------------


def mlp_case(
    batch: int = 128,
) -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
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
    x, y = torch.randn(batch, 256), torch.randint(0, 10, (batch,))
    return model, lambda: (x, y)


def cheap_mlp_case() -> tuple[nn.Module, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """The same MLP on batches of 64: a step of a few milliseconds, where what gradwatch
    does on the host weighs the most."""
    return mlp_case(batch=64)


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
            n_layer=12,
            n_embd=128,
            n_head=4,
            vocab_size=2048,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
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
    "mlp64": cheap_mlp_case,
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
        #: the global module hooks this configuration placed are present only while it
        #: runs (see own_hooks.py): a gradwatch copy armed for its next monitored step
        #: must not slow down the bare loop's block
        self.hooks = OwnHooks()

    def step(self) -> None:
        x, y = self.batch()
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.before_step(loss)
        self.opt.step()


class Floor:
    """The floor of per-step monitoring: ReLU unit masks from forward hooks, one fused
    norm pass over the gradients (``torch._foreach_norm``), one device-to-host read."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masks: list[torch.Tensor] = []
        self.handles = [
            module.register_forward_hook(self._keep_mask)
            for module in model.modules()
            if isinstance(module, nn.ReLU)
        ]

    def _keep_mask(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # a unit fired on this batch iff its summed output is > 0 (ReLU outputs are >= 0)
        self.masks.append(output.detach().flatten(0, -2).sum(0) > 0)

    def step(self, loss: torch.Tensor) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        parts = [torch.stack(torch._foreach_norm(grads))] if grads else []
        parts += [mask.to(torch.float32) for mask in self.masks]
        self.masks = []
        if parts:
            torch.cat(parts).tolist()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_configs(model: nn.Module, batch: Callable, wanted: list[str]) -> list[Config]:
    configs = []
    for name in wanted:
        config = Config(name, copy.deepcopy(model), batch)
        with config.hooks:
            _set_up(config, name)
        configs.append(config)
    return configs


def _set_up(config: Config, name: str) -> None:
    import gradwatch

    if name.startswith("gradwatch"):
        options = {"every_n_steps": 1} if name.startswith("gradwatch/1") else {}
        watcher = gradwatch.watch(config.model, reporters=[], optimizer=config.opt, **options)
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
    elif name == "floor":
        floor = Floor(config.model)
        config.before_step = floor.step
        config.close = floor.close


def measure(
    case: str, names: list[str], rounds: int, steps: int, warmup: int
) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model, batch = CASES[case]()
    configs = make_configs(model, batch, names)
    try:
        for config in configs:  # warm-up: allocator, caches, the first detail steps
            with config.hooks:
                for _ in range(warmup):
                    config.step()
        order = list(configs)
        shuffle = random.Random(0)
        for _ in range(rounds):
            shuffle.shuffle(order)  # no configuration always follows the same one
            for config in order:
                with config.hooks:
                    start = clock()
                    for _ in range(steps):
                        config.step()
                    config.times.append((clock() - start) / steps)
    finally:
        for config in configs:
            with config.hooks:
                config.close()
    bare = statistics.median(next(c for c in configs if c.name == "bare").times)
    return {
        c.name: {"ms": 1e3 * statistics.median(c.times), "ratio": statistics.median(c.times) / bare}
        for c in configs
    }


# -- the README's table -----------------------------------------------------------------

#: The multiplication sign, written as an escape so the source stays ASCII.
TIMES = "\u00d7"
DASH = "\u2013"
#: Column titles of the README table, by model.
MODEL_TITLES = {
    "mlp": "MLP 24 x (Linear(256) + ReLU)",
    "mlp64": "the same MLP, batch 64",
    "cnn": "residual CNN with BatchNorm",
    "transformer": "4-layer transformer encoder",
    "gpt2": "GPT-2-shaped LM, 12 blocks",
}
#: Row titles of the README table, by configuration.
CONFIG_TITLES = {
    "bare": "bare loop",
    "gradwatch": "**gradwatch, defaults (every 15 steps)**",
    "gradwatch+loss": "gradwatch, defaults, with `step(loss=)`",
    "gradwatch/1": "gradwatch every step",
    "floor": "floor: ReLU masks + one norm pass, every step",
    "wandb.watch": '`wandb.watch(log="gradients", log_freq=1)`',
    "lightning": "Lightning `grad_norm` every step",
}
#: The README block the table is written to: <!-- gradwatch-bench:overhead --> ...
README_BLOCK = ("bench", "overhead")
#: Where ``--readme`` keeps the numbers the README's table is written from.
RESULTS = Path(__file__).with_name("overhead.json")


def readme_table(results: dict) -> str:
    """The README's overhead table (Markdown) for the results of one run, as written to
    ``--json``: ratios to the bare loop, and the bare loop's step time for scale.

    >>> mlp = {"bare": {"ms": 10.0, "ratio": 1.0}, "gradwatch": {"ms": 10.2, "ratio": 1.02}}
    >>> run = {"threads": 1, "rounds": 2, "machine": "torch 2.13.0, a CPU", "mlp": mlp}
    >>> print(readme_table(run), end="")
    | configuration | MLP 24 x (Linear(256) + ReLU) |
    |---|---|
    | bare loop | 1.000\u00d7 (10.0 ms) |
    | **gradwatch, defaults (every 15 steps)** | **1.020\u00d7** |
    <BLANKLINE>
    Median of 2 rounds; 1 thread, torch 2.13.0, a CPU.
    """
    models = [m for m in MODEL_TITLES if m in results]
    configs = [c for c in CONFIG_TITLES if any(c in results[m] for m in models)]
    lines = [
        "| configuration | " + " | ".join(MODEL_TITLES[m] for m in models) + " |",
        "|" + "---|" * (len(models) + 1),
    ]
    for config in configs:
        cells = []
        for model in models:
            measured = results[model].get(config)
            if measured is None:
                cells.append("-")
            elif config == "bare":
                cells.append(f"1.000{TIMES} ({measured['ms']:.1f} ms)")
            else:
                ratio = f"{measured['ratio']:.3f}{TIMES}"
                if config == "gradwatch":
                    ratio = f"**{ratio}**"
                if "low" in measured:
                    ratio += f" ({measured['low']:.2f}{DASH}{measured['high']:.2f})"
                cells.append(ratio)
        lines.append(f"| {CONFIG_TITLES[config]} | " + " | ".join(cells) + " |")
    threads, processes = results["threads"], results.get("processes", 1)
    where = f"{results['rounds']} rounds"
    if processes > 1:
        where = (
            f"{processes} fresh processes of {where} each (in brackets: the lowest and "
            "highest ratio of a process)"
        )
    lines += [
        "",
        f"Median of {where}; {threads} thread{'s' if threads > 1 else ''}, {results['machine']}.",
    ]
    return "\n".join(lines) + "\n"


def write_readme(results: dict, readme: Path) -> None:
    """Keep ``results`` next to this file and rewrite the README's table from them."""
    from gradwatch.demo.readme import replace_blocks

    kind, name = README_BLOCK
    try:
        text = replace_blocks(readme.read_text(), {name: readme_table(results)}, kind)
    except ValueError as error:
        raise SystemExit(f"{readme}: {error}") from None
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,mlp64,cnn,transformer,gpt2")
    parser.add_argument(
        "--configs", default="bare,gradwatch,gradwatch+loss,gradwatch/1,floor,wandb.watch,lightning"
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds per process")
    parser.add_argument("--steps", type=int, default=30, help="steps per block (15 divides it)")
    parser.add_argument(
        "--warmup", type=int, default=60, help="steps before timing (past the first detail steps)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--processes",
        type=int,
        default=3,
        help="fresh processes to run it in; each gets its own memory layout, which moves a "
        "copy's step time by a few percent: the median over processes is reported",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--readme",
        nargs="?",
        const="README.md",
        help="rewrite the README's overhead table from this run (and keep the numbers in "
        "benchmarks/overhead.json)",
    )
    parser.add_argument(
        "--from-json", help="no run: rewrite the README's table from a file written by --json"
    )
    args = parser.parse_args(argv)
    from gradwatch.demo.readme import machine

    if args.from_json:
        write_readme(json.loads(Path(args.from_json).read_text()), Path(args.readme or "README.md"))
        return 0

    names = args.configs.split(",")
    if "bare" not in names:
        names.insert(0, "bare")
    for case in args.models.split(","):
        if case not in CASES:
            parser.error(f"unknown model {case!r}; choose from {', '.join(CASES)}")
    if args.processes > 1:
        runs = [_child_run(args, i) for i in range(args.processes)]
        results = combine(runs)
    else:
        results = _measure_here(args, names)
    record = {
        "threads": args.threads,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "processes": args.processes,
        "machine": machine(),
        **results,
    }
    print(f"\nper-step time, ratio to bare ({record['machine']}, {args.threads} thread)\n")
    print(readme_table(record))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if args.readme:
        write_readme(record, Path(args.readme))
    return 0


def _measure_here(args: argparse.Namespace, names: list[str]) -> dict:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="gradwatch-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs
    results = {}
    for case in args.models.split(","):
        results[case] = measure(case, names, args.rounds, args.steps, args.warmup)
        print(f"{case}: done", file=sys.stderr)
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].run.finish()
    return results


def _child_run(args: argparse.Namespace, index: int) -> dict:
    """One fresh process's results: its own model copies, so its own memory layout."""
    print(f"process {index + 1} of {args.processes}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run.json"
        options = ["--models", args.models, "--configs", args.configs, "--rounds"]
        options += [str(args.rounds), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        options += ["--threads", str(args.threads), "--processes", "1", "--json", str(out)]
        subprocess.run([sys.executable, __file__, *options], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def combine(runs: list[dict]) -> dict:
    """Median over processes of each configuration's ratio (and step time), with the
    lowest and highest ratio seen.

    >>> def run(ms, gw_ms):
    ...     bare = {"ms": ms, "ratio": 1.0}
    ...     return {"mlp": {"bare": bare, "gradwatch": {"ms": gw_ms, "ratio": gw_ms / ms}}}
    >>> gw = combine([run(10.0, 10.1), run(10.0, 9.8), run(10.0, 10.2)])["mlp"]["gradwatch"]
    >>> {key: round(value, 3) for key, value in gw.items()}
    {'ms': 10.1, 'ratio': 1.01, 'low': 0.98, 'high': 1.02}
    """
    models = [m for m in runs[0] if isinstance(runs[0][m], dict)]
    combined: dict = {}
    for model in models:
        combined[model] = {}
        for config in runs[0][model]:
            ratios = [run[model][config]["ratio"] for run in runs]
            combined[model][config] = {
                "ms": statistics.median(run[model][config]["ms"] for run in runs),
                "ratio": statistics.median(ratios),
                "low": min(ratios),
                "high": max(ratios),
            }
    return combined


if __name__ == "__main__":
    sys.exit(main())
