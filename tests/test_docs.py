"""The README and docs/: what is generated from the code matches the code, every option
and rule is documented, the install commands work from a clone, and the links resolve."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import gradwatch
from gradwatch.demo.readme import read_blocks
from gradwatch.docs import expected, readme_blocks
from gradwatch.docs.options import docstring_options, option_text, step_options, watch_options
from gradwatch.docs.rules import readme_rule_table, rule_facts, rules_reference
from gradwatch.reporters.terminal import summary_text
from gradwatch.rules import BUILTIN_RULES, POSITIVE, Rule

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _callbacks():
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from gradwatch.docs.options import callback_classes

    return callback_classes()


def test_every_generated_file_is_what_the_code_writes():
    _callbacks()
    for path, text in expected(ROOT).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(ROOT)} differs from the code: python -m gradwatch.docs --write"
        )


def test_the_readme_rule_table_has_one_line_per_rule():
    block = read_blocks(README.read_text(), "docs")["rules"]
    assert block == readme_blocks()["rules"]
    rows = [line for line in block.splitlines() if line.startswith("| [")]
    assert [row.split("]")[0][3:] for row in rows] == sorted(cls.code for cls in BUILTIN_RULES)
    for cls, row in zip(sorted(BUILTIN_RULES, key=lambda c: c.code), rows):
        assert f"| {cls.slug} | {cls.severity} |" in row


def test_the_rules_reference_has_each_rules_texts_and_thresholds():
    text = (DOCS / "rules.md").read_text()
    for cls in BUILTIN_RULES:
        assert f"## {cls.code} {cls.slug}" in text
        for name, value in cls.defaults.items():
            assert f"| `{name}` | {value:g} |" in text, (cls.code, name)
        assert cls.summary in text
    assert "0.25^30 ~ 8.7e-19" in text  # GW101's explanation, as `gradwatch explain` prints it


class _NewRule(Rule):
    code, slug = "GW999", "made-up"
    summary = "a rule added later"
    explanation = "What it measures: something new.\n\nWhen it stays silent: otherwise."
    defaults = {"limit": 2.5}
    threshold_docs = {"limit": "how much"}
    threshold_specs = {"limit": POSITIVE}
    window = 1


def test_a_rule_added_later_appears_in_both_tables_when_regenerated():
    rules = [*BUILTIN_RULES, _NewRule]
    reference = rules_reference(rules)
    assert "## GW999 made-up" in reference
    assert "**When it stays silent:** otherwise." in reference
    assert "| `limit` | 2.5 | a number > 0 | how much |" in reference
    assert "announced at the first monitored step that shows it" in reference
    assert readme_rule_table(rules).splitlines()[-1].startswith("| [GW999](docs/rules.md#gw999-")


def test_rule_facts_escape_nothing_and_markdown_escapes_what_it_must():
    facts = rule_facts(_NewRule)
    assert facts["thresholds"] == [
        {"name": "limit", "default": 2.5, "accepts": "a number > 0", "meaning": "how much"}
    ]
    assert "lr\\*g" in (DOCS / "rules.md").read_text()  # "w - lr*g == w" is not emphasis


def test_every_option_is_in_the_options_table():
    callbacks = _callbacks()
    text = (DOCS / "options.md").read_text()
    names = {o.name for o in watch_options()} | {o.name for o in step_options()}
    for _, cls in callbacks:
        names |= {
            p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind is p.KEYWORD_ONLY
        }
    watcher_own = set(inspect.signature(gradwatch.Watcher.__init__).parameters) - {"self", "module"}
    assert watcher_own <= names
    for name in names:
        assert f"| `{name}` |" in text, f"{name} is missing from docs/options.md"
    for name in ("activations", "sync", "deferred", "sentinel", "scaler", "optimizer"):
        assert f"| `{name}` |" in text


def test_an_option_without_a_description_is_an_error_that_names_it():
    with pytest.raises(ValueError, match=r"'brand_new'.*OPTION_TEXT"):
        option_text("brand_new", [None])
    assert option_text("brand_new", ["Args:\n    brand_new: does a thing.\n"]) == "does a thing."


def test_docstring_options_read_both_styles():
    bullets = "Options:\n\n- ``every_n_steps``: how often\n  to measure.\n- ``sync``: ranks.\n"
    found = docstring_options(bullets)
    assert found == {"every_n_steps": "how often to measure.", "sync": "ranks."}


def test_the_first_screen_says_what_it_does_how_to_add_it_and_what_silence_means():
    first = "\n".join(README.read_text().splitlines()[:40])
    assert "gradwatch.watch(model)" in first and "watcher.step()" in first
    assert "loss.backward()" in first and "optimizer.step()" in first
    assert "Silence means" in first
    # the line a healthy run ends with is quoted as the code prints it
    assert summary_text([]) in first


def test_install_commands_work_from_a_clone():
    texts = [README.read_text(), *(p.read_text() for p in DOCS.glob("*.md"))]
    for text in texts:
        assert "pip install 'gradwatch[" not in text and 'pip install "gradwatch[' not in text
    readme = texts[0]
    assert 'pip install -e ".[demo,plot]"' in readme and 'pip install -e ".[dev]"' in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "pip install torch==2.13.0" in readme  # what .ci/run installs
    ci = (ROOT / ".ci" / "run").read_text()
    assert "torch==2.13.0" in ci


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_between_the_readme_and_docs_resolve():
    for page in [README, *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: {target}"


def test_the_readme_is_short_and_its_words_are_plain():
    text = README.read_text()
    assert len(text.splitlines()) < 260
    for word in ("sentinel", "backward signal", "episodes", "deferred"):
        assert word not in text.lower(), word


def _python_block(text: str, marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(block for block in blocks if marker in block)


def test_the_readmes_plain_pytorch_loop_runs_as_written_and_finds_a_vanishing_gradient():
    """The README's loop, pasted into a script with a model of the reader's own: here a
    20-layer sigmoid MLP, whose first layers the gradient does not reach."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = [m for _ in range(20) for m in (nn.Linear(16, 16), nn.Sigmoid())]
    model = nn.Sequential(*layers, nn.Linear(16, 4))
    data = [(torch.randn(32, 16), torch.randint(0, 4, (32,))) for _ in range(50)]
    scope = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": data,
        "loss_fn": nn.functional.cross_entropy,
    }
    exec(_python_block(README.read_text(), "for x, y in loader:"), scope)
    watcher = scope["watcher"]
    assert watcher.closed
    vanishing = [f for f in watcher.findings if f.code == "GW101"]
    assert vanishing and vanishing[0].step == 30  # measured at 0, 15 and 30: the third says so


def test_the_readmes_callback_lines_build_a_trainer_that_holds_the_callback(tmp_path):
    lightning = pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    import torch
    from transformers import Trainer, TrainingArguments

    scope = {"L": lightning}
    exec(_python_block(README.read_text(), "L.Trainer("), scope)
    assert any(isinstance(c, scope["GradWatchCallback"]) for c in scope["trainer"].callbacks)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x, labels):
            return {"loss": torch.nn.functional.cross_entropy(self.fc(x), labels)}

    scope = {
        "Trainer": Trainer,
        "model": Tiny(),
        "args": TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
        "data": [{"x": torch.randn(4), "labels": 0}],
    }
    exec(_python_block(README.read_text(), "Trainer(model=model"), scope)
    handlers = scope["trainer"].callback_handler.callbacks
    assert any(isinstance(c, scope["GradWatchCallback"]) for c in handlers)


def test_the_custom_rule_example_runs_and_fires():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    scope = {"gradwatch": gradwatch, "model": model}
    exec(_python_block((DOCS / "how-it-works.md").read_text(), "class LargeGlobalNorm"), scope)
    watcher = scope["watcher"]
    watcher.reporters.clear()
    with watcher:
        for _ in range(31):  # measured at 0, 15 and 30: three in a row
            (model(torch.randn(16, 8)) * 1e4).pow(2).mean().backward()
            watcher.step()
            model.zero_grad()
    assert [f.code for f in watcher.findings if f.code == "X001"] == ["X001"]
