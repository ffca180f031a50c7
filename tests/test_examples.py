"""Smoke tests: each example in examples/ runs to the end as a user would run it.

Each runs in its own process (``python examples/NAME.py``) from an empty folder, with
W&B offline, and must exit 0 and print at least one gradwatch finding code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FINDING_CODE = re.compile(r"\bGW\d{3}\b")


def run_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = EXAMPLES / name
    if not script.exists():
        pytest.skip(f"{script} does not exist yet")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(cwd),
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        # Tiny models: on a busy 2-core machine extra threads spin-wait (10x slower).
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{output[-4000:]}"
    return proc


@pytest.mark.parametrize("name", ["lightning_callback.py", "wandb_alerts.py"])
def test_example_runs_and_reports_a_finding(name, tmp_path):
    proc = run_example(name, tmp_path)
    output = proc.stdout + proc.stderr
    assert FINDING_CODE.search(output), f"{name} printed no finding:\n{output[-4000:]}"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("plain_pytorch.py", "GW101"),
        ("accelerate_loop.py", "GW101"),
        ("transformers_trainer.py", "GW104"),
    ],
)
def test_example_finds_the_broken_model_and_not_the_fixed_one(name, code, tmp_path):
    proc = run_example(name, tmp_path)
    assert FINDING_CODE.search(proc.stdout + proc.stderr)
    last = proc.stdout.strip().splitlines()[-1]
    assert re.search(rf"broken model: [1-9]\d* finding\(s\) \(.*{code}.*\)", last), last
    assert last.endswith("fixed model: 0 finding(s)"), last
