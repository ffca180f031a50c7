"""The README's overhead table is what benchmarks/overhead.py wrote from its last run."""

import doctest
import importlib.util
import json
from pathlib import Path

from gradwatch.demo.readme import read_blocks

ROOT = Path(__file__).resolve().parent.parent


def _overhead():
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_overhead_table_is_the_benchmarks_output():
    overhead = _overhead()
    results = json.loads((ROOT / "benchmarks" / "overhead.json").read_text())
    kind, name = overhead.README_BLOCK
    blocks = read_blocks((ROOT / "README.md").read_text(), kind)
    assert name in blocks, "README.md has no overhead block"
    assert blocks[name] == overhead.readme_table(results), (
        "README overhead table drifted from benchmarks/overhead.json: "
        "python benchmarks/overhead.py --readme (or --from-json FILE)"
    )


def test_the_recorded_run_has_every_model_and_configuration():
    overhead = _overhead()
    results = json.loads((ROOT / "benchmarks" / "overhead.json").read_text())
    for model in overhead.MODEL_TITLES:
        assert set(results[model]) == set(overhead.CONFIG_TITLES), model
        assert results[model]["bare"]["ratio"] == 1.0
        for measured in results[model].values():
            assert measured["low"] <= measured["ratio"] <= measured["high"]
            assert measured["ms"] > 0


def test_the_table_rendering_examples_hold():
    failures, tried = doctest.testmod(_overhead())
    assert tried and not failures
