"""`gradwatch rules` and `gradwatch explain`."""

import itertools
import json
import subprocess
import sys

import pytest

from gradwatch.cli import main


def test_rules_lists_every_builtin_rule(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for code, slug in [
        ("GW101", "vanishing-gradient"),
        ("GW102", "exploding-gradient"),
        ("GW103", "non-finite-gradient"),
        ("GW104", "no-gradient"),
        ("GW201", "dead-units"),
        ("GW202", "saturated-activation"),
    ]:
        assert code in out and slug in out


@pytest.mark.parametrize("name", ["GW101", "vanishing-gradient", "gw101"])
def test_explain_by_code_or_slug(capsys, name):
    assert main(["explain", name]) == 0
    out = capsys.readouterr().out
    assert "GW101 vanishing-gradient" in out
    assert "0.25^30" in out and "8.7e-19" in out  # why: the derivative's bound over 30 layers
    assert "residual" in out and "kaiming" in out  # how to fix
    assert "ratio = 0.01" in out  # the threshold and how to change it


def test_explain_dead_units_mentions_functional_relu(capsys):
    assert main(["explain", "dead-units"]) == 0
    assert "F.relu" in capsys.readouterr().out


@pytest.mark.parametrize("code", ["GW101", "GW102", "GW104", "GW203"])
def test_explain_wraps_to_the_terminal_not_to_the_source(capsys, monkeypatch, code):
    """At 80 columns no line is a stub left over from re-wrapping the source's lines
    (which are up to 88 characters): each paragraph flows to the terminal's width."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["explain", code]) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[2 : next(i for i, line in enumerate(lines) if line.startswith("Thresholds"))]
    stubs = [
        line
        for line, following in itertools.pairwise(body)
        if line and following and not following.startswith("- ") and len(line) < 60
    ]
    assert len(body) > 5 and stubs == [], stubs


def test_explain_unknown_rule_is_a_clear_error(capsys):
    assert main(["explain", "GW999"]) == 2
    assert "known rules" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "rules"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "GW202" in result.stdout


def test_help_names_the_experiment_in_words_a_user_knows(capsys):
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "sigmoid" in out and "ReLU" in out and "residual" in out
        assert "seed document" not in out


def test_rules_json_lists_every_rule_with_its_texts_and_thresholds(capsys):
    from gradwatch.rules import BUILTIN_RULES

    assert main(["rules", "--json"]) == 0
    rules = json.loads(capsys.readouterr().out)
    assert [r["code"] for r in rules] == sorted(cls.code for cls in BUILTIN_RULES)
    by_code = {r["code"]: r for r in rules}
    vanishing = by_code["GW101"]
    assert vanishing["slug"] == "vanishing-gradient" and vanishing["severity"] == "warning"
    assert "0.25^30" in vanishing["explanation"]
    assert {"name": "ratio", "default": 0.01, "accepts": "a number in (0, 1)"}.items() <= (
        vanishing["thresholds"][0].items()
    )
    assert vanishing["window"] == 3
