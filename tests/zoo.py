"""Sick and healthy models for the rule tests: each one a real, small training run."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .support import mlp


class ResidualMLP(nn.Module):
    """h = h + act(W h): the +1 path of a residual connection."""

    def __init__(self, depth: int = 30, width: int = 64, act=torch.sigmoid, inputs: int = 64):
        super().__init__()
        self.inp = nn.Linear(inputs, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.out = nn.Linear(width, 10)
        self.act = act

    def forward(self, x):
        h = self.act(self.inp(x))
        for block in self.blocks:
            h = h + self.act(block(h))
        return self.out(h)


class FunctionalReLU(nn.Module):
    """An MLP that uses F.relu (no activation modules) with one layer biased to -4."""

    def __init__(self, depth: int = 5, width: int = 64, dead_layer: int | None = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(64 if i == 0 else width, width) for i in range(depth - 1)
        )
        self.out = nn.Linear(width, 10)
        for layer in self.layers:
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        if dead_layer is not None:
            nn.init.constant_(self.layers[dead_layer].bias, -4.0)
            nn.init.normal_(self.layers[dead_layer].weight, 0.0, 0.01)

    def forward(self, x):
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.out(x)


def relu_with_dead_layer(depth: int = 5, dead_layer: int = 2) -> nn.Sequential:
    """Kaiming ReLU MLP whose Linear at position ``dead_layer`` has bias -4 (and small
    weights): its units never activate."""
    model = mlp(depth, nn.ReLU, init="kaiming")
    linear = model[2 * dead_layer]
    nn.init.constant_(linear.bias, -4.0)
    nn.init.normal_(linear.weight, 0.0, 0.01)
    return model


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class SmallResNet(nn.Module):
    """A ResNet-style CNN with BatchNorm for 8x8 digit images (input (N, 64) reshaped)."""

    def __init__(self, channels: int = 16, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*(BasicBlock(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = x.view(-1, 1, 8, 8)
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    """Token classifier: embedding + transformer encoder; tokens from a vocabulary of 50
    of which a batch uses only some (absent rows of the embedding get no gradient)."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.encoder(h).mean(1))


def token_task(n: int = 1024, vocab: int = 50, length: int = 16, seed: int = 0):
    """Sequences whose label is (number of tokens below 10) mod 10; tokens 40-49 are rare."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 40, (n, length), generator=g)
    labels = (tokens < 10).sum(1) % 10
    return tokens, labels


class Detached(nn.Module):
    """An auxiliary branch whose output is detached before it joins the loss."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
        self.aux = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.trunk(x)
        return self.head(h) + 0.1 * self.aux(h).detach()


class FrozenBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = mlp(4, nn.ReLU, outputs=64, init="kaiming")
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.backbone(x))


# -- causal transformers (attention tests) -----------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written three ways: ``"module"`` (an nn.Softmax
    module), ``"functional"`` (``torch.softmax`` on the scores) or ``"sdpa"``
    (``F.scaled_dot_product_attention`` with ``scale=``). ``scale`` multiplies q.k; the
    usual one is 1/sqrt(head size)."""

    def __init__(
        self, dim: int, heads: int, variant: str = "functional", scale: float | None = None
    ):
        super().__init__()
        self.heads, self.head_dim, self.variant = heads, dim // heads, variant
        self.scale = scale if scale is not None else self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if variant == "module":
            self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, key_padding: torch.Tensor | None = None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.variant == "sdpa":
            out = nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale
            )
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
            if key_padding is not None:  # True where the key is padding
                scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
            probs = self.softmax(scores) if self.variant == "module" else torch.softmax(scores, -1)
            out = probs @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, variant: str, scale: float | None):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, variant, scale)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, key_padding=None):
        x = x + self.attn(self.ln1(x), key_padding)
        return x + self.mlp(self.ln2(x))


class CausalLM(nn.Module):
    """A small pre-LN causal language model (GPT-like)."""

    def __init__(
        self,
        vocab: int = 64,
        dim: int = 64,
        heads: int = 4,
        blocks: int = 2,
        length: int = 32,
        variant: str = "functional",
        scale: float | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(CausalBlock(dim, heads, variant, scale) for _ in range(blocks))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, key_padding=None):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            h = block(h, key_padding)
        return self.head(self.ln(h))


def copy_task(n: int = 512, vocab: int = 64, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Sequences whose second half repeats the first: attention must find the earlier copy."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(1, vocab, (n, length // 2), generator=g)
    return torch.cat([half, half], 1)


def train_lm(
    model, watcher, tokens, *, steps=45, lr=1e-3, batch=16, seed=0, autocast=None, key_padding=None
):
    """Next-token training with AdamW; ``watcher.step()`` between backward and the update."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(tokens), (batch,), generator=g)
        x = tokens[idx]
        pad = key_padding[idx, :-1] if key_padding is not None else None
        kwargs = {} if pad is None else {"key_padding": pad}
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                logits = model(x[:, :-1], **kwargs)
        else:
            logits = model(x[:, :-1], **kwargs)
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        if watcher is not None:
            watcher.step(optimizer=opt, loss=loss)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# -- gradient flow that stops by construction -------------------------------------------


def quantise(code: torch.Tensor, how: str) -> torch.Tensor:
    """Non-differentiable ways to turn a continuous code into a discrete one."""
    if how == "round":  # derivative 0: the gradient arrives as a tensor of zeros
        return torch.round(code * 4) / 4
    if how == "argmax":  # no graph at all: the gradient never arrives
        return F.one_hot(code.argmax(-1), code.shape[-1]).to(code.dtype)
    if how == "compare":
        return (code > 0).to(code.dtype)
    if how == "int":
        return (code * 4).to(torch.int8).to(code.dtype) / 4
    if how == "detach":
        return code.detach()
    raise ValueError(how)


class Bottleneck(nn.Module):
    """A classifier whose 8-wide code passes a quantiser between encoder and decoder.

    ``ste=True`` wraps it in a straight-through estimator, x + (q(x) - x).detach(): the
    forward pass uses q(x), the backward pass treats q as the identity.
    """

    def __init__(self, how: str = "round", ste: bool = False, code: int = 8):
        super().__init__()
        self.how, self.ste = how, ste
        self.encoder = nn.Sequential(
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, code),
            nn.Tanh(),
        )
        self.decoder = nn.Sequential(
            nn.Linear(code, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        for module in (*self.encoder, *self.decoder):
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x):
        code = self.encoder(x)
        q = quantise(code, self.how)
        if self.ste:
            q = code + (q - code).detach()
        return self.decoder(q)


class TopOneMoE(nn.Module):
    """A mixture-of-experts classifier with top-1 routing: each sample goes to the one
    expert its router scores highest, and an expert without samples does not run.

    ``router_bias`` sets the router's initial preference per expert (a strongly negative
    entry makes an expert that the router never picks).
    """

    def __init__(self, experts: int = 4, width: int = 32, router_bias=None, call_empty=False):
        super().__init__()
        self.call_empty = call_empty  # run experts on zero samples too, as some MoE code does
        self.inp = nn.Linear(64, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(experts)
        )
        self.out = nn.Linear(width, 10)
        if router_bias is not None:
            with torch.no_grad():
                self.router.bias.copy_(torch.as_tensor(router_bias, dtype=torch.float32))

    def forward(self, x):
        h = F.relu(self.inp(x))
        probs = self.router(h).softmax(-1)
        gate, choice = probs.max(-1)
        # Switch Transformer's load-balancing loss: experts * sum(share of samples x mean
        # probability); add `model.balance_loss` to the loss to keep every expert in use.
        share = torch.bincount(choice, minlength=len(self.experts)).to(probs.dtype)
        self.balance_loss = len(self.experts) * (share / len(choice) * probs.mean(0)).sum()
        mixed = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero(as_tuple=True)[0]
            if rows.numel() == 0 and not self.call_empty:
                continue  # no samples for this expert: it does not run, gets no gradient
            mixed = mixed.index_add(0, rows, expert(h[rows]) * gate[rows, None])
        return self.out(h + mixed)


class QuantisedStack(nn.Module):
    """Residual-free blocks in a ModuleList whose output after block ``cut`` is quantised."""

    def __init__(self, blocks: int = 5, cut: int = 1, how: str = "round"):
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(blocks)
        )
        self.out = nn.Linear(64, 10)
        self.cut, self.how = cut, how

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.cut:
                h = quantise(h, self.how)
        return self.out(h)


# -- recurrent classifiers (tests/test_recurrent.py) ----------------------------------

RECURRENT_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SequenceClassifier(nn.Module):
    """Digits read as a sequence: ``steps`` time steps of 64/steps pixels each."""

    def __init__(
        self,
        cell: str = "lstm",
        *,
        steps: int = 8,
        hidden: int = 32,
        layers: int = 1,
        recurrent_gain: float | None = None,
        read_state: bool = False,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.read_state = read_state
        self.rnn = RECURRENT_CELLS[cell](64 // steps, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 10)
        if recurrent_gain is not None:
            # Gaussian weight_hh with spectral radius ~ recurrent_gain
            for name, param in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    nn.init.normal_(param, 0.0, recurrent_gain / math.sqrt(param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, state = self.rnn(x.view(len(x), self.steps, -1))
        if self.read_state:
            h = state[0] if isinstance(state, tuple) else state
            return self.head(h[-1])
        return self.head(out[:, -1])


class CellLoop(nn.Module):
    """An nn.RNNCell driven by a Python loop over 8 time steps."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.cell = nn.RNNCell(8, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = None
        for t in range(8):
            h = self.cell(x[:, 8 * t : 8 * t + 8], h)
        return self.head(h)
