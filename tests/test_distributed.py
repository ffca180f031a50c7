"""Distributed training with real processes on the CPU (gloo): DDP through Lightning and
through the Transformers Trainer (torchrun), a plain Accelerate loop, FSDP2 through the plain
API and through Lightning's ModelParallelStrategy, and one rank's statistics failing while
the other's do not.

Each test launches a script from tests/dist_scripts/ in a subprocess (Lightning's DDP
launcher re-executes its script; FSDP2 uses torch.multiprocessing; the Trainer runs under
torchrun) with a timeout, so a deadlock fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPTS = Path(__file__).parent / "dist_scripts"
TIMEOUT = 240


def _launch(script: str, out: Path, *, torchrun: bool = False) -> tuple[list[dict], str]:
    """Run ``script OUT`` (under torchrun with two processes if asked) and read each rank's
    rank<k>.json."""
    output = _run(script, out, torchrun=torchrun)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks, output


def _run(script: str, out: Path, *, torchrun: bool = False) -> str:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    env.pop("LOCAL_RANK", None)
    # A session of its own, so that a hang can be ended with every process it started.
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*launcher, str(SCRIPTS / script), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=out,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script} did not finish in {TIMEOUT}s (a deadlock?):\n{output[-6000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


def test_ddp_two_processes(tmp_path):
    ranks, output = _launch("ddp_lightning.py", tmp_path)
    a0, a1 = ranks[0]["a"], ranks[1]["a"]

    # Deep tanh: the vanishing gradient is found, identically on both ranks (the rules saw
    # the same combined statistics) ...
    codes = [f["code"] for f in a0["findings"] if f["status"] == "new"]
    assert "GW101" in codes
    assert a0["findings"] == a1["findings"]
    # ... announced once, from rank 0 only (rank 1 has no reporters) ...
    assert output.count("GW101 vanishing-gradient at step") == 1, output[-6000:]
    assert a1["reporters"] == []
    assert {"terminal", "logging", "framework-metrics"} <= set(a0["reporters"])
    # ... a reporter failing on rank 0 only is switched off without a hang, and stop_on
    # stops both ranks at the same step (a rank left running would wait forever).
    assert "reporter failing" in a0["disabled"] and a1["disabled"] == {}
    assert a0["global_step"] == a1["global_step"] < 40
    assert "GW101" in a0["stop_reason"] and "GW101" in a1["stop_reason"]
    with open(Path(a0["log_dir"]) / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert "gradwatch/grad_norm/net.0" in header and "gradwatch/findings/GW101" in header

    b0, b1 = ranks[0]["b"], ranks[1]["b"]
    # Unit 0 of the first ReLU is active only on rank 0's data; after the cross-rank
    # reduction it counts as alive on rank 1 too. Unit 1 is dead everywhere and stays so.
    assert b0["own_x0_positive"] is True and b1["own_x0_positive"] is False
    for b in (b0, b1):
        assert b["step0"] == 0 and b["units"] == 64
        assert 0 in b["active_units_step0"]
        assert 1 not in b["active_units_step0"]
        assert [f for f in b["findings"] if f["severity"] != "info"] == []
    assert b0["active_units_step0"] == b1["active_units_step0"]
    # DDP has averaged the gradients: the reduced norm is each rank's own norm, unchanged.
    for b in (b0, b1):
        for step, norm in b["global_grad_norm"].items():
            assert math.isclose(norm, b["own_grad_norm"][step], rel_tol=1e-5)


def test_transformers_trainer_and_accelerate_loop_ddp_two_processes(tmp_path):
    pytest.importorskip("transformers")
    ranks, output = _launch("ddp_transformers.py", tmp_path, torchrun=True)
    a0, a1 = ranks[0]["a"], ranks[1]["a"]
    assert a0["wrapper"] == "DistributedDataParallel"
    # The vanishing gradient is found identically on both ranks, announced once by rank 0 ...
    assert [f["code"] for f in a0["findings"] if f["status"] == "new"] == ["GW101"]
    assert a0["findings"] == a1["findings"]
    assert output.count("GW101 vanishing-gradient at step") == 1, output[-6000:]
    assert {"terminal", "logging"} <= set(a0["reporters"]) and a1["reporters"] == [
        "framework-metrics"
    ]
    # ... a reporter failing on rank 0 is switched off without a hang, and stop_on stops
    # both ranks at the same step.
    assert "reporter failing" in a0["disabled"] and a1["disabled"] == {}
    assert a0["global_step"] == a1["global_step"] < 60
    assert "GW101" in a0["stop_reason"] and "GW101" in a1["stop_reason"]
    assert a0["measured"] == a1["measured"] and a0["measured"][0] == 1
    # Each logged row holds the Trainer's own grad_norm (averaged across ranks, before
    # clipping at 1e-3) as gradwatch's global norm.
    assert a0["rows"] and a0["rows"] == a1["rows"]
    for row in a0["rows"]:
        assert math.isclose(row["gradwatch/global_grad_norm"], row["grad_norm"], rel_tol=1e-5)
        assert row["grad_norm"] > 0.1

    # The plain Accelerate loop: the prepared model is DDP; the watcher names its layers
    # as the model itself does, measures once per optimizer step (accumulation 2), and the
    # reduced norm is each rank's own (DDP has averaged the gradients).
    for b in (ranks[0]["b"], ranks[1]["b"]):
        assert b["wrapper"] == "DistributedDataParallel" and b["steps"] == 8
        assert b["layers"] == ["net.0", "net.1", "net.10"]
        assert list(b["measured"]) == ["0", "2", "4", "6"]
        for step, norm in b["measured"].items():
            assert math.isclose(norm, b["own"][step], rel_tol=1e-5)
    assert ranks[0]["b"]["measured"] == ranks[1]["b"]["measured"]


def test_fsdp2_norms_from_shards_equal_unsharded(tmp_path):
    ranks, _ = _launch("fsdp2_norms.py", tmp_path)
    for result in ranks:
        assert "plain_error" not in result, result.get("plain_error")
        plain = result["plain"]
        assert plain["sharded_types"] == ["DTensor"] and plain["disabled"] == {}
        assert set(plain["got"]) == {"0", "2", "4", "5"}
        for name, expected in plain["expected"].items():
            assert math.isclose(plain["got"][name], expected, rel_tol=1e-5), name
            # the shard alone is not the answer: the reduction across ranks is needed
            assert plain["local_only"][name] < expected * 0.9
            assert plain["numel"][name] == plain["expected_numel"][name]
            assert math.isclose(plain["got_max"][name], plain["expected_max"][name], rel_tol=1e-6)
        assert math.isclose(plain["got_global"], plain["expected_global"], rel_tol=1e-5)

        # Through the callback under Lightning's ModelParallelStrategy (FSDP2 on CPU).
        assert "lightning_error" not in result, result.get("lightning_error")
        lit = result["lightning"]
        assert lit["steps"] == [0, 1, 2] and lit["disabled"] == {}
        for step, expected in lit["expected"].items():
            assert set(expected) == {"net.0", "net.2", "net.4", "net.5"}
            for name, norm in expected.items():
                assert math.isclose(lit["got"][step][name], norm, rel_tol=1e-5), (step, name)


@pytest.fixture(scope="module")
def divergent(tmp_path_factory):
    out = tmp_path_factory.mktemp("divergent")
    _run("divergent_failures.py", out)
    return json.loads((out / "results.json").read_text())


def _all_stopped_together(result) -> None:
    assert isinstance(result, list), result  # else "crashed: ..." or "hung"
    for steps in result:
        assert all(step["sync"] == 2.0 for step in steps)  # training's own collectives ran
        assert steps[-1]["disabled"] == ["statistics"]  # every rank switched off together


def test_a_rank_failing_before_the_reduction_does_not_hang_the_others(divergent):
    _all_stopped_together(divergent["before"])
    assert divergent["before"][0][0]["disabled"] == []  # the failure came at the 2nd step


def test_a_rank_failing_after_the_reduction_does_not_crash_the_others(divergent):
    _all_stopped_together(divergent["after"])
