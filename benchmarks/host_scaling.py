"""How gradwatch's host work grows with the number of layers, in one run.

Narrow ReLU MLPs (Linear(32, 32) x L, batch 32) at several depths: the arithmetic of a step
is small, so what gradwatch adds is its per-layer Python and the operations it launches.
For each depth, four copies train in lockstep (bare, every step measured, defaults, and
the floor of per-step monitoring) with ``watcher.step(loss=loss)`` (see
benchmarks/host_cost.py, whose measurement this reuses); each step is timed in thread CPU
time. It reports per depth:

  monitored adds      median monitored step minus the bare median (hooks + step())
  floor adds          the same for the floor: ReLU unit masks from per-module forward
                      hooks, one fused norm pass over the gradients, one read-back (what
                      any per-layer monitor pays; see benchmarks/overhead.py)
  in step()           the part of it inside ``watcher.step()``
  in between          time inside ``watcher.step()`` of a step that is not monitored

and the per-layer slope of "monitored adds", "floor adds" and "in between" (least squares over the
depths), with the fixed part (the intercept).

The first operation of any kind after a backward pass (a one-element in-place add on a
tensor kept from step to step, no allocation) costs more the deeper the model: ~10 us at
10 layers, ~50 us at 1000 on the machine this was written on. That is the training step's
own cost (the bare loop pays it in ``optimizer.step()``), and whichever code runs first
after ``backward()`` is charged with it: the "first op" column measures it in a bare loop,
and "in between, net" is the time inside ``step()`` without it.

Run:  python benchmarks/host_scaling.py                      (about 3 minutes on 2 cores)
      python benchmarks/host_scaling.py --depths 10,50 --steps 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_cost import CASES, measure, mlp_case

DEPTHS = (10, 50, 200, 400, 1000)


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ys over xs.

    >>> slope([1, 2, 3], [3, 5, 7])
    (2.0, 1.0)
    """
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if not var:
        return 0.0, my
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return b, my - b * mx


def first_op_after_backward(depth: int, steps: int = 40) -> float:
    """Median thread time (us) of a one-element in-place add right after ``backward()``
    in a bare training loop of the ``depth``-layer MLP."""
    torch.manual_seed(0)
    model, (x, y) = mlp_case(depth)()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kept = torch.zeros(1)
    times = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        start = time.thread_time()
        kept.add_(1.0)
        times.append(time.thread_time() - start)
        opt.step()
    return 1e6 * statistics.median(times[steps // 4 :])


def steps_for(depth: int, steps: int) -> int:
    """Fewer timed steps for deep models (a 1000-layer step is slow); at least 30."""
    return max(30, min(steps, steps * 50 // depth))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    parser.add_argument("--steps", type=int, default=150, help="timed steps at 50 layers")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        case = f"mlp{depth}"
        CASES.setdefault(case, mlp_case(depth))
        r = measure(case, steps_for(depth, args.steps), args.warmup, pass_loss=True)
        r["first_op_us"] = first_op_after_backward(depth)
        r["between_net_us"] = r["between_in_step_us"] - r["first_op_us"]
        rows.append(r)
        print(f"{case}: done", file=sys.stderr)

    layers = [float(r["weight_layers"]) for r in rows]
    mon_slope, mon_fixed = slope(layers, [1e3 * r["monitored_extra_ms"] for r in rows])
    floor_slope, floor_fixed = slope(layers, [1e3 * r["floor_extra_ms"] for r in rows])
    step_slope, step_fixed = slope(layers, [1e3 * r["in_step_ms"] for r in rows])
    between_slope, between_fixed = slope(layers, [r["between_in_step_us"] for r in rows])
    net_slope, net_fixed = slope(layers, [r["between_net_us"] for r in rows])
    print(f"\nhost cost by depth (torch {torch.__version__}, 1 thread, step(loss=), "
          "thread CPU time)\n")
    print("| weight layers | bare step | monitored adds | in step() | in hooks | per layer "
          "| floor adds | in between (in step()) | first op | in between, net |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['weight_layers']} | {r['bare_ms']:.2f} ms | {r['monitored_extra_ms']:.2f} ms"
            f" | {r['in_step_ms']:.2f} ms | {r['in_hooks_ms']:.2f} ms"
            f" | {r['per_layer_us']:.1f} us | {r['floor_extra_ms']:.2f} ms"
            f" | {r['between_in_step_us']:.0f} us"
            f" | {r['first_op_us']:.0f} us | {r['between_net_us']:.0f} us |"
        )
    print(
        f"\nslope: monitored adds {mon_slope:.1f} us/layer + {mon_fixed:.0f} us"
        f" (the floor: {floor_slope:.1f} us/layer + {floor_fixed:.0f} us);"
        f" in step() {step_slope:.1f} us/layer + {step_fixed:.0f} us;"
        f" in between {between_slope:.3f} us/layer + {between_fixed:.0f} us"
        f" (net of the first op: {net_slope:.3f} us/layer + {net_fixed:.0f} us)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "results": rows,
                    "slope_us_per_layer": {
                        "monitored": mon_slope,
                        "floor": floor_slope,
                        "in_step": step_slope,
                        "between": between_slope,
                        "between_net": net_slope,
                    },
                    "fixed_us": {
                        "monitored": mon_fixed,
                        "floor": floor_fixed,
                        "in_step": step_fixed,
                        "between": between_fixed,
                        "between_net": net_fixed,
                    },
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
