"""`gradwatch rules` and `gradwatch explain`."""

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
