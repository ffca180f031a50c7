"""The rules' own texts as data and as Markdown: ``docs/rules.md``, the README's rule
table and ``gradwatch rules --json`` are all written from here, so none can drift from
what ``gradwatch explain`` prints.

A rule's explanation is written in paragraphs that start with a label ("What it
measures:", "Why it matters:", "How to fix it:", ...); the reference keeps them and sets
the label in bold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..rules import BUILTIN_RULES, PERSISTENCE, Rule
from ..rules.base import ANY_NUMBER

#: "What it measures:" and the like: a short label that opens a paragraph (or a longer
#: one that starts with a question word: "What it measures, four ways (...):").
_LABEL = re.compile(
    r"^(?P<label>[A-Z][A-Za-z ,/'()-]{2,40}|(?:What|Why|How|When|Where) [^:]{1,120}):(?:\s|$)"
)
#: Inline code in the rules' texts is marked with backticks; outside it, what Markdown
#: would take for emphasis or HTML is escaped so that "lr*g" or "<root>" read as written
#: (an underscore inside a word, as in clip_grad_norm, is not emphasis and stays).
_CODE_SPAN = re.compile(r"(`[^`]*`)")
_ESCAPE = re.compile(r"([*<\\]|(?<!\w)_|_(?!\w))")
_ESCAPE_IN_TABLE = re.compile(r"([*<\\|]|(?<!\w)_|_(?!\w))")


def rule_facts(cls: type[Rule]) -> dict[str, Any]:
    """What a rule is, in plain data: the content of ``gradwatch rules --json``.

    >>> from gradwatch.rules import VanishingGradient
    >>> facts = rule_facts(VanishingGradient)
    >>> facts["code"], facts["slug"], facts["thresholds"][0]["name"]
    ('GW101', 'vanishing-gradient', 'ratio')
    """
    thresholds = []
    for name, default in cls.defaults.items():
        spec = cls.threshold_specs.get(name, ANY_NUMBER)
        thresholds.append(
            {
                "name": name,
                "default": default,
                "accepts": spec.describe(),
                "meaning": cls.threshold_docs.get(name, ""),
            }
        )
    return {
        "code": cls.code,
        "slug": cls.slug,
        "severity": cls.severity,
        "summary": cls.summary,
        "explanation": cls.explanation,
        "thresholds": thresholds,
        "window": cls.window,
        "clear_after": cls.clear_after,
        "cooldown": cls.cooldown,
    }


def all_rule_facts(rules: Iterable[type[Rule]] = BUILTIN_RULES) -> list[dict[str, Any]]:
    """:func:`rule_facts` of every built-in rule, in code order."""
    return [rule_facts(cls) for cls in sorted(rules, key=lambda cls: cls.code)]


def markdown_text(text: str, *, table: bool = False) -> str:
    r"""Plain text as Markdown that shows it as written (inline code left alone); in a
    table cell, ``|`` is escaped too.

    >>> markdown_text("w - lr*g == w for `<root>`, <root>, clip_grad_norm_()")
    'w - lr\\*g == w for `<root>`, \\<root>, clip_grad_norm\\_()'
    >>> markdown_text("lr * |g|", table=True)
    'lr \\* \\|g\\|'
    """
    escape = _ESCAPE_IN_TABLE if table else _ESCAPE
    parts = _CODE_SPAN.split(text)
    return "".join(p if p.startswith("`") else escape.sub(r"\\\1", p) for p in parts)


def paragraphs(text: str) -> list[str]:
    """An explanation's paragraphs (and "- " items), each on one line.

    >>> paragraphs("What: a\\nb.\\n\\n- one\\n  more\\n- two")
    ['What: a b.', '- one more', '- two']
    """
    out: list[str] = []
    fresh = True
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            fresh = True
        elif fresh or stripped.startswith("- "):
            out.append(stripped)
            fresh = False
        else:
            out[-1] = f"{out[-1]} {stripped}"
    return out


def _paragraph(text: str) -> str:
    match = _LABEL.match(text)
    if match is None:
        return markdown_text(text)
    rest = markdown_text(text[match.end() :])
    return f"**{markdown_text(match['label'])}:** {rest}".rstrip()


def persistence_text(facts: dict[str, Any]) -> str:
    """When a rule's finding is announced, repeated and resolved, in words.

    >>> print(persistence_text({"window": 1, "clear_after": 3, "cooldown": 100}))
    ... # doctest: +NORMALIZE_WHITESPACE
    announced at the first monitored step that shows it; resolved after 3 monitored steps
    without it; repeated after 100 monitored steps if it persists
    """
    window = facts["window"]
    first = (
        "announced at the first monitored step that shows it"
        if window == 1
        else f"announced when {window} monitored steps in a row show it"
    )
    return (
        f"{first}; resolved after {facts['clear_after']} monitored steps without it; "
        f"repeated after {facts['cooldown']} monitored steps if it persists"
    )


def _rule_section(facts: dict[str, Any]) -> list[str]:
    code, slug = facts["code"], facts["slug"]
    lines = [
        f"## {code} {slug}",
        "",
        f"*{markdown_text(facts['summary'])}*",
        "",
        f"Severity: {facts['severity']} (a message may raise it: each says so). "
        f"Choose it with `select=[\"{code}\"]`, leave it out with `ignore=[\"{slug}\"]`.",
        "",
    ]
    for text in paragraphs(facts["explanation"]):
        lines += [_paragraph(text), ""]
    if facts["thresholds"]:
        lines += [
            f"Thresholds (change one with `thresholds={{\"{code}\": {{NAME: VALUE}}}}`):",
            "",
            "| threshold | default | accepts | meaning |",
            "|---|---|---|---|",
        ]
        for item in facts["thresholds"]:
            default = item["default"]
            shown = f"{default:g}" if isinstance(default, (int, float)) else str(default)
            lines.append(
                f"| `{item['name']}` | {shown} | {item['accepts']} | "
                f"{markdown_text(item['meaning'], table=True)} |"
            )
        lines.append("")
    lines += [f"Timing: {persistence_text(facts)}.", ""]
    return lines


def rules_reference(rules: Sequence[type[Rule]] = BUILTIN_RULES) -> str:
    """``docs/rules.md``: every built-in rule, from its own texts."""
    facts = all_rule_facts(rules)
    persistence = ", ".join(f"`{name}`" for name in PERSISTENCE)
    lines = [
        "# Rules reference",
        "",
        "<!-- Written by `python -m gradwatch.docs --write` from the rules' own texts; "
        "do not edit by hand. -->",
        "",
        "Each rule has a code and a slug; `select=`, `ignore=` and `thresholds=` take "
        "either (and `select=[\"GW1\"]` takes every rule whose code starts so). "
        "`gradwatch explain CODE` prints the same text in the terminal, "
        "`gradwatch rules --json` as data.",
        "",
        "A finding is judged on monitored steps: the steps gradwatch measures (every "
        "`every_n_steps`-th step, plus any step measured at once because a NaN or a sudden "
        "jump appeared). Besides its thresholds, every "
        f"rule takes {persistence} in `thresholds=` (in monitored steps): how many steps "
        "must show a problem before it is announced, how many without it before it is "
        "announced as resolved, and how long before a problem that persists is announced "
        "again.",
        "",
        "| code | slug | default severity | what it means |",
        "|---|---|---|---|",
    ]
    for item in facts:
        anchor = f"{item['code']}-{item['slug']}".lower()
        lines.append(
            f"| [{item['code']}](#{anchor}) | {item['slug']} | {item['severity']} | "
            f"{markdown_text(item['summary'], table=True)} |"
        )
    lines.append("")
    for item in facts:
        lines += _rule_section(item)
    return "\n".join(lines).rstrip() + "\n"


def readme_rule_table(rules: Sequence[type[Rule]] = BUILTIN_RULES) -> str:
    """The README's rule table: one line per rule, linked to its section of
    ``docs/rules.md``."""
    lines = ["| code | slug | severity | what it means |", "|---|---|---|---|"]
    for item in all_rule_facts(rules):
        anchor = f"{item['code']}-{item['slug']}".lower()
        lines.append(
            f"| [{item['code']}](docs/rules.md#{anchor}) | {item['slug']} | "
            f"{item['severity']} | {markdown_text(item['summary'], table=True)} |"
        )
    return "\n".join(lines) + "\n"
