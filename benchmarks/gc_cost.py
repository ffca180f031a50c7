"""Python's garbage collection in a long watched run: time per monitored step, pauses.

A full collection walks every object the collector tracks, and CPython runs one when the
objects promoted into its oldest generation since the last one exceed a quarter of what
that generation holds. So what a monitored step costs in collections depends on how many
tracked objects each step leaves alive across a young collection (LayerStats, weak
references, tuples holding them, hook handles), far more than on how many the history
holds: a longer history makes each pause longer and the pauses rarer.

The run: a narrow ReLU MLP (Linear(32, 32) x depth, batch 32, as benchmarks/host_cost.py),
every step monitored, ``warmup`` steps first (more than the history's 256 steps, so that
it is full and steps drop out of it as in a long run), then ``steps`` timed steps. It
reports, in thread CPU time: the step, the collections' time per step (summed by a
``gc.callbacks`` hook), the number of collections per generation, each full collection's
pause, the objects the collector tracks at the end and the growth in tracked objects per
timed step by type (``--census``; a leak shows here).

Run:  python benchmarks/gc_cost.py                    (400 layers, 260 + 200 steps: ~20 s)
      python benchmarks/gc_cost.py --depth 50 --census
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_cost import mlp_case

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=260)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--history", type=int, default=256, help="watcher's history=")
    parser.add_argument("--bare", action="store_true", help="no watcher: the loop's own")
    parser.add_argument("--census", action="store_true", help="tracked objects by type")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, (x, y) = mlp_case(args.depth)()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watcher = None
    if not args.bare:
        watcher = gradwatch.watch(
            model, reporters=[], optimizer=opt, every_n_steps=1, history=args.history
        )

    def step(i: int) -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if watcher is not None:
            watcher.step(i, loss=loss)
        opt.step()

    for i in range(args.warmup):
        step(i)
    gc.collect()
    before = None
    if args.census:
        before = collections.Counter(type(o).__name__ for o in gc.get_objects())

    spent = [0.0]
    started = [0.0]
    per_generation = [0, 0, 0]
    pauses: list[float] = []

    def on_collection(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.thread_time()
            return
        took = time.thread_time() - started[0]
        spent[0] += took
        per_generation[info["generation"]] += 1
        if info["generation"] == 2:
            pauses.append(took * 1e3)

    gc.callbacks.append(on_collection)
    t0 = time.thread_time()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    total = time.thread_time() - t0
    gc.callbacks.remove(on_collection)

    print(
        f"depth {args.depth}, {args.steps} steps after {args.warmup}"
        f"{' (bare)' if args.bare else f', history {args.history}'}:"
    )
    per_step = 1e3 / args.steps
    print(f"  step {total * per_step:.2f} ms, collections {spent[0] * per_step:.2f} ms")
    print(f"  collections per generation {per_generation}")
    print(f"  full-collection pauses (ms) {[round(p, 1) for p in pauses]}")
    print(f"  tracked objects {len(gc.get_objects())}")
    if before is not None:
        gc.collect()
        after = collections.Counter(type(o).__name__ for o in gc.get_objects())
        growth = [(k, round(v / args.steps, 1)) for k, v in (after - before).most_common(10)]
        print(f"  tracked objects added per step, by type: {growth}")


if __name__ == "__main__":
    main()
