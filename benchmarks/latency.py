"""How many steps after a problem starts gradwatch reports it, for every rule scenario.

Each scenario is one of the real training runs of ``tests/test_rules.py`` (plus the
gradient-flow scenarios of ``tests/test_rules_flow.py``), run with default watcher
settings. For a sick model the table gives the step at which the problem starts
(onset: 0 when it is there from the first step, the injection step when it is injected)
and the step of the first finding with the expected code; for a healthy model it gives
the first warning or error of any code (there should be none).

Run:  python benchmarks/latency.py                (about a minute on 2 CPU cores)
      python benchmarks/latency.py --json         (one JSON object per scenario)
      python benchmarks/latency.py --only moe     (scenarios whose name contains "moe")
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' models

import gradwatch
from tests import zoo
from tests.support import digits, mlp, train, train_with_zeroed_aux_grads


@dataclass
class Scenario:
    name: str
    build: Callable[[], nn.Module]
    #: the code of the expected finding; None for a healthy model (no warning or error)
    expect: str | None
    onset: int | None = 0
    steps: int = 60
    train: dict[str, Any] = field(default_factory=dict)
    #: codes that must stay absent although others may appear (None: any alarm counts)
    absent: tuple[str, ...] | None = None
    #: a custom loop instead of tests.support.train: (model, watcher) -> onset
    loop: Callable[[nn.Module, Any], int] | None = None
    watch: dict[str, Any] = field(default_factory=dict)
    #: training options that need the model or fresh data: model -> options
    extra: Callable[[nn.Module], dict[str, Any]] | None = None


def _inject_nan(step: int) -> Callable[[nn.Module], dict[str, Any]]:
    def before_step_for(model: nn.Module) -> dict[str, Any]:
        def inject(current: int) -> None:
            if current == step:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")

        return {"before_step": inject}

    return before_step_for


def _nan_in_data(model: nn.Module, watcher: Any) -> int:
    """One poisoned sample in the data; onset: the first step whose batch draws it."""
    x, y = digits()
    x[5, 3] = float("nan")
    generator = torch.Generator().manual_seed(0)
    onset = next(
        step
        for step in range(10_000)
        if (torch.randint(0, len(x), (64,), generator=generator) == 5).any()
    )
    train(model, watcher, steps=onset + 20, lr=0.05, x=x, y=y)
    return onset


def _zeroed_detached(model: nn.Module, watcher: Any) -> int:
    """The detached branch with gradients that exist but stay zero (set_to_none=False)."""
    train_with_zeroed_aux_grads(model, watcher, steps=60)
    return 0


def _moe_loss(model: nn.Module) -> dict[str, Any]:
    def loss_fn(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, labels) + 0.1 * model.balance_loss

    return {"loss_fn": loss_fn, "batch": 8}


def _confident_sigmoid() -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.mul_(300.0)
    return model


def _sigmoid_head() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10), nn.Sigmoid())


def _bce(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = (labels[:, None] == torch.arange(10)).float()
    return nn.functional.binary_cross_entropy(out, targets)


def _bce_with_logits(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = (labels[:, None] == torch.arange(10)).float()
    return nn.functional.binary_cross_entropy_with_logits(out, targets)


def _softmax_then_ce(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.softmax(dim=1), labels)


def _smoothed_weighted_ce(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    weight = torch.linspace(0.5, 2.0, out.shape[1])
    return nn.functional.cross_entropy(out, labels, weight=weight, label_smoothing=0.1)


def _raw_pixels(model: nn.Module) -> dict[str, Any]:
    x, y = digits(standardize=False)
    return {"x": x * 16, "y": y}


def _rounded_mse(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(torch.round(out).squeeze(1), labels.float())


def _separable(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clusters far apart: a hinge loss reaches exactly 0 on them."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 2, generator=g) + 6.0 * (labels[:, None].float() * 2 - 1), labels


#: q.k * sqrt(head size) instead of / sqrt(head size): zoo.CausalLM has 16-wide heads
_WRONG_SCALE = 4.0


def _lm(steps: int = 45, sequences: int = 512, **options: Any) -> Callable[[nn.Module, Any], int]:
    """Next-token training of a zoo.CausalLM on the copy task (tests/test_attention.py)."""

    def loop(model: nn.Module, watcher: Any) -> int:
        tokens = zoo.copy_task(n=sequences)
        zoo.train_lm(model, watcher, tokens, steps=steps, **options)
        return 0

    return loop


def _left_padded(model: nn.Module, watcher: Any) -> int:
    """Every 4th sequence left-padded by 5 tokens under a causal mask: rows with every key
    masked from the first step."""
    tokens = zoo.copy_task(n=64)
    padding = torch.zeros(64, 32, dtype=torch.bool)
    padding[::4, :5] = True
    zoo.train_lm(model, watcher, tokens, steps=5, key_padding=padding)
    return 0


def scenarios() -> list[Scenario]:
    tokens, labels = zoo.token_task()
    x, y = digits()
    sx, sy = _separable()
    return [
        # -- sick: tests/test_rules.py
        Scenario("deep sigmoid MLP (30)", lambda: mlp(30, nn.Sigmoid), "GW101", train={"lr": 0.1}),
        Scenario(
            "deep tanh MLP, small init",
            lambda: mlp(12, nn.Tanh, std=0.05),
            "GW101",
            train={"lr": 0.1},
        ),
        Scenario(
            "deep ReLU MLP, default init", lambda: mlp(30, nn.ReLU), "GW101", train={"lr": 0.1}
        ),
        Scenario(
            "ReLU layer biased to -4",
            lambda: zoo.relu_with_dead_layer(5, 2),
            "GW201",
            train={"lr": 0.05},
        ),
        Scenario(
            "dead layer behind F.relu",
            lambda: zoo.FunctionalReLU(5, dead_layer=2),
            "GW201",
            train={"lr": 0.05},
        ),
        Scenario(
            "ReLU killed by Adam lr=0.1",
            lambda: mlp(5, nn.ReLU, init="kaiming"),
            "GW201",
            steps=100,
            train={"lr": 0.1, "optimizer": "adam"},
        ),
        Scenario(
            "exploding init (std 1)",
            lambda: mlp(8, nn.ReLU, std=1.0),
            "GW102",
            steps=30,
            train={"lr": 0.01},
        ),
        Scenario(
            "NaN weight injected at step 45",
            lambda: mlp(4, nn.ReLU, init="kaiming"),
            "GW103",
            onset=45,
            train={"lr": 0.05},
            extra=_inject_nan(45),
        ),
        Scenario(
            "NaN sample in the data",
            lambda: mlp(4, nn.ReLU, init="kaiming"),
            "GW103",
            onset=None,
            loop=_nan_in_data,
        ),
        Scenario("detached sub-network", zoo.Detached, "GW104", train={"lr": 0.05}),
        Scenario("detached, zeroed grads", zoo.Detached, "GW104", loop=_zeroed_detached),
        Scenario(
            "raw 0-255 pixels, sigmoid",
            lambda: mlp(3, nn.Sigmoid),
            "GW202",
            train={"lr": 0.05},
            extra=_raw_pixels,
        ),
        # -- sick: tests/test_rules_flow.py
        Scenario(
            "round() bottleneck", lambda: zoo.Bottleneck("round"), "GW104", train={"lr": 0.05}
        ),
        Scenario(
            "round() bottleneck, Adam",
            lambda: zoo.Bottleneck("round"),
            "GW104",
            train={"lr": 1e-3, "optimizer": "adam"},
        ),
        Scenario(
            "round() bottleneck, no hooks",
            lambda: zoo.Bottleneck("round"),
            "GW104",
            train={"lr": 0.05},
            watch={"activations": False},
        ),
        Scenario(
            "argmax bottleneck", lambda: zoo.Bottleneck("argmax"), "GW104", train={"lr": 0.05}
        ),
        Scenario("int-cast bottleneck", lambda: zoo.Bottleneck("int"), "GW104", train={"lr": 0.05}),
        Scenario(
            "MoE, router never picks one",
            lambda: zoo.TopOneMoE(8, router_bias=[0, 0, 0, 0, 0, -10, 0, 0]),
            "GW104",
            steps=700,
            train={"lr": 0.05},
            extra=_moe_loss,
        ),
        # -- sick: tests/test_attention.py
        *(
            Scenario(
                f"attention q.k x sqrt(d), {via}",
                lambda variant=variant: zoo.CausalLM(variant=variant, scale=_WRONG_SCALE),
                "GW202",
                loop=_lm(),
            )
            for variant, via in [
                ("module", "nn.Softmax"),
                ("functional", "softmax"),
                ("sdpa", "SDPA"),
            ]
        ),
        Scenario(
            "attention logits grow, lr 1e-2",
            lambda: zoo.CausalLM(variant="sdpa"),
            "GW203",
            loop=_lm(steps=150, lr=1e-2, batch=32, sequences=2048),
        ),
        Scenario(
            "left padding + causal mask",
            lambda: zoo.CausalLM(variant="functional"),
            "GW103",
            loop=_left_padded,
        ),
        # -- sick: tests/test_loss_contract.py (what reaches the loss)
        Scenario(
            "nn.Softmax before cross_entropy",
            lambda: nn.Sequential(mlp(3, nn.ReLU, init="kaiming"), nn.Softmax(dim=1)),
            "GW301",
            train={"lr": 0.1},
        ),
        Scenario(
            "F.softmax in the loop, cross_entropy",
            lambda: mlp(3, nn.ReLU, init="kaiming"),
            "GW301",
            train={"lr": 0.1, "loss_fn": _softmax_then_ce},
        ),
        Scenario(
            "nn.Sigmoid before BCEWithLogitsLoss",
            lambda: nn.Sequential(mlp(3, nn.ReLU, init="kaiming"), nn.Sigmoid()),
            "GW301",
            train={"lr": 0.1, "loss_fn": _bce_with_logits},
        ),
        Scenario(
            "nll_loss on raw logits",
            lambda: mlp(3, nn.ReLU, init="kaiming"),
            "GW301",
            train={"lr": 0.05, "loss_fn": nn.functional.nll_loss},
        ),
        Scenario(
            "ReLU after the last layer",
            lambda: nn.Sequential(mlp(3, nn.ReLU, init="kaiming"), nn.ReLU()),
            "GW302",
            train={"lr": 0.1},
        ),
        Scenario(
            "sigmoid + BCELoss, raw pixels",
            lambda: nn.Sequential(mlp(2, std=1.0), nn.Sigmoid()),
            "GW303",
            train={"lr": 0.1, "loss_fn": _bce},
            extra=_raw_pixels,
        ),
        # -- sick: tests/test_recurrent.py, tests/test_zero_gradient.py
        Scenario(
            "tanh RNN, recurrent gain 3, 32 steps",
            lambda: zoo.SequenceClassifier("rnn", steps=32, hidden=64, recurrent_gain=3.0),
            "GW102",
            train={"lr": 1e-3, "optimizer": "adam"},
        ),
        Scenario(
            "LSTM, recurrent gain 6, 64 steps",
            lambda: zoo.SequenceClassifier("lstm", steps=64, hidden=64, recurrent_gain=6.0),
            "GW102",
            train={"lr": 1e-3, "optimizer": "adam"},
        ),
        Scenario(
            "sigmoid + BCELoss, all gradients 0",
            _sigmoid_head,
            "GW108",
            onset=1,
            train={"lr": 0.5, "loss_fn": _bce},
            extra=_raw_pixels,
        ),
        Scenario(
            "round() before the loss",
            lambda: mlp(3, nn.ReLU, outputs=1, init="kaiming"),
            "GW108",
            train={"lr": 0.05, "loss_fn": _rounded_mse},
        ),
        # -- healthy: tests/test_rules.py
        Scenario(
            "He-init ReLU MLP (8)",
            lambda: mlp(8, nn.ReLU, init="kaiming"),
            None,
            steps=200,
            train={"lr": 0.05},
        ),
        Scenario(
            "He-init ReLU MLP (30)",
            lambda: mlp(30, nn.ReLU, init="kaiming"),
            None,
            steps=100,
            train={"lr": 0.01},
        ),
        Scenario(
            "residual sigmoid MLP (30)",
            lambda: zoo.ResidualMLP(30),
            None,
            steps=200,
            train={"lr": 0.1},
        ),
        Scenario("BatchNorm ResNet CNN", zoo.SmallResNet, None, steps=100, train={"lr": 0.05}),
        Scenario(
            "transformer, Adam",
            zoo.TinyTransformer,
            None,
            steps=150,
            train={"lr": 1e-3, "optimizer": "adam", "x": tokens, "y": labels},
        ),
        Scenario(
            "transformer, SGD",
            zoo.TinyTransformer,
            None,
            steps=150,
            train={"lr": 0.05, "x": tokens, "y": labels},
        ),
        Scenario("frozen backbone", zoo.FrozenBackbone, None, steps=100, train={"lr": 0.05}),
        Scenario(
            "converged logistic regression",
            lambda: nn.Linear(64, 10),
            None,
            steps=400,
            train={"lr": 0.5, "x": x, "y": y},
        ),
        Scenario("GELU MLP (4)", lambda: mlp(4, nn.GELU), None, steps=200, train={"lr": 0.1}),
        Scenario(
            "GELU MLP (6), He init",
            lambda: mlp(6, nn.GELU, init="kaiming"),
            None,
            steps=200,
            train={"lr": 0.1},
        ),
        Scenario(
            "LeakyReLU MLP (8)",
            lambda: mlp(8, nn.LeakyReLU, init="kaiming"),
            None,
            steps=200,
            train={"lr": 0.05},
        ),
        Scenario(
            "LeakyReLU, lr=0.5",
            lambda: mlp(5, nn.LeakyReLU, init="kaiming"),
            None,
            steps=100,
            train={"lr": 0.5},
            absent=("GW201",),
        ),
        Scenario(
            "sigmoid MLP (10), Adam",
            lambda: mlp(10, nn.Sigmoid),
            None,
            train={"lr": 1e-3, "optimizer": "adam"},
            absent=("GW101",),
        ),
        Scenario(
            "label smoothing + class weights",
            lambda: mlp(3, nn.ReLU, init="kaiming"),
            None,
            steps=200,
            train={"lr": 0.05, "loss_fn": _smoothed_weighted_ce},
        ),
        Scenario(
            "multilabel sigmoid, BCEWithLogitsLoss",
            lambda: mlp(3, nn.ReLU, init="kaiming"),
            None,
            steps=200,
            train={"lr": 0.05, "loss_fn": _bce_with_logits},
        ),
        Scenario(
            "confident sigmoid output",
            _confident_sigmoid,
            None,
            train={"lr": 0.05, "loss_fn": _bce},
            absent=("GW202",),
        ),
        # -- healthy: tests/test_recurrent.py, tests/test_zero_gradient.py
        Scenario(
            "LSTM classifier (8 steps), Adam",
            lambda: zoo.SequenceClassifier("lstm"),
            None,
            steps=150,
            train={"lr": 1e-2, "optimizer": "adam"},
        ),
        Scenario(
            "GRU classifier (32 steps, h_n), Adam",
            lambda: zoo.SequenceClassifier("gru", steps=32, read_state=True),
            None,
            steps=150,
            train={"lr": 1e-2, "optimizer": "adam"},
        ),
        Scenario(
            "2-layer LSTM, SGD",
            lambda: zoo.SequenceClassifier("lstm", layers=2),
            None,
            steps=150,
            train={"lr": 0.05},
        ),
        Scenario(
            "tanh RNN (8 steps), SGD",
            lambda: zoo.SequenceClassifier("rnn"),
            None,
            steps=150,
            train={"lr": 0.05},
        ),
        Scenario("RNNCell loop, SGD", zoo.CellLoop, None, steps=150, train={"lr": 0.05}),
        Scenario(
            "hinge loss reaching 0",
            lambda: nn.Linear(2, 2),
            None,
            steps=150,
            train={"lr": 0.1, "x": sx, "y": sy, "loss_fn": nn.MultiMarginLoss()},
        ),
        # -- healthy: tests/test_rules_flow.py
        Scenario(
            "round() bottleneck with STE",
            lambda: zoo.Bottleneck("round", ste=True),
            None,
            train={"lr": 0.05},
        ),
        Scenario(
            "MoE, experts skip steps",
            lambda: zoo.TopOneMoE(8),
            None,
            steps=300,
            train={"lr": 0.05},
            extra=_moe_loss,
        ),
        # -- healthy: tests/test_attention.py
        Scenario("causal LM, usual scale", lambda: zoo.CausalLM(variant="sdpa"), None, loop=_lm()),
        Scenario(
            "causal LM, 12 pre-LN blocks",
            lambda: zoo.CausalLM(blocks=12, variant="sdpa"),
            None,
            loop=_lm(steps=46),
        ),
        Scenario(
            "causal LM, bf16 autocast",
            lambda: zoo.CausalLM(variant="functional"),
            None,
            loop=_lm(steps=46, batch=8, autocast=torch.bfloat16),
        ),
        Scenario(
            "attention sharpened by training",
            lambda: zoo.CausalLM(variant="functional"),
            None,
            loop=_lm(steps=166, lr=3e-3, batch=32, sequences=2048),
        ),
    ]


def run(scenario: Scenario) -> dict[str, Any]:
    torch.manual_seed(0)
    model = scenario.build()
    watcher = gradwatch.watch(model, reporters=[], **scenario.watch)
    started = time.perf_counter()
    if scenario.loop is not None:
        onset = scenario.loop(model, watcher)
    else:
        options = dict(scenario.train)
        if scenario.extra is not None:
            options.update(scenario.extra(model))
        train(model, watcher, steps=scenario.steps, **options)
        onset = scenario.onset if scenario.onset is not None else 0
    watcher.close()
    alarms = [
        f for f in watcher.findings if f.severity in ("warning", "error") and f.status != "resolved"
    ]
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "expected": scenario.expect or "silent",
        "onset": onset if scenario.expect else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if scenario.expect:
        first = next((f for f in alarms if f.code == scenario.expect), None)
        row["first_finding"] = first.step if first else None
        row["latency"] = first.step - onset if first else None
        row["layers"] = list(first.layers[:3]) if first else []
        others = [f for f in alarms if f.code != scenario.expect]
    else:
        watched = scenario.absent
        others = [f for f in alarms if watched is None or f.code in watched]
        row["first_finding"] = None
        row["latency"] = None
        row["layers"] = []
    row["other_alarms"] = [f"{f.code}@{f.step}" for f in others[:4]]
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["scenario", "expected", "onset", "first", "latency", "other alarms"]
    lines = [head]
    for r in rows:
        lines.append(
            [
                r["scenario"],
                r["expected"],
                "-" if r["onset"] is None else str(r["onset"]),
                "-" if r["first_finding"] is None else str(r["first_finding"]),
                "-" if r["latency"] is None else str(r["latency"]),
                ", ".join(r["other_alarms"]) or "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("--only", default="", help="run scenarios whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for scenario in scenarios():
        if args.only.lower() not in scenario.name.lower():
            continue
        row = run(scenario)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
