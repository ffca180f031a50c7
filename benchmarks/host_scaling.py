"""How gradwatch's host work grows with the number of layers, in one run.

Narrow ReLU MLPs (Linear(32, 32) x L, batch 32) at several depths: the arithmetic of a step
is small, so what gradwatch adds is its per-layer Python and the operations it launches.
For each depth, five copies train in lockstep with ``watcher.step(loss=loss)`` (see
benchmarks/host_cost.py, whose measurement this reuses): bare, every step measured,
defaults, the floor monitor, and the floor of the every-step check. Each step is timed in
thread CPU time. It reports per depth:

  monitored adds        median monitored step minus the bare median (hooks + step())
  in step()             the part of it inside ``watcher.step()``
  floor monitor adds    the same for the least a per-layer monitor can do each step:
                        ReLU unit masks from per-module forward hooks, one fused norm pass
                        over the gradients, one read-back (see benchmarks/overhead.py)
  in between            time inside ``watcher.step()`` of a step that is not monitored
  its floor             the every-step check's own arithmetic, timed the same way
  above floor           in between minus its floor

and the per-layer slopes (least squares over the depths), with the fixed part (the
intercept).

Steps in between run right after ``backward()``, when the step's own memory traffic has
left the CPU caches cold: any code that the training step itself did not just run pays
several times its warm cost (the every-step check costs ~12 us warm, ~100 us here at
400 layers), and more the deeper the model. That is gradwatch's cost (a bare loop runs
none of that code), so it is not netted out. "Its floor" is the part no leaner
implementation could remove: the every-step check's own arithmetic (the same sample of
gradients concatenated into a kept buffer, its norm, the norm and the loss read with
``item()``) written out by hand in a bare copy that trains in the same lockstep and timed
right after its ``backward()``; "above floor" is the rest (gradwatch's Python around it).
See docs/between-steps.md.

Run:  python benchmarks/host_scaling.py                      (about 3 minutes on 2 cores)
      python benchmarks/host_scaling.py --depths 10,50 --steps 40 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

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
        r = measure(case, steps_for(depth, args.steps), args.warmup, pass_loss=True, floor=True)
        r["between_above_floor_us"] = r["between_in_step_us"] - r["floor_us"]
        rows.append(r)
        print(f"{case}: done", file=sys.stderr)

    layers = [float(r["weight_layers"]) for r in rows]
    mon_slope, mon_fixed = slope(layers, [1e3 * r["monitored_extra_ms"] for r in rows])
    mfloor_slope, mfloor_fixed = slope(layers, [1e3 * r["monitor_floor_ms"] for r in rows])
    step_slope, step_fixed = slope(layers, [1e3 * r["in_step_ms"] for r in rows])
    between_slope, between_fixed = slope(layers, [r["between_in_step_us"] for r in rows])
    floor_slope, floor_fixed = slope(layers, [r["floor_us"] for r in rows])
    print(f"\nhost cost by depth (torch {torch.__version__}, 1 thread, step(loss=), "
          "thread CPU time)\n")
    print("| weight layers | bare step | monitored adds | in step() | in hooks | per layer "
          "| floor monitor adds | in between (in step()) | its floor | above floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['weight_layers']} | {r['bare_ms']:.2f} ms | {r['monitored_extra_ms']:.2f} ms"
            f" | {r['in_step_ms']:.2f} ms | {r['in_hooks_ms']:.2f} ms"
            f" | {r['per_layer_us']:.1f} us | {r['monitor_floor_ms']:.2f} ms"
            f" | {r['between_in_step_us']:.0f} us"
            f" | {r['floor_us']:.0f} us | {r['between_above_floor_us']:.0f} us |"
        )
    print(
        f"\nslope: monitored adds {mon_slope:.1f} us/layer + {mon_fixed:.0f} us"
        f" (the floor monitor: {mfloor_slope:.1f} us/layer + {mfloor_fixed:.0f} us);"
        f" in step() {step_slope:.1f} us/layer + {step_fixed:.0f} us;"
        f" in between {between_slope:.3f} us/layer + {between_fixed:.0f} us"
        f" (its floor: {floor_slope:.3f} us/layer + {floor_fixed:.0f} us)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "results": rows,
                    "slope_us_per_layer": {
                        "monitored": mon_slope,
                        "monitor_floor": mfloor_slope,
                        "in_step": step_slope,
                        "between": between_slope,
                        "floor": floor_slope,
                    },
                    "fixed_us": {
                        "monitored": mon_fixed,
                        "monitor_floor": mfloor_fixed,
                        "in_step": step_fixed,
                        "between": between_fixed,
                        "floor": floor_fixed,
                    },
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
