"""Two-process DDP (gloo, CPU) runs of gradwatch with Transformers and Accelerate; launched by
tests/test_distributed.py through torchrun.

Usage: torchrun --standalone --nproc_per_node 2 tests/dist_scripts/ddp_transformers.py OUT_DIR

Each rank writes OUT_DIR/rank<k>.json for the test to check.

Run A: the Trainer (DDP over gloo) on a 30-layer sigmoid network with ``stop_on="GW101"``,
clipping far below the gradient norm, and a reporter that raises: training must stop on
both ranks at the same step without a hang, the finding must be printed once, and the
logged gradwatch/global_grad_norm must be the Trainer's own (averaged, unclipped) grad_norm.
Run B: a plain Accelerate loop with gradient accumulation; the watcher is given the
prepared (DDP-wrapped) model and measures inside ``if accelerator.sync_gradients:``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # hf_models, and the tests package

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hf_models import deep_sigmoid, digit_data, trainer_args  # noqa: E402
from process_end import end_process  # noqa: E402
from transformers import Trainer  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.integrations.transformers import GradWatchCallback  # noqa: E402


class FailingReporter(gradwatch.Reporter):
    name = "failing"

    def report(self, stats, findings):
        raise RuntimeError("this reporter fails on purpose")


def run_a(out: Path) -> dict:
    callback = GradWatchCallback(
        every_n_steps=5,
        stop_on="GW101",
        reporters=[gradwatch.TerminalReporter(), gradwatch.LoggingReporter(), FailingReporter()],
    )
    args = trainer_args(out / "a", max_steps=60, logging_steps=5, max_grad_norm=1e-3,
                        ddp_backend="gloo", per_device_train_batch_size=8)
    trainer = Trainer(model=deep_sigmoid(), args=args, train_dataset=digit_data(),
                      callbacks=[callback])
    trainer.train()
    watcher = callback.watcher
    return {
        "wrapper": type(trainer.model_wrapped).__name__,
        "findings": [f.to_dict() for f in callback.findings],
        "stop_reason": callback.stop_reason,
        "global_step": trainer.state.global_step,
        "reporters": [getattr(r, "name", type(r).__name__) for r in watcher.reporters],
        "disabled": watcher.disabled,
        "measured": [s.step for s in watcher.history],
        "rows": [
            {k: v for k, v in row.items()
             if k in ("step", "grad_norm", "gradwatch/global_grad_norm")}
            for row in trainer.state.log_history
            if "loss" in row
        ],
    }


def run_b() -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = deep_sigmoid()
    data = digit_data()[:512]
    x = torch.stack([row["x"] for row in data])
    y = torch.stack([row["labels"] for row in data])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    watcher = gradwatch.watch(prepared, every_n_steps=2, reporters=[])  # DDP is unwrapped
    own: dict[int, float] = {}
    step = 0
    for inputs, labels in loader:
        with accelerator.accumulate(prepared):
            accelerator.backward(prepared(inputs, labels)["loss"])
            if accelerator.sync_gradients:
                own[step] = float(torch.sqrt(sum(p.grad.double().pow(2).sum()
                                                 for p in model.parameters())))
                watcher.step(step, optimizer=optimizer)
                accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
                step += 1
            optimizer.step()
            optimizer.zero_grad()
    watcher.close()
    history = list(watcher.history)
    return {
        "wrapper": type(prepared).__name__,
        "steps": step,
        "layers": sorted(history[0].layers)[:3],
        "measured": {s.step: s.global_grad_norm for s in history},
        "own": {s.step: own[s.step] for s in history},
        "findings": [f.to_dict() for f in watcher.findings],
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    result = {"a": run_a(out), "b": run_b()}
    rank = dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    end_process()
