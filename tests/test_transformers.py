"""GradWatchCallback on a real ``transformers.Trainer`` (CPU, one process), and gradwatch in
a plain Accelerate loop. Models are built from configs (tests/dist_scripts/hf_models.py);
nothing is downloaded. Two-process DDP runs are in test_distributed.py."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback

import gradwatch
from gradwatch.integrations.transformers import GradWatchCallback, deepspeed_reason

from .dist_scripts.hf_models import (
    classification_data,
    deep_sigmoid,
    digit_data,
    tiny_bert,
    tiny_gpt2,
    token_data,
    trainer_args,
)


def train_rows(trainer: Trainer) -> list[dict]:
    """The Trainer's training log rows (the ones with the running loss)."""
    return [row for row in trainer.state.log_history if "loss" in row]


class GradNorms(TrainerCallback):
    """Per-parameter gradient norms as on_pre_optimizer_step sees them (after clipping)."""

    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.norms[state.global_step + 1] = {
            name: float(p.grad.double().norm())
            for name, p in model.named_parameters()
            if p.grad is not None
        }


def test_deep_sigmoid_module_gets_vanishing_gradient_through_the_trainer(tmp_path, caplog):
    watch = GradWatchCallback()
    trainer = Trainer(
        model=deep_sigmoid(),
        args=trainer_args(tmp_path, max_steps=45, logging_steps=15),
        train_dataset=digit_data(),
        callbacks=[watch],
    )
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer.train()

    new = [f for f in watch.findings if f.status == "new"]
    assert [f.code for f in new] == ["GW101"]
    assert new[0].step <= 30 and "net.0" in new[0].layers
    assert any("GW101 vanishing-gradient" in r.getMessage() for r in caplog.records)
    # the first step, gradwatch's interval (15) and the logging steps (15), in the
    # Trainer's numbering (global_step after the step)
    assert [s.step for s in watch.watcher.history] == [1, 15, 30, 45]
    assert watch.watcher.closed

    rows = train_rows(trainer)
    assert [r["step"] for r in rows] == [15, 30, 45]
    stats = {s.step: s for s in watch.watcher.history}
    for row in rows:
        # the row's own step, and its numbers: gradwatch's global norm is the Trainer's
        assert math.isclose(row["gradwatch/global_grad_norm"], row["grad_norm"], rel_tol=1e-5)
        assert row["gradwatch/grad_rms/net.0"] == stats[row["step"]].layers["net.0"].grad_rms
        assert row["gradwatch/grad_rms/net.0"] < 1e-9 * row["gradwatch/grad_rms/net.60"]
        # the problem is active from the row of its announcement on (never resolved here)
        active = 1.0 if any(f.step <= row["step"] for f in new) else 0.0
        assert row["gradwatch/findings/GW101"] == active
    assert rows[-1]["gradwatch/findings/GW101"] == 1.0
    assert rows[-1]["gradwatch/active_findings"] == 1.0


def test_healthy_tiny_gpt2_is_silent():
    watch = GradWatchCallback(every_n_steps=5)
    trainer = Trainer(
        model=tiny_gpt2(),
        args=trainer_args("unused", max_steps=60, per_device_train_batch_size=8),
        train_dataset=token_data(),
        callbacks=[watch],
    )
    trainer.train()
    assert len(watch.watcher.history) == 13  # steps 1, 5, 10, ..., 60
    assert watch.findings == []
    assert all(r["gradwatch/findings/GW101"] == 0.0 for r in train_rows(trainer))


def test_measures_final_gradients_before_clipping_once_per_optimizer_step(tmp_path):
    # Gradient accumulation over 3 micro-batches and clipping far below the gradient norm:
    # gradwatch reads each step's accumulated gradients once, before the Trainer clips them.
    clipped = GradNorms()
    watch = GradWatchCallback(every_n_steps=1, reporters=[])
    max_norm = 1e-3
    trainer = Trainer(
        model=tiny_bert(),
        args=trainer_args(tmp_path, max_steps=4, logging_steps=1, gradient_accumulation_steps=3,
                          max_grad_norm=max_norm, per_device_train_batch_size=8),
        train_dataset=classification_data(),
        callbacks=[watch, clipped],
    )
    trainer.train()
    history = {s.step: s for s in watch.watcher.history}
    assert sorted(history) == [1, 2, 3, 4]  # optimizer steps, not micro-batches
    rows = {row["step"]: row for row in train_rows(trainer)}
    for step, stats in history.items():
        before = stats.global_grad_norm
        # the Trainer's own grad_norm is the norm before clipping: the same number
        assert math.isclose(before, rows[step]["grad_norm"], rel_tol=1e-5)
        assert before > 100 * max_norm
        # clipping scaled every gradient by one factor: each layer's pre-clip norm times
        # that factor is what the optimizer got
        factor = max_norm / (before + 1e-6)
        after = clipped.norms[step]
        for name in ("bert.encoder.layer.0.attention.self.query", "classifier"):
            assert math.isclose(stats.layers[name].grad_norm * factor,
                                math.hypot(after[f"{name}.weight"], after[f"{name}.bias"]),
                                rel_tol=1e-4), name
    assert watch.watcher.disabled == {}


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class BrokenOp(nn.Module):
    """Identity forward whose backward turns NaN from the ``start``-th call on (a custom op
    with a numerically broken backward)."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start = start
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return _NanGradient.apply(x) if self.calls >= self.start else x


class NanMidway(nn.Module):
    def __init__(self, start: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), BrokenOp(start),
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.net(x), labels)}


def test_stop_on_error_stops_at_the_nan_step_and_names_where_it_starts(tmp_path):
    # Clipping (max_grad_norm=1.0, the Trainer's default) would multiply every gradient by
    # NaN; measured before it, only the layers below the broken op are non-finite.
    watch = GradWatchCallback(every_n_steps=1, reporters=[], stop_on="error")
    trainer = Trainer(
        model=NanMidway(start=4),
        args=trainer_args(tmp_path, max_steps=50, max_grad_norm=1.0),
        train_dataset=digit_data(),
        callbacks=[watch],
    )
    with pytest.warns(gradwatch.GradwatchWarning, match="stopped training"):
        trainer.train()
    assert trainer.state.global_step == 4  # stopped right after the first NaN step
    assert "GW103" in watch.stop_reason and "step 4" in watch.stop_reason
    finding = watch.findings[0]
    assert (finding.code, finding.severity, finding.step) == ("GW103", "error", 4)
    assert "net.2" in finding.layers
    assert "net.5" not in finding.layers and "net.7" not in finding.layers


def test_metrics_reach_tensorboard_in_the_trainers_rows(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    watch = GradWatchCallback(every_n_steps=4, reporters=[], log_stats=["grad_norm"],
                              log_layers=3)
    trainer = Trainer(
        model=tiny_bert(),
        args=trainer_args(tmp_path, max_steps=12, logging_steps=5, report_to=["tensorboard"]),
        train_dataset=classification_data(),
        callbacks=[watch],
    )
    # report_to's callbacks come before user callbacks; gradwatch's row writer is first
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("_RowWriter") < names.index("TensorBoardCallback")
    trainer.train()
    # measured: the first step, every 4th, and the logged steps 5 and 10
    assert [s.step for s in watch.watcher.history] == [1, 4, 5, 8, 10, 12]
    rows = train_rows(trainer)
    assert [r["step"] for r in rows] == [5, 10]
    layer_keys = {k for k in rows[0] if k.startswith("gradwatch/grad_norm/")}
    assert len(layer_keys) == 3  # log_layers=3, first and last included
    assert "gradwatch/grad_norm/classifier" in layer_keys

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # the Trainer's TensorBoard callback files training rows under train/
    assert {f"train/{k}" for k in layer_keys} <= tags
    loss_steps = [e.step for e in events.Scalars("train/loss")]
    for key in (*layer_keys, "gradwatch/global_grad_norm", "gradwatch/findings/GW101"):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == loss_steps == [5, 10]
    logged = [e.value for e in events.Scalars("train/gradwatch/global_grad_norm")]
    assert logged == pytest.approx([r["gradwatch/global_grad_norm"] for r in rows], rel=1e-6)


def test_report_to_wandb_gets_the_metrics_and_the_alert(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from .wandb_log import read_run_log

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "gradwatch-tests")
    watch = GradWatchCallback()
    trainer = Trainer(
        model=deep_sigmoid(),
        args=trainer_args(tmp_path, max_steps=45, logging_steps=15, report_to=["wandb"]),
        train_dataset=digit_data(),
        callbacks=[watch],
    )
    try:
        trainer.train()
        sync_file = wandb.run.settings.sync_file
    finally:
        wandb.finish()
    log = read_run_log(sync_file)
    assert [a.title for a in log.alerts] == ["GW101 vanishing-gradient"]
    assert "net.0" in log.alerts[0].text
    # in the Trainer's own rows (train/ prefix, train/global_step), next to its loss
    rows = log.rows_with("train/gradwatch/grad_rms/net.0")
    assert [row["train/global_step"] for row in rows] == [15, 30, 45]
    assert all("train/loss" in row and "train/grad_norm" in row for row in rows)
    assert rows[-1]["train/gradwatch/findings/GW101"] == 1


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_from_checkpoint_does_not_announce_again(tmp_path, restore_flag, caplog):
    first = GradWatchCallback(every_n_steps=5, reporters=[])
    args = trainer_args(tmp_path, max_steps=30, save_strategy="steps", save_steps=30,
                        restore_callback_states_from_checkpoint=restore_flag)
    Trainer(model=deep_sigmoid(), args=args, train_dataset=digit_data(),
            callbacks=[first]).train()
    assert [f.code for f in first.findings if f.status == "new"] == ["GW101"]
    saved = json.loads((tmp_path / "checkpoint-30" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GradWatchCallback"]["args"] == {
        "every_n_steps": 5, "log_stats": True, "log_layers": 50, "activations": True,
        "deferred": "auto", "sentinel": True,
    }

    second = GradWatchCallback(every_n_steps=5)
    args = trainer_args(tmp_path, max_steps=60, save_strategy="no",
                        restore_callback_states_from_checkpoint=restore_flag)
    trainer = Trainer(model=deep_sigmoid(seed=1), args=args, train_dataset=digit_data(),
                      callbacks=[second])
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-30"))
    # With restore_callback_states_from_checkpoint the Trainer replaces the callback with
    # one rebuilt from the checkpoint; without it, the one passed in continues.
    watch = next(cb for cb in trainer.callback_handler.callbacks
                 if isinstance(cb, GradWatchCallback))
    assert (watch is second) is (not restore_flag)
    assert [s.step for s in watch.watcher.history][:2] == [35, 40]
    rows = [r for r in watch.watcher.summary() if r.code == "GW101"]
    assert len(rows) == 1 and rows[0].status == "active" and rows[0].last_step >= 35
    assert [f for f in watch.findings if f.step > 30 and f.status == "new"] == []
    assert not [r for r in caplog.records if "GW101" in r.getMessage()]


def test_deepspeed_says_once_that_gradients_are_unavailable(tmp_path, caplog):
    # DeepSpeed itself is not installed here: only what the callback detects it by is set
    # (the Trainer's parsed DeepSpeed configuration), after the Trainer was built.
    watch = GradWatchCallback()
    args = trainer_args(tmp_path, max_steps=3)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(),
                      callbacks=[watch])
    args.hf_deepspeed_config = {"zero_optimization": {"stage": 2}}
    with caplog.at_level(logging.WARNING, logger="gradwatch"), warnings.catch_warnings(
        record=True
    ) as caught:
        warnings.simplefilter("always")
        trainer.train()
        trainer.train()  # said once per callback, not per run
    assert trainer.state.global_step == 3  # training went on
    assert watch.watcher is None and watch.findings == []
    assert "DeepSpeed" in watch.unavailable
    said = [r for r in caplog.records if "DeepSpeed" in r.getMessage()]
    assert len(said) == 1 and "unavailable" in said[0].getMessage()
    assert len([w for w in caught if "DeepSpeed" in str(w.message)]) == 1


def test_deepspeed_detection_inputs(monkeypatch):
    class Args:
        deepspeed = None

    assert deepspeed_reason(Args()) is None
    with_config = Args()
    with_config.deepspeed = "ds_config.json"
    assert "DeepSpeed" in deepspeed_reason(with_config)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets
    assert "DeepSpeed" in deepspeed_reason(Args())


@pytest.mark.parametrize(
    "options",
    [
        {"every_n_steps": 0},
        {"every_n_steps": 2.5},
        {"stop_on": "GW999"},
        {"stop_on": []},
        {"log_stats": ["grad_norms"]},
        {"log_layers": 0},
        {"select": ["GW9"]},
        {"thresholds": {"vanishing-gradient": {"nope": 1.0}}},
        {"reporters": [object()]},
        {"detail_every": -1},
        {"deferred": "sometimes"},
    ],
)
def test_invalid_arguments_raise_value_error(options):
    with pytest.raises(ValueError):
        GradWatchCallback(**options)


def test_plain_accelerate_loop(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = deep_sigmoid()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.stack([row["x"] for row in digit_data()[:384]])
    y = torch.stack([row["labels"] for row in digit_data()[:384]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    watcher = gradwatch.watch(accelerator.unwrap_model(prepared), every_n_steps=2, reporters=[])
    final: dict[int, float] = {}
    step = 0
    for inputs, labels in loader:
        with accelerator.accumulate(prepared):
            loss = prepared(inputs, labels)["loss"]
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                final[step] = float(torch.sqrt(sum(p.grad.double().pow(2).sum()
                                                   for p in model.parameters())))
                watcher.step(step, optimizer=optimizer)
                accelerator.clip_grad_norm_(prepared.parameters(), 1e-3)
                step += 1
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    assert step == 8  # 24 micro-batches, 3 per optimizer step
    history = {s.step: s for s in watcher.history}
    assert sorted(history) == [0, 2, 4, 6]
    for s, stats in history.items():
        assert math.isclose(stats.global_grad_norm, final[s], rel_tol=1e-6)
    assert "net.0" in history[0].layers  # names of the model itself, no wrapper prefix
    assert [f.code for f in watcher.findings if f.status == "new"] == ["GW101"]
