"""gradwatch never moves or drops the user's own W&B rows, whatever the way they log.

Each test trains a real model with real wandb (offline) while "the user" logs in one of
the usual ways, then reads the run's transaction log back: every row the user logged must
be at the step they asked for, with their values, and no row of gradwatch's own may sit
between them; every monitored step's gradwatch values must be in a history row or in
``gradwatch/stats_table``.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradwatchWarning

from .support import digits, mlp
from .wandb_log import RunLog, offline_run, read_run_log, read_table

wandb = pytest.importorskip("wandb")
from gradwatch.integrations.wandb import WandbReporter  # noqa: E402
from gradwatch.integrations.wandb_rows import ThinnedRows  # noqa: E402

STEPS = 120
EPOCH = 30  # training steps per "epoch" in the per-epoch pattern


@pytest.fixture(autouse=True)
def _finish_leftover_run():
    yield
    if wandb.run is not None:
        wandb.finish()


class Recorder(gradwatch.Reporter):
    """Keeps what the watcher measured, to compare with what W&B stored."""

    def __init__(self) -> None:
        self.stats: dict[int, gradwatch.StepStats] = {}

    def report(self, stats, findings):
        self.stats[stats.step] = stats


@dataclass(frozen=True)
class Pattern:
    """One way a user logs to W&B while training: ``log(run, step, when, loss, rows)`` is
    called ``"before"`` and ``"after"`` ``watcher.step()`` at each training step, logs as
    the user would, and notes in ``rows`` what the user asked for:
    ``{wandb_step: {key: value}}``."""

    name: str
    log: Callable[[object, int, str, float, dict], None]


def _every_step(run, i, when, loss, rows):
    if when == "after":
        run.log({"loss": loss})
        rows[i] = {"loss": loss}


def _every_step_before(run, i, when, loss, rows):
    if when == "before":
        run.log({"loss": loss})
        rows[i] = {"loss": loss}


def _rarely(run, i, when, loss, rows):
    if when == "after" and i % 25 == 0:
        run.log({"loss": loss})
        rows[len(rows)] = {"loss": loss}


def _never(run, i, when, loss, rows):
    pass


def _per_epoch(run, i, when, loss, rows):
    """Once per epoch at step=epoch (0, 1, 2, ...), a training and a validation value."""
    if when == "after" and (i + 1) % EPOCH == 0:
        epoch = i // EPOCH
        run.log({"epoch/loss": loss}, step=epoch)
        run.log({"val/loss": loss + 1.0}, step=epoch)
        rows[epoch] = {"epoch/loss": loss, "val/loss": loss + 1.0}


def _explicit_every_step(run, i, when, loss, rows):
    if when == "after":
        run.log({"loss": loss}, step=i)
        rows[i] = {"loss": loss}


def _non_contiguous(run, i, when, loss, rows):
    """step= with gaps (7, 10, 46, 85, ...): a user's own sample counter, say."""
    if when == "after" and i % 13 in (0, 1):
        run.log({"loss": loss}, step=3 * i + 7)
        rows[3 * i + 7] = {"loss": loss}


def _built_with_commit_false(run, i, when, loss, rows):
    """The user builds each row with commit=False and commits every 10 steps."""
    if when == "after":
        run.log({"lr": 0.05}, commit=False)
        run.log({"seen": i}, commit=False)
        if i % 10 == 9:
            run.log({"loss": loss})
            rows[i // 10] = {"lr": 0.05, "seen": i, "loss": loss}


PATTERNS = [
    Pattern("every step, after watcher.step()", _every_step),
    Pattern("every step, before watcher.step()", _every_step_before),
    Pattern("rarely", _rarely),
    Pattern("never", _never),
    Pattern("once per epoch with step=epoch", _per_epoch),
    Pattern("every step with step=", _explicit_every_step),
    Pattern("non-contiguous step=", _non_contiguous),
    Pattern("rows built with commit=False", _built_with_commit_false),
]


def train_and_log(tmp_path: Path, pattern: Pattern, reporters, *, every: int, model=None):
    """Train a small digits MLP for STEPS steps while the user logs as ``pattern`` says.
    Returns the run log, the rows the user asked for and the sync file."""
    torch.manual_seed(0)
    run = offline_run(tmp_path, pattern.name.replace(" ", "-"))
    model = model if model is not None else mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, every_n_steps=every, reporters=reporters(run))
    x, y = digits()
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    asked: dict[int, dict[str, float]] = {}
    for i in range(STEPS):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        value = float(loss.detach())
        pattern.log(run, i, "before", value, asked)
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt)
        opt.step()
        pattern.log(run, i, "after", value, asked)
    watcher.close()
    sync_file = run.settings.sync_file
    run.finish()
    return read_run_log(sync_file), asked, sync_file, watcher


def user_rows(log: RunLog) -> dict[int, dict[str, object]]:
    """Each history row's user keys (not gradwatch's, not wandb's own ``_`` keys)."""
    rows = {}
    for row in log.history:
        mine = {k: v for k, v in row.values.items() if not k.startswith(("_", "gradwatch/"))}
        if mine:
            rows[row.step] = mine
    return rows


def assert_rows_untouched(log: RunLog, asked: dict[int, dict[str, float]]) -> None:
    got = user_rows(log)
    assert got.keys() == asked.keys(), "user rows moved, dropped or added"
    for step, values in asked.items():
        assert got[step] == pytest.approx(values, rel=1e-12), f"row {step}"
    # gradwatch committed no row itself: a row without user data can only be one the run
    # was building when the user's first step= jumped ahead of it (step 0) or when the
    # run finished (the last one). A row of gradwatch's own anywhere else moved the step.
    own = [row.step for row in log.history if row.step not in asked]
    assert set(own) <= {0, log.history[-1].step}, own
    assert [row.step for row in log.history] == sorted(row.step for row in log.history)


@pytest.mark.parametrize("every", [1, 15])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_users_rows_stay_where_they_asked_and_gradwatch_values_are_all_kept(
    tmp_path, pattern, every
):
    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log, asked, sync_file, _ = train_and_log(
            tmp_path, pattern, lambda run: [WandbReporter(run), recorder], every=every
        )
    assert_rows_untouched(log, asked)

    # Every monitored step's values: once, in a history row or in the stats table.
    in_history = {row["gradwatch/step"]: row.values for row in log.rows_with("gradwatch/step")}
    in_table: dict[int, dict] = {}
    table_entry = log.summary.get("gradwatch/stats_table")
    if table_entry is not None:
        columns, rows = read_table(sync_file, table_entry)
        in_table = {row[0]: dict(zip(columns, row)) for row in rows}
        assert columns[0] == "gradwatch/step"
    assert in_history.keys().isdisjoint(in_table)
    assert sorted(in_history.keys() | in_table.keys()) == list(range(0, STEPS, every))
    for step, values in {**in_history, **in_table}.items():
        layers = recorder.stats[step].layers
        assert values["gradwatch/grad_rms/0"] == pytest.approx(layers["0"].grad_rms, rel=1e-12)
        assert values["gradwatch/grad_norm/4"] == pytest.approx(layers["4"].grad_norm, rel=1e-12)

    # Said once in the terminal, and only when values had to go to the table.
    said = [w for w in caught if "gradwatch never commits rows" in str(w.message)]
    assert len(said) == (1 if in_table else 0)
    if pattern.name.startswith("every step,") and every == 15:
        assert not in_table  # each monitored step's values are in a row the user logged


def test_charts_plot_against_gradwatch_step_whichever_row_values_land_in(tmp_path):
    """Per epoch with step=epoch and gradwatch every 15 steps: the user's 4 rows are
    untouched, the per-layer metrics are defined against gradwatch/step, the chart and
    the closing tables are in the run."""
    pattern = PATTERNS[4]
    log, asked, sync_file, watcher = train_and_log(
        tmp_path, pattern, lambda run: [WandbReporter(run, chart_every=2)], every=15
    )
    assert_rows_untouched(log, asked)
    assert sorted(asked) == [0, 1, 2, 3]
    defined = {m["name"]: m["step_metric"] for m in log.metrics if m["name"]}
    assert defined["gradwatch/grad_rms/0"] == "gradwatch/step"
    assert defined["gradwatch/global_grad_norm"] == "gradwatch/step"
    assert "gradwatch/gradient_flow" in log.config["_wandb"]["visualize"]
    columns, _ = read_table(sync_file, log.summary["gradwatch/findings_table"])
    assert columns[:2] == ["step", "code"]
    assert log.summary["gradwatch/problems"] == len(watcher.summary())


def test_metrics_false_leaves_the_run_and_its_steps_to_its_owner(tmp_path):
    """The contract the Lightning and Transformers integrations rely on: with
    metrics=False against an existing run the reporter writes no step key and adds no
    row; its chart rides in the owner's rows; alerts and summary are still written."""
    recorder = Recorder()
    model = mlp(12, nn.Tanh, std=0.05)  # its gradient vanishes: GW101
    log, asked, sync_file, _ = train_and_log(
        tmp_path,
        PATTERNS[5],  # the owner logs every step with step=
        lambda run: [WandbReporter(run, metrics=False, chart_every=1), recorder],
        every=10,
        model=model,
    )
    assert_rows_untouched(log, asked)
    assert not log.rows_with("gradwatch/step")
    assert not [m for m in log.metrics if m["name"].startswith("gradwatch/")]
    charted = log.rows_with("gradwatch/gradient_flow_table")
    assert charted and all(row.step in asked for row in charted[:-1])
    assert [a.title for a in log.alerts] == ["GW101 vanishing-gradient"]
    assert log.summary["gradwatch/GW101/count"] == 1
    _, table = read_table(sync_file, log.summary["gradwatch/findings_table"])
    assert [r[1] for r in table if r[4] == "new"] == ["GW101"]


def _three_steps_after_finish(tmp_path, reporters) -> tuple[float, gradwatch.Watcher, object]:
    torch.manual_seed(0)
    run = offline_run(tmp_path, "finish-first")
    model = mlp(3, nn.ReLU, init="kaiming")
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=reporters(run))
    x, y = digits()

    def train_step(i: int) -> None:
        batch = slice(i * 64, (i + 1) * 64)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        watcher.step()

    for i in range(10):
        train_step(i)
        run.log({"loss": float(i)})
    run.finish()
    start = time.perf_counter()
    for i in range(10, 13):
        train_step(i)
    return time.perf_counter() - start, watcher, run


def test_finishing_the_run_before_closing_the_watcher_costs_nothing(tmp_path):
    """run.finish() then three more training steps then watcher.close(): the steps take
    no longer than without W&B (no call waits on the finished run), nothing raises, and
    the closing tables and summary of both reporters on the run were written from inside
    run.finish()."""
    bare, _, _ = _three_steps_after_finish(tmp_path / "bare", lambda run: [])
    reporters = []

    def with_wandb(run):
        reporters.extend([WandbReporter(run), WandbReporter(run, prefix="second")])
        return reporters

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        took, watcher, run = _three_steps_after_finish(tmp_path / "wandb", with_wandb)
        start = time.perf_counter()
        watcher.close()
        closing = time.perf_counter() - start
    assert not [w for w in caught if issubclass(w.category, GradwatchWarning)]  # nothing lost
    # Generous slack: before the fix each step waited 30 s on the finished run.
    assert took < bare + 2.0, (took, bare)
    assert closing < 2.0
    for reporter in reporters:
        assert reporter.disabled == "the W&B run is finished" and not reporter.active
    log = read_run_log(run.settings.sync_file)
    assert [row.step for row in log.rows_with("loss")] == list(range(10))
    assert max(r["gradwatch/step"] for r in log.rows_with("gradwatch/step")) == 9
    for prefix in ("gradwatch", "second"):
        assert f"{prefix}/findings_table" in log.summary
        assert log.summary[f"{prefix}/problems"] == 0


def test_thinned_rows_stay_bounded_and_span_the_whole_run():
    rows = ThinnedRows(limit=8)
    for step in range(1000):
        rows.add({"gradwatch/step": step, "x": float(step)})
    kept = [row["gradwatch/step"] for row in rows.rows]
    assert len(kept) <= 8 and rows.seen == 1000
    assert kept[0] == 0 and kept[-1] >= 1000 - 1000 // 8  # first and late steps both kept
    gaps = {b - a for a, b in itertools.pairwise(kept)}
    assert len(gaps) == 1  # evenly spaced
    assert rows.columns(first="x") == ["x", "gradwatch/step"]


def test_stats_table_is_bounded_in_a_real_run(tmp_path, monkeypatch):
    """The user never logs and gradwatch measures every step: the table keeps at most its
    limit of rows, evenly spread from the first step to the last ones."""
    from gradwatch.integrations import wandb as gw_wandb

    monkeypatch.setattr(gw_wandb, "_STATS_TABLE_LIMIT", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradwatchWarning)
        log, asked, sync_file, _ = train_and_log(
            tmp_path, PATTERNS[3], lambda run: [WandbReporter(run, chart_every=None)], every=1
        )
    assert asked == {}
    _, rows = read_table(sync_file, log.summary["gradwatch/stats_table"])
    steps = [row[0] for row in rows]
    assert 5 <= len(steps) <= 10 and steps[0] == 0 and steps[-1] >= STEPS // 2
    assert [row["gradwatch/step"] for row in log.rows_with("gradwatch/step")] == [STEPS - 1]


def test_summary_written_at_finish_matches_the_watchers(tmp_path):
    """run.finish() before watcher.close() on a deep tanh net (GW101): the summary written
    from inside run.finish() says what watcher.summary() says."""
    torch.manual_seed(0)
    log, asked, _, watcher = _finish_then_close(tmp_path, mlp(12, nn.Tanh, std=0.05))
    rows = watcher.summary()
    assert [row.code for row in rows] == ["GW101"]
    assert log.summary["gradwatch/GW101/count"] == 1
    assert log.summary["gradwatch/GW101/first_step"] == rows[0].first_step
    assert log.summary["gradwatch/GW101/status"] == "active"
    assert log.summary["gradwatch/problems"] == log.summary["gradwatch/active_problems"] == 1
    assert_rows_untouched(log, asked)


def _finish_then_close(tmp_path, model):
    run = offline_run(tmp_path, "finish-then-close")
    watcher = gradwatch.watch(model, every_n_steps=10, reporters=[WandbReporter(run)])
    x, y = digits()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    asked = {}
    for i in range(100):
        loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
        opt.zero_grad()
        loss.backward()
        watcher.step(optimizer=opt)
        opt.step()
        _every_step(run, i, "after", float(loss.detach()), asked)
    sync_file = run.settings.sync_file
    run.finish()
    watcher.close()
    return read_run_log(sync_file), asked, sync_file, watcher
