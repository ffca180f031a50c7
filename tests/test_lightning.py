"""GradWatchCallback on a real Lightning Trainer (CPU, single process).

The models and the trainer defaults live in tests/dist_scripts/lit_models.py, shared
with the multi-process runs in test_distributed.py.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import logging
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

import gradwatch
from gradwatch.install import install_hint
from gradwatch.integrations.lightning import GradWatchCallback

from .dist_scripts.lit_models import Classifier, deep_tanh, digits_loader, healthy, quiet_trainer


def _rows(csv_logger: CSVLogger) -> list[dict[str, str]]:
    with open(f"{csv_logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def _gradwatch_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [r for r in rows if r.get("gradwatch/global_grad_norm")]


def test_deep_tanh_module_gets_vanishing_gradient_finding_and_csv_columns(tmp_path, caplog):
    callback = GradWatchCallback(every_n_steps=5)
    csv_logger = CSVLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(max_steps=30, callbacks=[callback], logger=csv_logger,
                            log_every_n_steps=5)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer.fit(deep_tanh(), digits_loader())

    new = [f for f in callback.findings if f.status == "new"]
    assert [f.code for f in new] == ["GW101"]
    assert new[0].step <= 20 and "net.0" in new[0].layers
    assert callback.watcher.closed  # closed at the end of training: hooks removed
    # the logging reporter on the "gradwatch" logger
    assert any("GW101 vanishing-gradient" in r.getMessage() for r in caplog.records)

    # gradwatch's own interval (0, 5, 10, ...) and Lightning's logging steps (4, 9, ...)
    stats = {s.step: s for s in callback.watcher.history}
    assert sorted(stats) == [0, 4, 5, 9, 10, 14, 15, 19, 20, 24, 25, 29]
    rows = _rows(csv_logger)
    # one row per Lightning logging step, with Lightning's metrics and gradwatch's together
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19, 24, 29]
    assert all(r["train_loss"] and r["epoch"] and r["gradwatch/global_grad_norm"] for r in rows)
    last = rows[-1]
    first_rms = float(last["gradwatch/grad_rms/net.0"])
    last_rms = float(last["gradwatch/grad_rms/net.22"])
    assert 0 < first_rms < 0.01 * last_rms  # the vanishing profile itself, as logged
    assert float(last["gradwatch/findings/GW101"]) == 1.0
    assert float(rows[0]["gradwatch/findings/GW101"]) == 0.0
    assert float(last["gradwatch/active_findings"]) == 1.0
    # each row holds the numbers of the very step it is written at
    for row in rows:
        measured = stats[int(row["step"])]
        assert math.isclose(float(row["gradwatch/grad_norm/net.0"]),
                            measured.layers["net.0"].grad_norm, rel_tol=1e-6)
        assert math.isclose(float(row["gradwatch/global_grad_norm"]), measured.global_grad_norm,
                            rel_tol=1e-6)
    # nothing of ours in the progress bar
    assert not any(k.startswith("gradwatch") for k in trainer.progress_bar_metrics)


def test_own_interval_finds_early_and_logs_on_lightnings_rows(tmp_path):
    # Lightning's default log_every_n_steps (50) does not slow gradwatch down: it measures
    # every 15 steps, as in plain PyTorch, and adds the logging steps (49, 99, ...).
    callback = GradWatchCallback(reporters=[])
    csv_logger = CSVLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(max_steps=110, callbacks=[callback], logger=csv_logger)
    trainer.fit(deep_tanh(), digits_loader())
    assert [s.step for s in callback.watcher.history] == [0, 15, 30, 45, 49, 60, 75, 90, 99, 105]
    new = [f for f in callback.findings if f.status == "new"]
    assert [f.code for f in new] == ["GW101"] and new[0].step <= 45
    rows = _rows(csv_logger)
    assert [(r["step"], r["epoch"]) for r in rows] == [("49", "1"), ("99", "3")]
    assert all(r["train_loss"] and r["gradwatch/grad_rms/net.0"] for r in rows)


def test_healthy_module_gets_no_findings():
    callback = GradWatchCallback(every_n_steps=5, reporters=[])
    trainer = quiet_trainer(max_steps=60, callbacks=[callback])
    trainer.fit(healthy(), digits_loader())
    assert len(callback.watcher.history) == 12
    assert [f for f in callback.findings if f.severity != "info"] == []


def test_every_logger_gets_the_chosen_statistics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = GradWatchCallback(
        every_n_steps=2, reporters=[], log_stats=["grad_norm", "active_fraction"], log_layers=3
    )
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet_trainer(max_steps=6, callbacks=[callback], logger=[csv_logger, tb_logger],
                            log_every_n_steps=2)
    trainer.fit(healthy(), digits_loader())

    # 4 Linear layers and 3 ReLUs in depth order; 3 of them kept: first, middle, last.
    expected = {
        "gradwatch/grad_norm/net.0",
        "gradwatch/active_fraction/net.3",
        "gradwatch/grad_norm/net.6",
    }
    rows = _gradwatch_rows(_rows(csv_logger))
    logged = {k for k in rows[0] if k.startswith("gradwatch/") and "/findings/" not in k}
    assert logged == expected | {
        "gradwatch/global_grad_norm", "gradwatch/global_param_norm", "gradwatch/active_findings"
    }
    assert 0 < float(rows[0]["gradwatch/active_fraction/net.3"]) <= 1

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert expected <= tags and "gradwatch/findings/GW101" in tags
    assert [e.step for e in events.Scalars("gradwatch/grad_norm/net.0")] == [1, 3, 5]


def test_log_stats_false_sends_nothing_to_the_loggers(tmp_path):
    callback = GradWatchCallback(every_n_steps=2, reporters=[], log_stats=False)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    trainer = quiet_trainer(max_steps=4, callbacks=[callback], logger=csv_logger,
                            log_every_n_steps=1)
    trainer.fit(healthy(), digits_loader())
    rows = _rows(csv_logger)
    assert rows and not any(k.startswith("gradwatch") for k in rows[0])
    assert len(callback.watcher.history) == 2


def test_deferred_statistics_reach_the_next_logged_row(tmp_path):
    # deferred=True is what CUDA gets by default: each step's numbers are read at the next
    # monitored step, so a row holds the newest step read by then (never an older one).
    callback = GradWatchCallback(every_n_steps=5, reporters=[], deferred=True)
    csv_logger = CSVLogger(str(tmp_path), name="run")
    trainer = quiet_trainer(max_steps=30, callbacks=[callback], logger=csv_logger,
                            log_every_n_steps=5)
    trainer.fit(deep_tanh(), digits_loader())
    rows = _rows(csv_logger)
    stats = {s.step: s for s in callback.watcher.history}
    assert [int(r["step"]) for r in rows] == [4, 9, 14, 19, 24, 29]
    for row in rows:
        step = int(row["step"])
        logged = float(row["gradwatch/grad_norm/net.0"])
        matches = [s for s, st in stats.items()
                   if math.isclose(logged, st.layers["net.0"].grad_norm, rel_tol=1e-6)]
        assert len(matches) == 1 and step - 5 <= matches[0] <= step, (step, matches)
    assert [f.code for f in callback.findings if f.status == "new"] == ["GW101"]


def test_fitting_again_continues_the_rule_state():
    callback = GradWatchCallback(every_n_steps=5, reporters=[])
    model = deep_tanh()
    quiet_trainer(max_steps=30, callbacks=[callback]).fit(model, digits_loader())
    first_watcher = callback.watcher
    quiet_trainer(max_steps=30, callbacks=[callback]).fit(model, digits_loader())
    assert callback.watcher is not first_watcher and first_watcher.closed
    # the second fit (steps 0-25 again, a new trainer) did not announce GW101 anew
    assert [f.code for f in callback.findings if f.status == "new"] == ["GW101"]
    assert [r.status for r in callback.watcher.summary()] == ["active"]


def test_resume_from_checkpoint_does_not_announce_again(tmp_path, caplog):
    first = GradWatchCallback(every_n_steps=5)
    trainer = quiet_trainer(max_steps=30, callbacks=[first])
    trainer.fit(deep_tanh(), digits_loader())
    assert [f.code for f in first.findings if f.status == "new"] == ["GW101"]
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    second = GradWatchCallback(every_n_steps=5)
    trainer = quiet_trainer(max_steps=60, callbacks=[second])
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        trainer.fit(deep_tanh(seed=1), digits_loader(), ckpt_path=str(ckpt))

    assert [s.step for s in second.watcher.history] == [30, 35, 40, 45, 50, 55]
    # the problem persisted through the resumed run, yet was not announced as new again
    rows = [r for r in second.watcher.summary() if r.code == "GW101"]
    assert len(rows) == 1 and rows[0].status == "active"
    assert rows[0].first_step == first.findings[0].step and rows[0].last_step >= 30
    resumed_new = [f for f in second.findings if f.step >= 30 and f.status == "new"]
    assert resumed_new == []
    assert not any("GW101" in r.getMessage() and "at step 3" in r.getMessage()
                   for r in caplog.records if r.levelno >= logging.WARNING)
    # findings of the first run are kept; rule state continued (more engine ticks)
    assert second.findings[0] == first.findings[0]
    assert second.watcher.state_dict()["engine"]["tick"] == 12


class NanAfter(Classifier):
    """Its loss turns NaN from optimizer step 3 on (a corrupted batch, say)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 3 else loss


def test_stop_on_error_stops_a_run_with_nan_gradients():
    callback = GradWatchCallback(every_n_steps=1, reporters=[], stop_on="error")
    trainer = quiet_trainer(max_steps=50, callbacks=[callback])
    with pytest.warns(gradwatch.GradwatchWarning, match="stopped training"):
        trainer.fit(NanAfter(healthy().net), digits_loader())
    assert trainer.global_step == 4  # stopped right after the first NaN step
    assert "GW103" in callback.stop_reason and "step 3" in callback.stop_reason
    assert callback.findings[0].code == "GW103" and callback.findings[0].severity == "error"


class GradNorm(L.Callback):
    """The global gradient norm as Lightning's hook sees it, for comparison."""

    def __init__(self):
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def test_accumulation_clipping_and_bf16_measure_the_final_unclipped_gradient():
    reference = GradNorm()
    callback = GradWatchCallback(every_n_steps=1, reporters=[])
    trainer = quiet_trainer(
        max_steps=4,
        callbacks=[callback, reference],
        accumulate_grad_batches=3,
        gradient_clip_val=1e-3,
        precision="bf16-mixed",
    )
    model = healthy()
    trainer.fit(model, digits_loader())
    measured = {s.step: s.global_grad_norm for s in callback.watcher.history}
    assert sorted(measured) == [0, 1, 2, 3]  # once per optimizer step, not per batch
    for step, norm in measured.items():
        assert math.isclose(norm, reference.norms[step], rel_tol=1e-5)
        assert norm > 100 * 1e-3  # not yet clipped ...
    final = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    assert final <= 1e-3 * 1.001  # ... which Lightning did right after
    assert callback.watcher.disabled == {}


def test_fast_dev_run():
    callback = GradWatchCallback(reporters=[])
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", callbacks=[callback],
                        enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(healthy(), digits_loader())
    assert [s.step for s in callback.watcher.history] == [0]
    assert callback.watcher.every_n_steps == 15  # gradwatch's own interval


def test_torch_compiled_lightning_module():
    model = healthy()
    model.log_loss = False  # dynamo cannot trace self.log (a Lightning limitation)
    callback = GradWatchCallback(every_n_steps=1, reporters=[])
    trainer = quiet_trainer(max_steps=4, callbacks=[callback])
    trainer.fit(torch.compile(model, backend="eager"), digits_loader())
    history = list(callback.watcher.history)
    assert [s.step for s in history] == [0, 1, 2, 3]
    assert all(s.layers["net.0"].grad_norm > 0 for s in history)
    assert not history[-1].activations_observed  # hooks stay out of the compiled graph
    assert callback.watcher.disabled == {}


class TwoOptimizers(L.LightningModule):
    """A small GAN: manual optimization with a generator and a discriminator optimizer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
        self.disc = nn.Sequential(nn.Linear(16, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn(real.shape[0], 8))
        self.toggle_optimizer(opt_g)
        opt_g.zero_grad()
        self.manual_backward(nn.functional.softplus(-self.disc(fake)).mean())
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        opt_d.zero_grad()
        d_loss = (nn.functional.softplus(-self.disc(real)).mean()
                  + nn.functional.softplus(self.disc(fake.detach())).mean())
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return (torch.optim.Adam(self.gen.parameters(), 1e-3),
                torch.optim.Adam(self.disc.parameters(), 1e-3))


def test_manual_optimization_with_two_optimizers():
    callback = GradWatchCallback(every_n_steps=3, reporters=[])
    trainer = quiet_trainer(max_steps=12, callbacks=[callback])
    data = torch.utils.data.TensorDataset(torch.randn(256, 16))
    trainer.fit(TwoOptimizers(), torch.utils.data.DataLoader(data, batch_size=32))
    history = list(callback.watcher.history)
    # global_step counts both optimizers' steps: 6 batches, 12 steps, every 3rd measured,
    # so generator (even) and discriminator (odd) steps alternate.
    assert [s.step for s in history] == [0, 3, 6, 9]
    for stats in history[1:]:
        assert stats.layers["gen.0"].grad_norm > 0 and stats.layers["disc.0"].grad_norm > 0
        assert stats.optimizer.name == "Adam"
    assert [f for f in callback.findings if f.severity != "info"] == []


def test_validation_forward_passes_are_not_measured():
    # detail_every=1: every module is hooked at every monitored step, the strictest case
    callback = GradWatchCallback(every_n_steps=1, reporters=[], detail_every=1)
    trainer = quiet_trainer(max_steps=6, callbacks=[callback], val_check_interval=2,
                            limit_val_batches=2, num_sanity_val_steps=2)
    trainer.fit(healthy(), digits_loader(), digits_loader(shuffle=False))
    history = list(callback.watcher.history)
    assert [s.step for s in history] == list(range(6))
    # Validation (2 batches) ran after steps 1, 3 and 5, while the probes were armed for
    # the next step: only the one training forward pass of each step was counted.
    assert all(s.detail for s in history)
    assert all(s.layers[name].calls == 1 for s in history for name in ("net.0", "net.1"))
    trainer.validate(healthy(), digits_loader(shuffle=False), verbose=False)
    assert len(callback.watcher.history) == 6


def test_terminal_output_goes_above_the_tqdm_progress_bar():
    callback = GradWatchCallback(every_n_steps=5)
    trainer = quiet_trainer(max_steps=30, callbacks=[callback, TQDMProgressBar(refresh_rate=1)],
                            enable_progress_bar=True)
    screen = io.StringIO()  # the bar (stdout) and gradwatch (stderr) share one screen
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        trainer.fit(deep_tanh(), digits_loader())
    text = screen.getvalue()
    assert "Epoch 0" in text and "it/s" in text  # the bar was drawn
    lines = [line for line in text.split("\n") if "GW101 vanishing-gradient at step" in line]
    assert len(lines) == 1
    # tqdm.write cleared the bar first ("\r...\r"), so the finding starts its own line
    assert lines[0].split("\r")[-1].startswith("gradwatch WARNING GW101")


def test_wandb_logger_gets_statistics_and_an_alert(tmp_path, monkeypatch):
    pytest.importorskip("gradwatch.integrations.wandb")
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from .wandb_log import read_run_log

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(
        project="gradwatch-tests", save_dir=str(tmp_path), offline=True, mode="offline"
    )
    callback = GradWatchCallback(every_n_steps=5)
    trainer = quiet_trainer(max_steps=30, callbacks=[callback], logger=wandb_logger,
                            log_every_n_steps=10)
    try:
        trainer.fit(deep_tanh(), digits_loader())
        run = wandb_logger.experiment
        reporters = [r for r in callback.watcher.reporters if r.name == "wandb"]
        assert len(reporters) == 1 and reporters[0].run is run
        sync_file = run.settings.sync_file
    finally:
        wandb.finish()
    log = read_run_log(sync_file)
    assert [a.title for a in log.alerts] == ["GW101 vanishing-gradient"]
    # in Lightning's own rows, next to its train_loss
    rows = log.rows_with("gradwatch/grad_norm/net.0")
    assert [int(row["trainer/global_step"]) for row in rows] == [9, 19, 29]
    assert all("train_loss" in row for row in rows)


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


def test_stop_on_accepts_severities_codes_and_slugs():
    callback = GradWatchCallback(stop_on=["warning", "dead-units", "GW10"])
    assert callback.stop_on.severity == "warning"
    assert callback.stop_on.rules == ("dead-units", "GW10")


def test_importing_gradwatch_does_not_import_the_frameworks():
    code = (
        "import sys, gradwatch, gradwatch.integrations; "
        "loaded = {'lightning', 'wandb', 'transformers', 'accelerate'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("integration", "package", "extra"),
    [("lightning", "lightning", "lightning"), ("transformers", "transformers", "transformers")],
)
def test_without_the_framework_the_import_says_how_to_install_it(
    integration, package, extra, monkeypatch
):
    # As if the package were not installed: an import of it fails (None in sys.modules).
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.delitem(sys.modules, f"gradwatch.integrations.{integration}", raising=False)
    with pytest.raises(ModuleNotFoundError) as raised:
        importlib.import_module(f"gradwatch.integrations.{integration}")
    assert str(raised.value) == (
        f"gradwatch.integrations.{integration} needs {package}, which is not installed: "
        f"{install_hint(extra)}"
    )
    # a line to paste that works from a clone: the packages, and the extra in clone form
    assert f'pip install "{package}>=' in str(raised.value)
    assert f'pip install -e ".[{extra}]"' in str(raised.value)
    assert raised.value.name == package
    assert raised.value.__suppress_context__  # one line, no chained "No module named ..."


def test_without_wandb_the_reporter_says_how_to_install_it(monkeypatch):
    from gradwatch.integrations.wandb import WandbReporter

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ModuleNotFoundError) as raised:
        WandbReporter()
    assert str(raised.value) == (
        "gradwatch.integrations.wandb needs wandb, which is not installed: "
        'pip install "wandb>=0.16" (or, in your gradwatch clone: pip install -e ".[wandb]")'
    )
    assert raised.value.__suppress_context__


def test_terminal_output_goes_above_the_rich_progress_bar():
    import rich
    from lightning.pytorch.callbacks import RichProgressBar

    screen = io.StringIO()  # the terminal the rich progress display draws on
    beneath = io.StringIO()  # the stderr that rich's Live display replaces with a proxy
    terminal = gradwatch.TerminalReporter(plain=False)  # the rich form, as on a terminal
    callback = GradWatchCallback(every_n_steps=5, reporters=[terminal])
    bar = RichProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 120})
    trainer = quiet_trainer(max_steps=15, callbacks=[callback, bar], enable_progress_bar=True)
    console_state = dict(rich.get_console().__dict__)
    try:
        with contextlib.redirect_stderr(beneath):
            trainer.fit(deep_tanh(), digits_loader())
    finally:
        rich.get_console().__dict__.update(console_state)  # RichProgressBar reconfigured it
    # printed through the Live display (which clears the bar first), not past it
    assert "GW101 vanishing-gradient" in screen.getvalue()
    assert "GW101" not in beneath.getvalue()
