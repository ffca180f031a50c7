"""Recurrent layers (RNN, LSTM, GRU and their cells) on real small training runs: their
statistics, the exploding gradient through time (GW102), and silence on healthy ones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.layers import RECURRENT, module_kind
from tests.support import digits
from tests.zoo import CellLoop, SequenceClassifier


def _train(model, *, steps, lr, optimizer="sgd", every=5, seed=0, **watch):
    torch.manual_seed(seed)
    x, y = digits()
    opt = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(model.parameters(), lr=lr)
    )
    watcher = gradwatch.watch(model, every_n_steps=every, reporters=[], **watch)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt, loss=loss)
        opt.step()
        losses.append(float(loss.detach()))
    watcher.close()
    return watcher, losses


def _codes(watcher) -> set[str]:
    return {f.code for f in watcher.findings if f.severity != "info"}


def test_recurrent_modules_are_a_kind_of_their_own():
    for module in (nn.RNN(2, 3), nn.LSTM(2, 3), nn.GRU(2, 3), nn.RNNCell(2, 3),
                   nn.LSTMCell(2, 3), nn.GRUCell(2, 3)):
        assert module_kind(module) == RECURRENT


@pytest.mark.parametrize("read_state", [False, True])
def test_lstm_statistics_tell_hidden_to_hidden_from_input_to_hidden(read_state):
    model = SequenceClassifier("lstm", layers=2, read_state=read_state)
    watcher, _ = _train(model, steps=3, lr=0.05, every=1)
    layer = watcher.latest.layers["rnn"]
    params = dict(model.rnn.named_parameters())
    hh = [params[f"weight_hh_l{k}"].grad for k in range(2)]
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in hh) / sum(g.numel() for g in hh))
    assert layer.kind == RECURRENT
    assert layer.hh_grad_rms == pytest.approx(expected, rel=1e-4)
    assert layer.ih_grad_rms is not None and layer.ih_grad_rms > 0
    # forward order: the recurrent layer runs before the head; the backward signal
    # reaches it through the output sequence or the final state, whichever is read
    assert layer.depth < watcher.latest.layers["head"].depth
    assert layer.output_grad_rms is not None and layer.output_grad_rms > 0
    assert layer.units is None  # gate rows are not units that can die


def test_rnn_cell_in_a_python_loop_is_measured_over_every_time_step():
    model = CellLoop()
    watcher, _ = _train(model, steps=3, lr=0.05, every=1)
    cell = watcher.latest.layers["cell"]
    assert cell.kind == RECURRENT and cell.calls == 8
    assert cell.hh_grad_rms is not None and cell.hh_grad_rms > 0
    assert cell.depth < watcher.latest.layers["head"].depth


def test_packed_sequences_are_measured():
    lstm = nn.LSTM(4, 8, batch_first=True)
    head = nn.Linear(8, 2)
    model = nn.ModuleDict({"lstm": lstm, "head": head})
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    x = torch.randn(3, 5, 4)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3, 2], batch_first=True)
    _, (h, _) = lstm(packed)
    head(h[-1]).sum().backward()
    watcher.step()
    layer = watcher.latest.layers["lstm"]
    assert layer.hh_grad_rms > 0 and layer.output_rms is not None
    assert layer.output_grad_rms > 0
    watcher.close()


def test_vanilla_rnn_with_a_large_recurrent_init_explodes_through_time():
    model = SequenceClassifier("rnn", steps=32, hidden=64, recurrent_gain=3.0)
    watcher, losses = _train(model, steps=46, lr=1e-3, optimizer="adam")
    found = [f for f in watcher.findings if f.code == "GW102" and f.severity != "info"]
    assert found, watcher.findings
    finding = found[0]
    assert finding.layers == ("rnn",)
    assert finding.evidence["growth"] > 100
    assert "time step" in finding.message + finding.hint
    assert "LSTM" in finding.hint and "clip" in finding.hint.lower()
    assert "truncated BPTT" in finding.hint
    assert min(losses[-10:]) > 1.9  # it does not learn: the finding is no false alarm


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_layers_with_a_pathological_recurrent_init_explode_too(cell):
    model = SequenceClassifier(cell, steps=64, hidden=64, recurrent_gain=6.0)
    watcher, _ = _train(model, steps=16, lr=1e-3, optimizer="adam")
    found = [f for f in watcher.findings if f.code == "GW102" and f.severity != "info"]
    assert found and found[0].layers == ("rnn",)
    assert found[0].evidence["growth"] > 100
    assert "nn.RNN" not in found[0].hint  # already gated: no advice to switch to LSTM/GRU
    assert "orthogonal" in found[0].hint


def test_sgd_step_on_an_exploding_rnn_is_announced_with_time_step_hints():
    model = SequenceClassifier("rnn", steps=64, hidden=64, recurrent_gain=2.0)
    watcher, _ = _train(model, steps=16, lr=0.05)
    found = [f for f in watcher.findings if f.code == "GW102"]
    assert found and found[0].step == 0
    assert "rnn" in found[0].layers
    assert "weight_hh" in found[0].hint and "time step" in found[0].hint


@pytest.mark.parametrize(
    "cell, steps, options",
    [
        ("lstm", 8, {}),
        ("gru", 8, {}),
        ("lstm", 8, {"layers": 2, "read_state": True}),
        ("gru", 32, {"read_state": True}),
        ("rnn", 8, {}),
    ],
)
def test_healthy_recurrent_classifiers_stay_silent(cell, steps, options):
    model = SequenceClassifier(cell, steps=steps, **options)
    watcher, losses = _train(model, steps=90, lr=1e-2, optimizer="adam")
    assert _codes(watcher) == set(), watcher.findings
    assert losses[-1] < losses[0] * 0.7  # they learn


def test_healthy_rnn_cell_loop_stays_silent_with_sgd():
    watcher, losses = _train(CellLoop(), steps=90, lr=0.05)
    assert _codes(watcher) == set(), watcher.findings
    assert losses[-1] < losses[0]


class ReluAfterLstm(nn.Module):
    """Linear -> LSTM -> ReLU -> Linear: the ReLU reads the LSTM's output."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.act = nn.ReLU()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x.view(len(x), 8, 8)))
        return self.head(self.act(out[:, -1]))


def test_a_relu_after_a_recurrent_layer_is_not_paired_with_the_linear_before_it():
    from gradwatch.units import unit_groups

    watcher, _ = _train(ReluAfterLstm(), steps=3, lr=0.05, every=1)
    groups = {g.activation: g.producer for g in unit_groups(watcher.latest)}
    assert groups["act"] is None  # its units are the LSTM's, not embed's rows


class WordModel(nn.Module):
    """A next-token LSTM language model with a wide vocabulary head."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = nn.LSTM(64, 64, batch_first=True)
        self.head = nn.Linear(64, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


def test_a_language_model_with_a_wide_vocabulary_stays_silent():
    # Per element, the head's gradient is spread over 5,000 rows: compared per input
    # unit, the healthy LSTM stays near its head's level
    vocab = 5000
    torch.manual_seed(0)
    model = WordModel(vocab)
    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, vocab + 1).float()
    data = torch.multinomial(zipf, 256 * 17, replacement=True, generator=g).view(-1, 17)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[])
    for _ in range(31):
        batch = data[torch.randint(0, len(data), (16,), generator=g)]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt, loss=loss)
        opt.step()
    watcher.close()
    assert {f.code for f in watcher.findings if f.severity != "info"} == set()
    layers = watcher.latest.layers
    per_input = layers["head"].grad_norm / math.sqrt(64)
    assert layers["rnn"].hh_grad_per_input < 10 * per_input
