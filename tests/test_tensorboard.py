"""The TensorBoard reporter, read back with TensorBoard's own event reader."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch.integrations.tensorboard import TensorBoardReporter

from .support import digits, mlp


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def texts(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """Text summaries (``add_text`` stores them as string tensors) as (step, text)."""
    tag = f"{tag}/text_summary"
    if tag not in accumulator.Tags()["tensors"]:
        return []
    return [
        (event.step, event.tensor_proto.string_val[0].decode())
        for event in accumulator.Tensors(tag)
    ]


def train(model: nn.Module, watcher: gradwatch.Watcher, steps: int) -> None:
    x, y = digits()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:256]), y[:256]).backward()
        watcher.step(optimizer=optimizer)
        optimizer.step()


@pytest.mark.slow
def test_deep_sigmoid_scalars_findings_and_figure_at_monitored_steps_only(tmp_path):
    model = mlp(20, nn.Sigmoid)
    reporter = TensorBoardReporter(tmp_path / "tb", max_layers=4)
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[reporter])
    train(model, watcher, 31)
    watcher.close()

    tb = events(tmp_path / "tb")
    scalars = tb.Tags()["scalars"]
    history = {s.step: s for s in watcher.history}
    # nothing on the steps in between: exactly the monitored ones
    rms = tb.Scalars("gradwatch/grad_rms/0")
    assert [e.step for e in rms] == sorted(history) == [0, 5, 10, 15, 20, 25, 30]
    for event in rms:
        assert event.value == pytest.approx(history[event.step].layers["0"].grad_rms, rel=1e-6)
    norms = tb.Scalars("gradwatch/global_grad_norm")
    assert [e.value for e in norms] == pytest.approx(
        [history[e.step].global_grad_norm for e in norms], rel=1e-6
    )
    # four layers spread in depth, first and last kept, the same keys as Lightning's
    per_layer = [tag.split("/") for tag in scalars if tag.count("/") == 2]
    layers = {name for _, stat, name in per_layer if stat != "findings"}
    assert len(layers) == 4 and {"0", "38"} <= layers
    stats = {stat for _, stat, _ in per_layer}
    assert stats == {"grad_norm", "grad_rms", "saturated_fraction", "findings"}
    first = next(f for f in watcher.findings if f.code == "GW101")
    counts = tb.Scalars("gradwatch/findings/GW101")
    assert [e.value for e in counts if e.step < first.step] == []
    assert [e.value for e in counts if e.step == first.step] == [1.0]

    (found,) = [text for step, text in texts(tb, "gradwatch/findings") if step == first.step]
    assert "GW101 vanishing-gradient" in found and first.hint.split(":")[0] in found
    (summary,) = texts(tb, "gradwatch/summary")
    assert "GW101 vanishing-gradient" in summary[1]
    images = tb.Images("gradwatch/gradient_flow")
    assert [e.step for e in images] == [first.step]
    assert images[0].width > 300 and images[0].height > 300


def test_a_healthy_run_writes_scalars_and_no_finding(tmp_path):
    model = mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[TensorBoardReporter(tmp_path)])
    train(model, watcher, 11)
    watcher.close()
    tb = events(tmp_path)
    assert "gradwatch/active_fraction/1" in tb.Tags()["scalars"]
    assert not any(tag.startswith("gradwatch/findings/") for tag in tb.Tags()["scalars"])
    assert texts(tb, "gradwatch/findings") == []
    assert tb.Tags()["images"] == []
    assert "no findings" in texts(tb, "gradwatch/summary")[0][1]


def test_the_scripts_own_writer_gets_gradwatchs_values_beside_its_own(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path)
    model = mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, every_n_steps=5, reporters=[TensorBoardReporter(writer)])
    train(model, watcher, 6)
    watcher.close()
    writer.add_scalar("loss", 1.0, 5)  # the writer stays open: it is the script's
    writer.close()
    scalars = events(tmp_path).Tags()["scalars"]
    assert "loss" in scalars and "gradwatch/grad_norm/0" in scalars


def test_wrong_writer_is_a_clear_error():
    with pytest.raises(ValueError, match="SummaryWriter or a log folder"):
        TensorBoardReporter(42)


@pytest.mark.slow
def test_a_failing_figure_is_switched_off_and_the_scalars_go_on(tmp_path, monkeypatch):
    def broken(record, figure=None):
        raise RuntimeError("simulated drawing failure")

    monkeypatch.setattr("gradwatch.report.report_figure", broken)
    model = mlp(20, nn.Sigmoid)
    reporter = TensorBoardReporter(tmp_path)
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[reporter])
    with pytest.warns(gradwatch.GradwatchWarning, match="figure is off"):
        train(model, watcher, 8)
    watcher.close()
    assert not reporter.figure and any(f.code == "GW101" for f in watcher.findings)
    tb = events(tmp_path)
    assert [e.step for e in tb.Scalars("gradwatch/grad_rms/0")] == list(range(8))
    assert tb.Tags()["images"] == []
