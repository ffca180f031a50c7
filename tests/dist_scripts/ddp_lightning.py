"""Two-process DDP (gloo, CPU) runs of GradWatchCallback; launched by tests/test_distributed.py.

Usage: python tests/dist_scripts/ddp_lightning.py OUT_DIR

Lightning's DDP launcher re-executes this script for rank 1, so everything happens under
``if __name__ == "__main__"``. Each rank writes OUT_DIR/rank<k>.json for the test to check.

Run A: a deep tanh model (vanishing gradient) with ``stop_on="GW101"`` and, on rank 0, a
reporter that raises: training must stop on both ranks without a hang, and the finding
must be printed once. Run B: a healthy ReLU model whose unit 0 of the first ReLU is active
only on rank 0's data: after the cross-rank reduction it must count as alive on both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # lit_models, and the tests package

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lit_models import Classifier, deep_tanh, healthy, quiet_trainer  # noqa: E402
from process_end import end_process  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.integrations.lightning import GradWatchCallback  # noqa: E402
from tests.support import digits  # noqa: E402


class FailingReporter(gradwatch.Reporter):
    name = "failing"

    def report(self, stats, findings):
        raise RuntimeError("this reporter fails on purpose")


class GradNorms(L.Callback):
    """This rank's own global gradient norm before each optimizer step (DDP has averaged
    the gradients by then, so every rank holds the same ones)."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


class RankData(Classifier):
    """Digits whose pixel 0 (always 0 in the data set) is > 0 on rank 0 and < 0 on rank 1;
    the first layer's unit 0 reads only that pixel, so it is active on rank 0 only."""

    def train_dataloader(self):
        x, y = digits()
        sign = 1.0 if self.global_rank == 0 else -1.0
        x[:, 0] = sign * (x[:, 1:].abs().mean(1) + 0.5)
        self.first_batch_x0_positive = bool((x[:64, 0] > 0).any())
        return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)


def run_a(out: Path) -> dict:
    callback = GradWatchCallback(
        every_n_steps=5,
        stop_on="GW101",
        reporters=[gradwatch.TerminalReporter(), gradwatch.LoggingReporter(), FailingReporter()],
    )
    x, y = digits()
    trainer = quiet_trainer(
        strategy="ddp",
        devices=2,
        max_steps=40,
        callbacks=[callback],
        logger=CSVLogger(str(out), name="ddp"),
        log_every_n_steps=5,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer.fit(deep_tanh(), loader)
    watcher = callback.watcher
    return {
        "findings": [f.to_dict() for f in callback.findings],
        "stop_reason": callback.stop_reason,
        "global_step": trainer.global_step,
        "reporters": [getattr(r, "name", type(r).__name__) for r in watcher.reporters],
        "disabled": watcher.disabled,
        "log_dir": trainer.logger.log_dir if trainer.is_global_zero else None,
    }


def run_b() -> dict:
    base = healthy()
    model = RankData(base.net, lr=base.lr)
    first = model.net[0]
    with torch.no_grad():
        first.weight[0].zero_()
        first.weight[0, 0] = 1.0
        first.bias[0] = 0.0
        first.weight[1].zero_()
        first.bias[1] = -1.0  # unit 1: dead on every rank (the control)
    callback = GradWatchCallback(every_n_steps=2, reporters=[])
    norms = GradNorms()
    trainer = quiet_trainer(
        strategy="ddp", devices=2, max_steps=10, callbacks=[norms, callback],
        use_distributed_sampler=False,
    )
    trainer.fit(model)
    steps = list(callback.watcher.history)
    first_stats = steps[0]
    return {
        "findings": [f.to_dict() for f in callback.findings],
        "step0": first_stats.step,
        "active_units_step0": first_stats.layers["net.1"].active_units.indices(),
        "units": first_stats.layers["net.1"].active_units.size,
        "own_x0_positive": model.first_batch_x0_positive,
        "steps": [s.step for s in steps],
        "global_grad_norm": {s.step: s.global_grad_norm for s in steps},
        "own_grad_norm": {s.step: norms.norms[s.step] for s in steps},
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    result = {"a": run_a(out), "b": run_b()}
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    end_process()
