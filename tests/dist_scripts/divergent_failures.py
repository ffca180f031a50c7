"""One rank's statistics fail, the other's do not: no rank may hang or crash.

Usage: python tests/dist_scripts/divergent_failures.py OUT_DIR

Two scenarios, each in its own pair of processes (gloo, CPU), through the plain
``gradwatch.watch`` API; after every step both ranks make an all_reduce of another
size, standing in for DDP's gradient synchronisation, so a gradwatch collective left
without its partner would meet it and abort the run:

- ``before``: on rank 0 the statistics raise inside the measurement at the second
  monitored step, before the cross-rank reduction;
- ``after``: on rank 0 reading the reduced statistics raises at the first monitored step,
  after the reduction (the other rank has finished that step's collectives).

OUT_DIR/results.json holds, per scenario, each rank's disabled parts after every step,
or "crashed"/"hung".
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from process_end import end_process  # the script's own folder is on sys.path
from torch import nn

WORLD = 2
STEPS = 4


def fail_before_reduction() -> None:
    import gradwatch.collect as collect

    measure, norms = collect.Collector.measure, collect._norms
    calls = []

    def counting_measure(self, *args, **kwargs):
        calls.append(1)
        return measure(self, *args, **kwargs)

    def failing_norms(tensors):
        if len(calls) == 2:
            raise RuntimeError("statistics fail on rank 0 only, before the reduction")
        return norms(tensors)

    collect.Collector.measure = counting_measure
    collect._norms = failing_norms


def fail_after_reduction() -> None:
    import gradwatch.watcher as watcher_module

    def failing_read(*args, **kwargs):
        raise RuntimeError("reading the statistics fails on rank 0 only, after the reduction")

    watcher_module.read = failing_read


def worker(rank: int, scenario: str, init_file: str, out: str) -> None:
    import gradwatch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    if rank == 0:
        {"before": fail_before_reduction, "after": fail_after_reduction}[scenario]()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    watcher = gradwatch.watch(model, every_n_steps=1, reporters=[])
    steps = []
    for _ in range(STEPS):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        watcher.step()
        sync = torch.ones(1000)
        dist.all_reduce(sync)  # what DDP does in the next backward pass
        steps.append({"disabled": sorted(watcher.disabled), "sync": float(sync[0])})
    watcher.close()
    Path(out, f"{scenario}-rank{rank}.json").write_text(json.dumps(steps))
    end_process()


def run(scenario: str, out: Path, deadline_s: float = 60.0) -> object:
    init = Path(tempfile.mkdtemp(dir=out)) / "pg_init"
    try:
        context = torch.multiprocessing.spawn(
            worker, args=(scenario, str(init), str(out)), nprocs=WORLD, join=False
        )
        deadline = time.monotonic() + deadline_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                return "hung"
    except Exception:
        return "crashed: " + traceback.format_exc(limit=1)
    return [json.loads((out / f"{scenario}-rank{r}.json").read_text()) for r in range(WORLD)]


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    results = {scenario: run(scenario, out_dir) for scenario in ("before", "after")}
    (out_dir / "results.json").write_text(json.dumps(results))
