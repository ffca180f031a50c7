"""GradWatchCallback with Lightning's WandbLogger (offline): the callback finds the logger
and sends alerts, metrics and charts through WandbReporter; read back from the run's log."""

from __future__ import annotations

import pytest

pytest.importorskip("wandb")
pytest.importorskip("lightning")

from lightning.pytorch.loggers import WandbLogger

from gradwatch.integrations.lightning import GradWatchCallback

from .dist_scripts.lit_models import deep_tanh, digits_loader, healthy, quiet_trainer
from .wandb_log import read_run_log, read_table

STEPS = 150
EVERY = 10


@pytest.fixture(autouse=True)
def _clean_wandb_state(monkeypatch):
    """WandbLogger(offline=True) sets os.environ["WANDB_MODE"]: undo it after the test
    (monkeypatch restores what it saw); and a test that fails half-way must not leave its
    run for the next WandbLogger."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


def fit_with_wandb(tmp_path, module, name):
    # offline=True alone only sets WANDB_MODE, which wandb 0.31 reads once per process:
    # after an earlier wandb.init() here (test_wandb.py) it would try to go online.
    wandb_logger = WandbLogger(
        offline=True, mode="offline", save_dir=str(tmp_path), project="gradwatch-tests", name=name
    )
    callback = GradWatchCallback()  # every 15 steps, and at the steps Lightning logs
    trainer = quiet_trainer(
        max_steps=STEPS, callbacks=[callback], logger=wandb_logger, log_every_n_steps=EVERY
    )
    trainer.fit(module, digits_loader())
    run = wandb_logger.experiment
    sync_file = run.settings.sync_file
    run.finish()
    return callback, read_run_log(sync_file), sync_file


def test_deep_tanh_module_alerts_through_the_wandb_logger(tmp_path):
    callback, log, sync_file = fit_with_wandb(tmp_path, deep_tanh(), "lit-tanh")

    new = [f for f in callback.findings if f.status == "new"]
    assert [f.code for f in new] == ["GW101"]
    assert [(a.title, a.level) for a in log.alerts] == [("GW101 vanishing-gradient", "WARN")]
    assert f"Step: {new[0].step}" in log.alerts[0].text
    assert "net.0" in log.alerts[0].text

    # Per-layer keys in the rows Lightning logs (every EVERY steps), through the WandbLogger:
    # stamped with that step's trainer/global_step and holding that step's numbers.
    rows = log.rows_with("gradwatch/grad_rms/net.0")
    assert [row["trainer/global_step"] for row in rows] == list(range(EVERY - 1, STEPS, EVERY))
    stats = {s.step: s for s in callback.watcher.history}
    for row in rows:
        step = row["trainer/global_step"]
        expected = stats[step].layers["net.0"].grad_rms
        assert row["gradwatch/grad_rms/net.0"] == pytest.approx(expected, rel=1e-12)
        assert row["gradwatch/grad_rms/net.0"] < 0.01 * row["gradwatch/grad_rms/net.22"]
    keys = log.keys("gradwatch/")
    assert {"gradwatch/grad_norm/net.0", "gradwatch/global_grad_norm"} <= keys
    assert any(k.startswith("gradwatch/saturated_fraction/net.") for k in keys)

    # WandbLogger plots "*" against trainer/global_step, gradwatch's keys included.
    assert {"glob_name": "*", "step_metric": "trainer/global_step", "name": ""} in log.metrics

    # Lightning's own logging is intact: train_loss every 10 steps, none lost.
    assert len(log.rows_with("train_loss")) == STEPS // EVERY

    # Chart, findings table and summary.
    assert "gradwatch/gradient_flow" in log.config["_wandb"]["visualize"]
    _, table = read_table(sync_file, log.summary["gradwatch/findings_table"])
    assert [r[1] for r in table if r[4] == "new"] == ["GW101"]
    assert log.summary["gradwatch/GW101/count"] == 1
    assert log.summary["gradwatch/GW101/first_step"] == new[0].step


def test_healthy_module_gets_no_alert_through_the_wandb_logger(tmp_path):
    callback, log, _ = fit_with_wandb(tmp_path, healthy(), "lit-healthy")
    assert callback.findings == []
    assert log.alerts == []
    rows = log.rows_with("gradwatch/grad_rms/net.0")
    assert [row["trainer/global_step"] for row in rows] == list(range(EVERY - 1, STEPS, EVERY))
    assert log.summary["gradwatch/problems"] == 0


def test_wandb_reporter_adds_no_row_to_the_loggers_run(tmp_path):
    """The same fit (with validation every epoch) with and without the W&B reporter: every
    row of the run, at the same _step and trainer/global_step, with the same keys; the
    chart only rides in rows Lightning committed. The one extra row is the last: the row
    the run was building when it finished, holding the closing tables."""

    def fit(callback, name):
        wandb_logger = WandbLogger(
            offline=True, mode="offline", save_dir=str(tmp_path / name), project="gw", name=name
        )
        trainer = quiet_trainer(
            max_steps=STEPS, callbacks=[callback], logger=wandb_logger, log_every_n_steps=EVERY
        )
        trainer.fit(healthy(), digits_loader(), digits_loader(shuffle=False, n=256))
        run = wandb_logger.experiment
        sync_file = run.settings.sync_file
        run.finish()
        return read_run_log(sync_file)

    def shape(row):
        keys = sorted(k for k in row.values if not k.startswith(("_", "gradwatch/")))
        return row.step, row.get("trainer/global_step"), keys

    with_reporter = fit(GradWatchCallback(), "with")
    without = fit(GradWatchCallback(reporters=[]), "without")
    assert len(without.rows_with("val_loss")) >= 4  # one per epoch
    assert [shape(r) for r in with_reporter.history[:-1]] == [shape(r) for r in without.history]
    last = with_reporter.history[-1]
    assert last.step == without.history[-1].step + 1
    # (W&B copies trainer/global_step into every row: WandbLogger defines it with step_sync.)
    assert "gradwatch/findings_table" in last and shape(last)[2] == ["trainer/global_step"]
    charted = with_reporter.rows_with("gradwatch/gradient_flow_table")
    assert len(charted) >= 2  # at monitored steps 0 and 100, in rows Lightning committed
    assert not with_reporter.rows_with("gradwatch/step")  # metrics=False writes no step key
