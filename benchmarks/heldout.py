"""Held-out scorer: small real training runs that are not in the issues or the tests.

Each scenario is a real training run (a few seconds on one CPU thread) on
scikit-learn's digits or synthetic data, watched with the public API only
(``gradwatch.watch(model, optimizer=...)``, ``watcher.step(loss=loss)``,
``watcher.close()``, ``watcher.findings``). Sick runs carry a bug a user makes; they
must be found with the right rule, on the right layers, before the damage is done.
Healthy runs must stay silent with every rule on, at the default ``every_n_steps``, at
``every_n_steps=5`` and without ``optimizer=`` (the README's first form, ``watch(model)``;
shown as ``15/-o``).

Rules are matched by slug (codes may be renumbered when branches meet)::

    python benchmarks/heldout.py                 # every scenario, a table and totals
    python benchmarks/heldout.py --only gan      # scenarios whose name contains "gan"
    python benchmarks/heldout.py --json out.json

Verdicts: ``hit`` (expected rule, right layers, in time), ``late`` (found after the
damage), ``wrong layer``, ``miss``, ``silent`` / ``false alarm`` for healthy runs.
``said`` is a sick run where gradwatch printed a notice instead of a finding (accepted
where the scenario says so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- data

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images scaled to [0, 1] (1,797 x 64) and their labels."""
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        _DIGITS = (x, torch.tensor(data.target, dtype=torch.long))
    return _DIGITS


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int = 0) -> Iterator[Any]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (size,), generator=gen)
        yield x[idx], y[idx]


def images(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 1, 8, 8)


def rows(x: torch.Tensor) -> torch.Tensor:
    """Digits as sequences: 8 time steps of 8 pixels."""
    return x.view(-1, 8, 8)


def multilabel(y: torch.Tensor) -> torch.Tensor:
    """Four labels per digit: even, > 4, prime, round (0, 6, 8, 9)."""
    even = y % 2 == 0
    big = y > 4
    prime = (y == 2) | (y == 3) | (y == 5) | (y == 7)
    round_ = (y == 0) | (y == 6) | (y == 8) | (y == 9)
    return torch.stack([even, big, prime, round_], 1).float()


# --------------------------------------------------------------------------- models


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10, end: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, classes)
        self.end = end if end is not None else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.pool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.end(self.fc(self.features(x)))


def mlp(
    sizes: list[int], act: type[nn.Module] = nn.ReLU, end: nn.Module | None = None
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
    if end is not None:
        layers.append(end)
    return nn.Sequential(*layers)


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: str = "gru", hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        kind = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell]
        self.rnn = kind(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 32, length: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        h = self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.out(h)


def lm_data(n: int = 512, length: int = 17, vocab: int = 16, seed: int = 0) -> torch.Tensor:
    """Sequences that count up from a random start (mod vocab), with a random stride 1-3."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    return (start + stride * torch.arange(length)) % vocab


class MoE(nn.Module):
    """Top-1 mixture of experts; ``routable`` experts are the ones the router may pick."""

    def __init__(self, experts: int = 4, routable: int | None = None, hashed: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 32)
        self.router = nn.Linear(32, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(experts)
        )
        self.head = nn.Linear(32, 10)
        self.routable = routable or experts
        self.hashed = hashed
        if not hashed:  # a spread-out router, so that learned routing does not collapse at once
            with torch.no_grad():
                self.router.weight.normal_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        gates = self.router(h)[:, : self.routable].softmax(-1)
        weight, choice = gates.max(-1)
        if self.hashed:  # hash routing (Roller et al., 2021): balanced whatever the router learns
            choice = (x.sum(1) * 1000).long() % self.routable
            weight = gates.gather(1, choice[:, None]).squeeze(1)
        out = torch.zeros_like(h)
        for i, expert in enumerate(self.experts):
            picked = choice == i
            if picked.any():
                out[picked] = expert(h[picked]) * weight[picked, None]
        return self.head(h + out)


# ------------------------------------------------------------------------ the harness


@dataclass
class Run:
    """What one scenario's run produced."""

    findings: list[tuple[int, str, str, tuple[str, ...]]] = field(default_factory=list)
    details: list[dict[str, Any]] = field(default_factory=list)  # message and evidence
    losses: list[float] = field(default_factory=list)
    output: str = ""
    error: str = ""
    damage_step: int | None = None  # step by which a sick run must be found


class Harness:
    """Builds watchers with the run's options and records findings at the loop's step."""

    def __init__(self, every: int | None, without_optimizer: bool = False) -> None:
        self.every = every
        self.without_optimizer = without_optimizer  # the README's first form: watch(model)
        self.watchers: list[Any] = []
        self.seen: dict[int, int] = {}
        self.run = Run()
        self.step_index = 0

    def watch(self, model: nn.Module, **options: Any) -> Any:
        if self.every is not None:
            options.setdefault("every_n_steps", self.every)
        if self.without_optimizer:
            options.pop("optimizer", None)
        watcher = gradwatch.watch(model, **options)
        self.watchers.append(watcher)
        self.seen[id(watcher)] = 0
        return watcher

    def observe(self, loss: torch.Tensor | float | None = None) -> None:
        """Call once per loop iteration, after the optimizer step."""
        if loss is not None:
            self.run.losses.append(float(loss))
        for watcher in self.watchers:
            found = watcher.findings
            for finding in found[self.seen[id(watcher)] :]:
                if getattr(finding, "status", "new") != "new":
                    continue  # the end of an earlier finding (resolved), not a new one
                layers = tuple(str(name) for name in finding.layers)
                self.run.findings.append((self.step_index, finding.code, finding.rule, layers))
                self.run.details.append(
                    {"message": finding.message, "evidence": _plain(finding.evidence)}
                )
            self.seen[id(watcher)] = len(found)
        self.step_index += 1

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.close()
        self.observe()


def _plain(evidence: Any) -> Any:
    try:
        return json.loads(json.dumps(evidence, default=str))
    except (TypeError, ValueError):
        return str(evidence)


@dataclass
class Scenario:
    name: str
    train: Callable[[Harness], None]
    expect: tuple[str, ...] = ()  # rule slugs, any of them; () = must stay silent
    layers: tuple[str, ...] = ()  # a finding must name one of these (or a child); () = any
    forbid: tuple[str, ...] = ()  # ... and none of these (healthy parts of a sick model)
    deadline: int | None = None  # must be found by this loop step (None: by the end)
    notice: tuple[str, ...] = ()  # words of a printed notice accepted instead of a finding
    healthy_claim_is_miss: bool = False  # a "no findings" summary is a miss
    note: str = ""

    @property
    def sick(self) -> bool:
        return bool(self.expect)


def classify(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    h: Harness,
    steps: int,
    data: Iterator[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    shape: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    sched: Any = None,
    watch: bool = True,
    **options: Any,
) -> None:
    """The textbook loop: zero_grad, forward, backward, watcher.step(loss), step."""
    watcher = h.watch(model, optimizer=opt, **options) if watch else None
    for _ in range(steps):
        x, y = next(data)
        loss = loss_fn(model(shape(x)), y)
        opt.zero_grad()
        loss.backward()
        if watcher is not None:
            watcher.step(loss=loss)
        opt.step()
        if sched is not None:
            sched.step()
        h.observe(loss)


def damage_at_peak(h: Harness) -> None:
    """The damage of a divergence: the first non-finite loss, else the highest loss."""
    losses = h.run.losses
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            h.run.damage_step = i
            return
    h.run.damage_step = max(range(len(losses)), key=losses.__getitem__)


# ----------------------------------------------------------------------- sick runs


def diverge_rmsprop(h: Harness) -> None:
    """A warm-up without an end: the lr grows linearly forever (LambdaLR(t + 1))."""
    torch.manual_seed(1)
    x, y = digits()
    model = mlp([64, 64, 64, 10], act=lambda: nn.LeakyReLU(0.1))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: t + 1)
    classify(model, opt, h, 150, batches(x, y, 32), sched=sched)
    damage_at_peak(h)


def diverge_adamw_cnn(h: Harness) -> None:
    """Regression with a GELU CNN, AdamW warmed up over 100 steps to an lr of 1.0."""
    torch.manual_seed(2)
    x, y = digits()
    model = SmallCNN(classes=1)
    model.act1, model.act2 = nn.GELU(), nn.GELU()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 100))
    target = y.float().unsqueeze(1)
    classify(
        model, opt, h, 150, batches(x, target, 32), loss_fn=F.mse_loss, shape=images, sched=sched
    )
    damage_at_peak(h)


def diverge_sgd_momentum(h: Harness) -> None:
    """Regression with SGD + Nesterov momentum at a learning rate past the stable edge."""
    torch.manual_seed(3)
    x, y = digits()
    target = (y.float() / 9.0).unsqueeze(1)
    model = mlp([64, 48, 48, 1], act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    classify(model, opt, h, 150, batches(x * 2.0, target, 64), loss_fn=F.mse_loss)
    damage_at_peak(h)


def forgot_zero_grad_cnn(h: Harness) -> None:
    torch.manual_seed(4)
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        loss = F.cross_entropy(model(images(xb)), yb)
        loss.backward()  # no zero_grad anywhere
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def zero_grad_one_group(h: Harness) -> None:
    """Two param groups (body, head); the loop clears only the head's gradients."""
    torch.manual_seed(5)
    x, y = digits()
    model = nn.ModuleDict({"body": mlp([64, 64, 32]), "head": nn.Linear(32, 10)})
    opt = torch.optim.Adam(
        [
            {"params": model["body"].parameters(), "lr": 1e-3},
            {"params": model["head"].parameters(), "lr": 3e-3},
        ]
    )
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        loss = F.cross_entropy(model["head"](torch.relu(model["body"](xb))), yb)
        for p in opt.param_groups[1]["params"]:
            p.grad = None
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp([64, 64, 32])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def head_after_optimizer(h: Harness) -> None:
    """Fine-tuning: the new 5-class head replaces the old one after the optimizer was built."""
    torch.manual_seed(6)
    x, y = digits()
    keep = y < 5
    model = Backbone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.head = nn.Linear(32, 5)
    classify(model, opt, h, 90, batches(x[keep], y[keep], 32))


def lr_zero_group(h: Harness) -> None:
    torch.manual_seed(7)
    x, y = digits()
    model = Backbone()
    opt = torch.optim.SGD(
        [{"params": model.body.parameters(), "lr": 0.0}, {"params": model.head.parameters()}],
        lr=0.05,
        momentum=0.9,
    )
    classify(model, opt, h, 90, batches(x, y, 32))


def deep_sigmoid() -> nn.Sequential:
    torch.manual_seed(8)
    return mlp([64] + [32] * 24 + [10], act=nn.Sigmoid)


def step_before_backward_opt(h: Harness) -> None:
    """watcher.step() before backward(), optimizer given: the deep sigmoid net is still seen."""
    x, y = digits()
    model = deep_sigmoid()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        watcher.step(loss=loss)
        loss.backward()
        opt.step()
        h.observe(loss)


def step_after_zero_grad(h: Harness) -> None:
    """watcher.step() after zero_grad(), no optimizer given: the summary must not claim health."""
    x, y = digits()
    model = deep_sigmoid()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = h.watch(model)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        watcher.step(loss=loss)
        h.observe(loss)


def optimizer_in_backward(h: Harness) -> None:
    """Per-parameter Adagrad stepped in post-accumulate-grad hooks, on the deep sigmoid net."""
    x, y = digits()
    model = deep_sigmoid()
    opts = {p: torch.optim.SGD([p], lr=0.05) for p in model.parameters()}

    def step_now(p: torch.Tensor) -> None:
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)

    handles = [p.register_post_accumulate_grad_hook(step_now) for p in model.parameters()]
    watcher = h.watch(model)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        watcher.step(loss=loss)
        h.observe(loss)
    for handle in handles:
        handle.remove()


def never_routed_expert(h: Harness) -> None:
    """The router's logits are sliced to 3 of 4 experts: expert 3 never gets a token."""
    torch.manual_seed(9)
    x, y = digits()
    model = MoE(experts=4, routable=3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    classify(model, opt, h, 100, batches(x, y, 32))


def tiny_loss_scale(h: Harness) -> None:
    """The loss is scaled by 1e-6 (a leftover of a manual loss-scaling) under plain SGD."""
    torch.manual_seed(10)
    x, y = digits()
    model = mlp([64, 64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    classify(
        model, opt, h, 120, batches(x, y, 32), loss_fn=lambda o, t: F.cross_entropy(o, t) * 1e-6
    )


def softmax_into_ce_cnn(h: Harness) -> None:
    torch.manual_seed(11)
    x, y = digits()
    model = SmallCNN(end=nn.Softmax(dim=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    classify(model, opt, h, 60, batches(x, y, 32), shape=images)


def nll_on_logits_gru(h: Harness) -> None:
    torch.manual_seed(12)
    x, y = digits()
    model = RecurrentClassifier("gru")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    classify(model, opt, h, 60, batches(x, y, 32), loss_fn=F.nll_loss, shape=rows)


def sigmoid_into_bce_logits(h: Harness) -> None:
    torch.manual_seed(13)
    x, y = digits()
    model = mlp([64, 64, 4], end=nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.BCEWithLogitsLoss()
    classify(model, opt, h, 60, batches(x, multilabel(y), 32), loss_fn=criterion)


def relu_after_last(h: Harness) -> None:
    torch.manual_seed(14)
    x, y = digits()
    model = mlp([64, 64, 10], end=nn.ReLU())
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    classify(model, opt, h, 90, batches(x, y, 32))


def sigmoid_bce_saturated(h: Harness) -> None:
    """Unnormalised inputs (raw 0-16 pixels x 10) into a sigmoid + BCELoss: stuck at 0/1."""
    torch.manual_seed(15)
    x, y = digits()
    target = (y >= 5).float().unsqueeze(1)
    model = mlp([64, 32, 1], end=nn.Sigmoid())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    classify(model, opt, h, 60, batches(x * 160.0, target, 32), loss_fn=nn.BCELoss())


class VanillaRNN(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 48, batch_first=True)
        self.head = nn.Linear(48, 2)
        with torch.no_grad():
            self.rnn.weight_hh_l0.normal_(0.0, scale / math.sqrt(48))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def exploding_rnn(h: Harness) -> None:
    """Tanh RNN over 40 time steps with a recurrent init of spectral radius ~3."""
    torch.manual_seed(16)
    gen = torch.Generator().manual_seed(16)
    seq = torch.randn(2048, 40, 4, generator=gen) * 0.1
    label = (seq[:, :5, 0].sum(1) > 0).long()
    model = VanillaRNN(scale=3.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    classify(model, opt, h, 60, batches(seq, label, 32))


class CellRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.RNNCell(4, 40)
        self.head = nn.Linear(40, 2)
        with torch.no_grad():  # spectral radius ~3
            self.cell.weight_hh.normal_(0.0, 3.0 / math.sqrt(40))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros(x.shape[0], 40)
        for t in range(x.shape[1]):
            hidden = self.cell(x[:, t], hidden)
        return self.head(hidden)


def exploding_rnn_cell(h: Harness) -> None:
    """An RNNCell unrolled by hand over 48 time steps, Adagrad (the label is in the first
    steps: the gradient must travel back through all of them)."""
    torch.manual_seed(17)
    gen = torch.Generator().manual_seed(17)
    seq = torch.randn(2048, 48, 4, generator=gen) * 0.1
    label = (seq[:, :4, 1].sum(1) > 0).long()
    model = CellRNN()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)
    classify(model, opt, h, 60, batches(seq, label, 32))


def detach_before_head(h: Harness) -> None:
    """features.detach(): the CNN body never learns; only the head gets a gradient."""
    torch.manual_seed(18)
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        loss = F.cross_entropy(model.fc(model.features(images(xb)).detach()), yb)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def detach_output_all_zero(h: Harness) -> None:
    """Logits detached and re-enabled (a broken wrapper): every gradient exactly 0."""
    torch.manual_seed(19)
    x, y = digits()
    model = mlp([64, 64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    for _ in range(90):
        xb, yb = next(data)
        logits = model(xb).detach().requires_grad_()
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def rounded_predictions(h: Harness) -> None:
    """Regression of the digit's value with the prediction rounded before the loss (to
    score whole digits): torch.round passes back exactly 0, so every gradient is 0."""
    torch.manual_seed(48)
    x, y = digits()
    model = mlp([64, 64, 1])
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    target = y.float().unsqueeze(1)
    classify(
        model, opt, h, 90, batches(x, target, 32), loss_fn=lambda o, t: F.mse_loss(o.round(), t)
    )


def optimizer_on_body_only(h: Harness) -> None:
    """The optimizer is built from model.body.parameters(): the head is never trained."""
    torch.manual_seed(49)
    x, y = digits()
    model = Backbone()
    opt = torch.optim.Adagrad(model.body.parameters(), lr=0.05)
    classify(model, opt, h, 90, batches(x, y, 32))


# --------------------------------------------------------------------- healthy runs


def adam_cnn_batch8(h: Harness) -> None:
    torch.manual_seed(20)
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    classify(model, opt, h, 300, batches(x, y, 8), shape=images)


def warmup_cosine_adamw(h: Harness) -> None:
    torch.manual_seed(21)
    x, y = digits()
    model = mlp([64, 128, 64, 10], act=nn.GELU)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    total, warm = 300, 30

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / (total - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    classify(model, opt, h, total, batches(x, y, 32), sched=sched)


def onecycle_sgd(h: Harness) -> None:
    torch.manual_seed(22)
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=300)
    classify(model, opt, h, 300, batches(x, y, 32), shape=images, sched=sched)


def sgdr_restarts(h: Harness) -> None:
    torch.manual_seed(23)
    x, y = digits()
    model = mlp([64, 64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=60)
    classify(model, opt, h, 300, batches(x, y, 32), sched=sched)


def curriculum(h: Harness) -> None:
    """Digits 0-4 for 150 steps, then all ten: the loss jumps once and recovers."""
    torch.manual_seed(24)
    x, y = digits()
    easy = y < 5
    model = mlp([64, 64, 10])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    watcher = h.watch(model, optimizer=opt)
    first, second = batches(x[easy], y[easy], 32), batches(x, y, 32, seed=1)
    for i in range(300):
        xb, yb = next(first if i < 150 else second)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def accumulate_k4(h: Harness) -> None:
    """Gradient accumulation: 4 micro-batches of 8 per optimizer step."""
    torch.manual_seed(25)
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 8)
    for i in range(400):
        xb, yb = next(data)
        loss = F.cross_entropy(model(images(xb)), yb) / 4
        loss.backward()
        if (i + 1) % 4 == 0:
            watcher.step(loss=loss * 4)
            opt.step()
            opt.zero_grad()
        h.observe(loss * 4)


def label_smoothing(h: Harness) -> None:
    torch.manual_seed(26)
    x, y = digits()
    model = mlp([64, 128, 10])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    classify(
        model, opt, h, 400, batches(x, y, 64), loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1)
    )


def class_weighted(h: Harness) -> None:
    torch.manual_seed(27)
    x, y = digits()
    keep = (y >= 3) | (torch.arange(len(y)) % 6 == 0)  # classes 0-2 rare
    weight = torch.tensor([4.0, 4.0, 4.0] + [1.0] * 7)
    model = mlp([64, 64, 10])
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    classify(
        model,
        opt,
        h,
        300,
        batches(x[keep], y[keep], 32),
        loss_fn=nn.CrossEntropyLoss(weight=weight),
    )


def mixup(h: Harness) -> None:
    torch.manual_seed(28)
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    beta = torch.distributions.Beta(0.4, 0.4)
    for _ in range(300):
        xb, yb = next(data)
        lam = float(beta.sample())
        perm = torch.randperm(len(xb))
        mixed = lam * xb + (1 - lam) * xb[perm]
        soft = lam * F.one_hot(yb, 10).float() + (1 - lam) * F.one_hot(yb[perm], 10).float()
        loss = F.cross_entropy(model(images(mixed)), soft)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def distillation(h: Harness) -> None:
    """A trained teacher (not watched), a small student: KL at T=4 plus hard-label CE."""
    torch.manual_seed(29)
    x, y = digits()
    teacher = mlp([64, 128, 10])
    topt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    data = batches(x, y, 64, seed=5)
    for _ in range(150):
        xb, yb = next(data)
        topt.zero_grad()
        F.cross_entropy(teacher(xb), yb).backward()
        topt.step()
    teacher.eval()
    student = mlp([64, 24, 10])
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    temp = 4.0

    watcher = h.watch(student, optimizer=opt)
    data = batches(x, y, 32)
    for _ in range(300):
        xb, yb = next(data)
        with torch.no_grad():
            soft = F.softmax(teacher(xb) / temp, dim=1)
        out = student(xb)
        kd = F.kl_div(F.log_softmax(out / temp, dim=1), soft, reduction="batchmean") * temp**2
        loss = 0.7 * kd + 0.3 * F.cross_entropy(out, yb)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def infonce(h: Harness) -> None:
    """Contrastive pairs (two noisy views of a digit), InfoNCE at temperature 0.07."""
    torch.manual_seed(30)
    x, _ = digits()
    encoder = mlp([64, 128, 32])
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    watcher = h.watch(encoder, optimizer=opt)
    gen = torch.Generator().manual_seed(30)
    for _ in range(250):
        xb = x[torch.randint(0, len(x), (64,), generator=gen)]
        v1 = xb + 0.1 * torch.randn(xb.shape, generator=gen)
        v2 = xb * (torch.rand(xb.shape, generator=gen) > 0.2)
        z1, z2 = F.normalize(encoder(v1), dim=1), F.normalize(encoder(v2), dim=1)
        logits = z1 @ z2.T / 0.07
        loss = F.cross_entropy(logits, torch.arange(len(xb)))
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def multilabel_bce(h: Harness) -> None:
    torch.manual_seed(31)
    x, y = digits()
    model = SmallCNN(classes=4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    classify(
        model,
        opt,
        h,
        300,
        batches(x, multilabel(y), 32),
        loss_fn=nn.BCEWithLogitsLoss(),
        shape=images,
    )


def lstm_classifier(h: Harness) -> None:
    torch.manual_seed(32)
    x, y = digits()
    model = RecurrentClassifier("lstm")
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    classify(model, opt, h, 300, batches(x, y, 32), shape=rows)


def gru_classifier(h: Harness) -> None:
    torch.manual_seed(33)
    x, y = digits()
    model = RecurrentClassifier("gru")
    opt = torch.optim.RMSprop(model.parameters(), lr=2e-3)
    classify(model, opt, h, 300, batches(x, y, 32), shape=rows)


def tiny_transformer_lm(h: Harness) -> None:
    torch.manual_seed(34)
    data = lm_data()
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    watcher = h.watch(model, optimizer=opt)
    gen = torch.Generator().manual_seed(34)
    for _ in range(200):
        seq = data[torch.randint(0, len(data), (16,), generator=gen)]
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 16), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def memorised(h: Harness) -> None:
    """64 samples, full batch, trained to a loss ~1e-4 and then on and on."""
    torch.manual_seed(35)
    x, y = digits()
    xs, ys = x[:64], y[:64]
    model = mlp([64, 128, 10])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    classify(model, opt, h, 500, iter(lambda: (xs, ys), None))


def frozen_backbone(h: Harness) -> None:
    torch.manual_seed(36)
    x, y = digits()
    model = Backbone()
    for p in model.body.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9)
    classify(model, opt, h, 200, batches(x, y, 32))


def frozen_in_optimizer(h: Harness) -> None:
    """Optimizer built on every parameter, then the backbone frozen (common in fine-tuning)."""
    torch.manual_seed(37)
    x, y = digits()
    model = Backbone()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for p in model.body.parameters():
        p.requires_grad_(False)
    classify(model, opt, h, 200, batches(x, y, 32))


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp([16, 64, 64], end=nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def gan_loop(h: Harness, mode: str) -> None:
    """Non-saturating GAN on digits: G and D, each with its own Adam."""
    torch.manual_seed(38)
    x, _ = digits()
    gen, disc = Generator(), mlp([64, 64, 1], act=lambda: nn.LeakyReLU(0.2))
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    if mode == "separate":
        wg, wd = h.watch(gen, optimizer=opt_g), h.watch(disc, optimizer=opt_d)
    else:
        both = nn.ModuleDict({"gen": gen, "disc": disc})
        wg, wd = h.watch(both), None
    data = batches(x, torch.zeros(len(x)), 32)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(200):
        real, _ = next(data)
        z = torch.randn(32, 16)
        fake = gen(z)
        d_loss = bce(disc(real), torch.ones(32, 1)) + bce(disc(fake.detach()), torch.zeros(32, 1))
        opt_d.zero_grad()
        d_loss.backward()
        if wd is not None:
            wd.step(loss=d_loss)
        opt_d.step()
        g_loss = bce(disc(fake), torch.ones(32, 1))
        opt_g.zero_grad()
        g_loss.backward()
        wg.step(loss=g_loss)
        opt_g.step()
        h.observe(g_loss)


def balanced_moe(h: Harness) -> None:
    torch.manual_seed(39)
    x, y = digits()
    model = MoE(experts=4, hashed=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    classify(model, opt, h, 200, batches(x, y, 8))


def decay_some_groups(h: Harness) -> None:
    torch.manual_seed(40)
    x, y = digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [
        p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=2e-3
    )
    classify(model, opt, h, 300, batches(x, y, 32))


def hand_written_optimizer(h: Harness) -> None:
    """Sign-SGD with momentum written by hand (no torch.optim), watcher told nothing."""
    torch.manual_seed(41)
    x, y = digits()
    model = mlp([64, 64, 64, 10])
    watcher = h.watch(model)
    buf = {p: torch.zeros_like(p) for p in model.parameters()}
    data = batches(x, y, 32)
    for i in range(300):
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        model.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        lr = 1e-3 * (0.5 if i > 200 else 1.0)
        with torch.no_grad():
            for p in model.parameters():
                buf[p].mul_(0.9).add_(p.grad, alpha=0.1)
                p.sub_(lr * buf[p].sign())
        h.observe(loss)


def adagrad_bn_cnn(h: Harness) -> None:
    torch.manual_seed(42)
    x, y = digits()
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 64, 10),
    )  # fmt: skip
    opt = torch.optim.Adagrad(model.parameters(), lr=0.02)
    classify(model, opt, h, 250, batches(x, y, 16), shape=images)


def plateau_sgd(h: Harness) -> None:
    """SGD with momentum, lr cut by ReduceLROnPlateau; converges and stays there."""
    torch.manual_seed(43)
    x, y = digits()
    model = mlp([64, 64, 10], act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=20)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 64)
    for _ in range(400):
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        sched.step(float(loss))
        h.observe(loss)


def memorised_sgd(h: Harness) -> None:
    """SGD with momentum on 48 samples, full batch, 600 steps: the loss and the steps
    shrink towards 0 (converged, not stuck)."""
    torch.manual_seed(44)
    x, y = digits()
    xs, ys = x[:48], y[:48]
    model = mlp([64, 64, 10])
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    classify(model, opt, h, 600, iter(lambda: (xs, ys), None))


def tied_embedding_lm(h: Harness) -> None:
    """The tiny LM with its output layer tied to the embedding (one shared weight)."""
    torch.manual_seed(45)
    data = lm_data(seed=1)
    model = TinyLM()
    model.out.weight = model.embed.weight
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    watcher = h.watch(model, optimizer=opt)
    gen = torch.Generator().manual_seed(45)
    for _ in range(150):
        seq = data[torch.randint(0, len(data), (16,), generator=gen)]
        loss = F.cross_entropy(model(seq[:, :-1]).reshape(-1, 16), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def alternating_heads(h: Harness) -> None:
    """Multi-task: a shared body, two heads in a ModuleList, one task per step in turn."""
    torch.manual_seed(46)
    x, y = digits()
    body = mlp([64, 64, 32])
    model = nn.ModuleDict(
        {"body": body, "heads": nn.ModuleList([nn.Linear(32, 10), nn.Linear(32, 4)])}
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 32)
    for i in range(200):
        xb, yb = next(data)
        feats = torch.relu(body(xb))
        if i % 2 == 0:
            loss = F.cross_entropy(model["heads"][0](feats), yb)
        else:
            loss = F.binary_cross_entropy_with_logits(model["heads"][1](feats), multilabel(yb))
        opt.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        opt.step()
        h.observe(loss)


def accumulate_k3_zero_in_place(h: Harness) -> None:
    """Accumulation over 3 micro-batches, gradients zeroed in place (set_to_none=False)."""
    torch.manual_seed(47)
    x, y = digits()
    model = mlp([64, 64, 64, 10], act=nn.GELU)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watcher = h.watch(model, optimizer=opt)
    data = batches(x, y, 16)
    for i in range(360):
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        (loss / 3).backward()
        if (i + 1) % 3 == 0:
            watcher.step(loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=False)
        h.observe(loss)


def two_optimizers_one_given(h: Harness) -> None:
    """Embedding-style split: SGD for the first layer, Adam for the rest; the watcher is
    given the main optimizer only (the user's natural choice)."""
    torch.manual_seed(50)
    x, y = digits()
    model = mlp([64, 64, 64, 10])
    first = torch.optim.SGD(model[0].parameters(), lr=0.05, momentum=0.9)
    rest = torch.optim.Adam([p for m in list(model)[1:] for p in m.parameters()], lr=2e-3)
    watcher = h.watch(model, optimizer=rest)
    data = batches(x, y, 32)
    for _ in range(200):
        xb, yb = next(data)
        loss = F.cross_entropy(model(xb), yb)
        first.zero_grad()
        rest.zero_grad()
        loss.backward()
        watcher.step(loss=loss)
        first.step()
        rest.step()
        h.observe(loss)


SCENARIOS: list[Scenario] = [
    # --- issue 17: the update, the loop
    Scenario(
        "diverge-rmsprop-mlp",
        diverge_rmsprop,
        ("diverging", "exploding-gradient", "non-finite-gradient"),
    ),
    Scenario(
        "diverge-adamw-cnn",
        diverge_adamw_cnn,
        ("diverging", "exploding-gradient", "non-finite-gradient"),
    ),
    Scenario(
        "diverge-sgd-nesterov",
        diverge_sgd_momentum,
        ("diverging", "exploding-gradient", "non-finite-gradient"),
    ),
    Scenario("zero-grad-forgotten-cnn", forgot_zero_grad_cnn, ("carried-gradient",)),
    Scenario("zero-grad-one-group", zero_grad_one_group, ("carried-gradient",), layers=("body",)),
    Scenario("head-after-optimizer", head_after_optimizer, ("not-updated",), layers=("head",)),
    Scenario("lr-zero-group", lr_zero_group, ("not-updated",), layers=("body",)),
    Scenario(
        "step-before-backward+opt",
        step_before_backward_opt,
        ("vanishing-gradient",),
        healthy_claim_is_miss=True,
        note="optimizer given: measured at optimizer.step()",
    ),
    Scenario(
        "step-after-zero-grad",
        step_after_zero_grad,
        ("vanishing-gradient",),
        notice=("never saw a gradient", "nothing was measured", "found no gradient"),
        healthy_claim_is_miss=True,
    ),
    Scenario(
        "optimizer-in-backward",
        optimizer_in_backward,
        ("vanishing-gradient",),
        notice=("optimizer-in-backward", "inside backward", "in backward"),
        healthy_claim_is_miss=True,
    ),
    Scenario(
        "never-routed-expert",
        never_routed_expert,
        ("no-gradient",),
        layers=("experts.3",),
        forbid=("experts.0", "experts.1", "experts.2"),
        deadline=100,
    ),
    Scenario("tiny-loss-scale-sgd", tiny_loss_scale, ("tiny-updates", "vanishing-gradient")),
    # --- issue 18: the loss contract, recurrent layers, zero gradients
    Scenario(
        "softmax-into-ce-cnn", softmax_into_ce_cnn, ("loss-input-mismatch",), layers=("end", "fc")
    ),
    Scenario("nll-on-logits-gru", nll_on_logits_gru, ("loss-input-mismatch",), layers=("head",)),
    Scenario(
        "sigmoid-into-bcelogits",
        sigmoid_into_bce_logits,
        ("loss-input-mismatch",),
        layers=("2", "3"),
    ),
    Scenario(
        "relu-after-last", relu_after_last, ("clamped-output", "dead-units"), layers=("2", "3")
    ),
    Scenario(
        "sigmoid-bce-saturated",
        sigmoid_bce_saturated,
        ("saturated-output", "zero-gradient", "saturated-activation"),
    ),
    Scenario("exploding-rnn-tanh", exploding_rnn, ("exploding-gradient",), layers=("rnn",)),
    Scenario("exploding-rnncell", exploding_rnn_cell, ("exploding-gradient",), layers=("cell",)),
    Scenario(
        "detach-before-head",
        detach_before_head,
        ("no-gradient", "zero-gradient"),
        layers=("conv1", "conv2"),
    ),
    Scenario(
        "detached-logits-zero-grads", detach_output_all_zero, ("zero-gradient", "no-gradient")
    ),
    Scenario("optimizer-on-body-only", optimizer_on_body_only, ("not-updated",), layers=("head",)),
    Scenario(
        "rounded-predictions-zero-grads", rounded_predictions, ("zero-gradient", "no-gradient")
    ),
    # --- healthy
    Scenario("adam-cnn-batch8", adam_cnn_batch8),
    Scenario("adamw-warmup-cosine0", warmup_cosine_adamw),
    Scenario("onecycle-sgd-cnn", onecycle_sgd),
    Scenario("sgdr-restarts", sgdr_restarts),
    Scenario("curriculum-jump", curriculum),
    Scenario("grad-accum-k4", accumulate_k4),
    Scenario("label-smoothing", label_smoothing),
    Scenario("class-weighted-ce", class_weighted),
    Scenario("mixup-soft-targets", mixup),
    Scenario("distillation-T4", distillation),
    Scenario("infonce-t0.07", infonce),
    Scenario("multilabel-bcelogits-cnn", multilabel_bce),
    Scenario("lstm-classifier", lstm_classifier),
    Scenario("gru-classifier", gru_classifier),
    Scenario("tiny-transformer-lm", tiny_transformer_lm),
    Scenario("memorised-64", memorised),
    Scenario("frozen-backbone-head", frozen_backbone),
    Scenario("frozen-but-in-optimizer", frozen_in_optimizer),
    Scenario("gan-two-watchers", lambda h: gan_loop(h, "separate")),
    Scenario("gan-one-watcher", lambda h: gan_loop(h, "together")),
    Scenario("hash-routed-moe-batch8", balanced_moe),
    Scenario("decay-some-groups", decay_some_groups),
    Scenario("hand-written-signsgd", hand_written_optimizer),
    Scenario("adagrad-bn-cnn", adagrad_bn_cnn),
    Scenario("plateau-sgd-tanh", plateau_sgd),
    Scenario("memorised-sgd-long", memorised_sgd),
    Scenario("two-optimizers-one-given", two_optimizers_one_given),
    Scenario("tied-embedding-lm", tied_embedding_lm),
    Scenario("alternating-task-heads", alternating_heads),
    Scenario("grad-accum-k3-zero-in-place", accumulate_k3_zero_in_place),
]


# ------------------------------------------------------------------------- scoring


def _names_match(layer: str, wanted: tuple[str, ...]) -> bool:
    return any(layer == w or layer.startswith(w + ".") or layer.startswith(w + " ") for w in wanted)


def execute(scenario: Scenario, every: int | None, bare: bool = False) -> tuple[Run, float]:
    h = Harness(every, without_optimizer=bare)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = logging.getLogger("gradwatch")
    log.addHandler(handler)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                scenario.train(h)
            finally:
                h.close()
    except Exception as exc:  # a scenario's own failure is reported, not raised
        h.run.error = f"{type(exc).__name__}: {exc}"
    finally:
        log.removeHandler(handler)
    h.run.output = out.getvalue()
    return h.run, time.perf_counter() - start


def verdict(scenario: Scenario, run: Run) -> str:
    if run.error:
        return "error"
    if not scenario.sick:
        return "silent" if not run.findings else "false alarm"
    matching = [f for f in run.findings if f[2] in scenario.expect]
    if scenario.layers:
        placed = [f for f in matching if any(_names_match(name, scenario.layers) for name in f[3])]
    else:
        placed = matching
    deadline = scenario.deadline if scenario.deadline is not None else run.damage_step
    if scenario.forbid and any(
        _names_match(name, scenario.forbid) for f in matching for name in f[3]
    ):
        return "wrong layer"
    if placed:
        if deadline is not None and placed[0][0] > deadline:
            return "late"
        return "hit"
    if matching:
        return "wrong layer"
    text = run.output.lower()
    if scenario.notice and any(words in text for words in scenario.notice):
        return "said"
    if scenario.healthy_claim_is_miss and "no findings" in text:
        return "miss (claims health)"
    return "miss"


def describe(run: Run) -> str:
    if run.error:
        return run.error[:60]
    seen: dict[str, tuple[int, tuple[str, ...]]] = {}
    for step, code, slug, layers in run.findings:
        seen.setdefault(f"{code} {slug}", (step, layers))
    parts = []
    for key, (step, layers) in seen.items():
        shown = ",".join(layers[:3]) + ("…" if len(layers) > 3 else "")
        parts.append(f"{key}@{step}[{shown}]")
    return "; ".join(parts) or "-"


def _loss_path(run: Run) -> str:
    if not run.losses:
        return ""
    return f"{run.losses[0]:.3g}>{max(run.losses):.3g}>{run.losses[-1]:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run scenarios whose name contains this")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--kind", choices=["sick", "healthy"], help="only sick or only healthy runs"
    )
    parser.add_argument(
        "--quick", action="store_true", help="healthy runs once (default options, optimizer given)"
    )
    args = parser.parse_args(argv)

    chosen = [s for s in SCENARIOS if args.only is None or args.only in s.name]
    if args.kind:
        chosen = [s for s in chosen if s.sick == (args.kind == "sick")]
    results = []
    header = (
        f"{'scenario':30} {'every':>5} {'expected':34} {'verdict':20} {'damage':>6} "
        f"{'secs':>5}  got"
    )
    print(f"gradwatch {getattr(gradwatch, '__version__', '?')} from {gradwatch.__file__}")
    print(header)
    print("-" * len(header))
    for scenario in chosen:
        # Healthy runs: the defaults, every 5th step, and watch(model) without the optimizer.
        variants: list[tuple[int | None, bool]] = [(None, False)]
        if not scenario.sick and not args.quick:
            variants += [(5, False), (None, True)]
        for every, bare in variants:
            run, secs = execute(scenario, every, bare)
            result = verdict(scenario, run)
            expected = "/".join(scenario.expect) or "silent"
            damage = "" if run.damage_step is None else str(run.damage_step)
            every_text = ("15" if every is None else str(every)) + ("/-o" if bare else "")
            print(
                f"{scenario.name:30} {every_text:>5} {expected[:34]:34} {result:20} {damage:>6} "
                f"{secs:5.1f}  "
                f"{describe(run)}  loss {_loss_path(run)}",
                flush=True,
            )
            results.append(
                {
                    "scenario": scenario.name,
                    "every_n_steps": every or 15,
                    "optimizer_given": not bare,
                    "expected": list(scenario.expect),
                    "layers": list(scenario.layers),
                    "verdict": result,
                    "findings": [
                        {"step": s, "code": c, "rule": r, "layers": list(lay), **detail}
                        for (s, c, r, lay), detail in zip(run.findings, run.details)
                    ],
                    "damage_step": run.damage_step,
                    "first_loss": run.losses[0] if run.losses else None,
                    "last_loss": run.losses[-1] if run.losses else None,
                    "max_loss": max(run.losses) if run.losses else None,
                    "seconds": round(secs, 2),
                    "error": run.error,
                    "output_tail": run.output[-1500:],
                }
            )
    sick = [r for r in results if r["expected"]]
    healthy = [r for r in results if not r["expected"]]
    hits = sum(r["verdict"] == "hit" for r in sick)
    said = sum(r["verdict"] == "said" for r in sick)
    alarms = sum(r["verdict"] == "false alarm" for r in healthy)
    errors = sum(r["verdict"] == "error" for r in results)
    print("-" * len(header))
    print(
        f"sick: {hits}/{len(sick)} hit, {said} said by a notice, {len(sick) - hits - said} not; "
        f"healthy: {len(healthy) - alarms}/{len(healthy)} silent, {alarms} false alarms; "
        f"errors: {errors}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
