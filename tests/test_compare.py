"""``gradwatch report A.jsonl B.jsonl``: two real records, before and after a fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import cli
from gradwatch.compare import changed_most, layer_changes, matching_steps, split_findings

from .support import digits, mlp


def record(path, model: nn.Module, steps: int = 46, every: int = 15):
    """Train ``model`` on digits with a JSONL record, as ``gradwatch run --record`` would."""
    x, y = digits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = gradwatch.JsonlRecorder(path, meta={"model": type(model).__name__})
    with gradwatch.watch(model, every_n_steps=every, reporters=[recorder]) as watcher:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[:256]), y[:256]).backward()
            watcher.step(optimizer=optimizer)
            optimizer.step()
    return gradwatch.read_record(path)


@pytest.fixture(scope="module")
def before_after(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    before = record(folder / "before.jsonl", mlp(20, nn.Sigmoid))
    torch.manual_seed(0)
    after = record(folder / "after.jsonl", mlp(20, nn.ReLU, init="kaiming"))
    return folder, before, after


def test_findings_each_way_and_the_layers_that_changed_most(before_after):
    _, before, after = before_after
    split = split_findings(before, after)
    assert "GW101" in split.only_a
    assert "GW101" not in split.only_b + split.both
    # the same step numbers in both runs: all of them match
    steps = matching_steps(before, after)
    assert steps == [s.step for s in before.steps] == [0, 15, 30, 45]
    changes = layer_changes(before, after, steps)
    assert [c.name for c in changes][:3] == ["0", "2", "4"]  # input side first
    first = changes[0]
    assert first.a[-1] == before.steps[-1].layers["0"].grad_rms
    assert first.b[-1] == after.steps[-1].layers["0"].grad_rms
    # the vanished first layers gained most: orders of magnitude, not percent
    most = changed_most(changes, 3)
    assert {c.name for c in most} <= {"0", "2", "4", "6"}
    assert all(c.log_change is not None and c.log_change > 6 for c in most)
    # ... far more than the output layer, which got a gradient in both runs
    assert changes[0].log_change > changes[-1].log_change + 3


def test_the_command_prints_both_runs_side_by_side_and_draws_them(before_after, capsys):
    folder, before, after = before_after
    png = folder / "both.png"
    code = cli.main(
        ["report", str(folder / "before.jsonl"), str(folder / "after.jsonl"), "--png", str(png)]
    )
    out = " ".join(capsys.readouterr().out.split())  # as one line: the console wraps it
    assert code == 0
    assert "A: " in out and "before.jsonl" in out and "B: " in out and "after.jsonl" in out
    assert "GW101 vanishing-gradient" in out and "only A" in out
    assert "at the 4 monitored step(s) both runs measured" in out
    ratio = 10 ** layer_changes(before, after, matching_steps(before, after))[0].log_change
    assert f"x{ratio:.2g}" in out
    most = changed_most(layer_changes(before, after, matching_steps(before, after)))
    assert f"changed most from A to B: {most[0].name} {most[0].factor_text}," in out
    assert png.stat().st_size > 10_000


def test_a_record_compared_with_itself_changes_nothing(before_after, capsys):
    folder, before, _ = before_after
    path = str(folder / "before.jsonl")
    assert cli.main(["report", path, path]) == 0
    out = capsys.readouterr().out
    assert "both" in out and "only A" not in out and "only B" not in out
    changes = layer_changes(before, before, matching_steps(before, before))
    assert changes and all(c.log_change in (0.0, None) for c in changes)


def test_a_missing_second_record_is_a_clear_error(before_after, capsys):
    folder, _, _ = before_after
    assert cli.main(["report", str(folder / "before.jsonl"), str(folder / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
