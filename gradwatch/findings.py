"""What a rule says about the model: a :class:`Finding`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
Status = Literal["new", "worse", "reminder", "resolved"]

SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")
_SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


def severity_rank(severity: str) -> int:
    """Order severities: ``info`` < ``warning`` < ``error``.

    >>> severity_rank("error") > severity_rank("warning")
    True
    """
    try:
        return _SEVERITY_RANK[severity]
    except KeyError:
        raise ValueError(
            f"unknown severity {severity!r}: use one of {', '.join(SEVERITIES)}"
        ) from None


@dataclass(frozen=True)
class Finding:
    """One diagnosis: which rule fired, where, with which numbers, and what to do.

    ``status`` says what kind of announcement this is: ``"new"`` when the
    condition starts, ``"worse"`` when it deepened since it was announced,
    ``"reminder"`` after a cool-down while it persists, ``"resolved"`` (always
    severity ``info``) when it cleared.

    >>> f = Finding(code="GW101", rule="vanishing-gradient", severity="warning", step=20,
    ...             layers=("layers.0",), message="gradient fades", hint="use ReLU")
    >>> f.title
    'GW101 vanishing-gradient'
    """

    code: str
    rule: str
    severity: Severity
    step: int
    layers: tuple[str, ...]
    message: str
    hint: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    status: Status = "new"

    @property
    def title(self) -> str:
        """``"<code> <slug>"``, as alerts and tables show it."""
        return f"{self.code} {self.rule}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (the inverse of :meth:`from_dict`)."""
        return {
            "code": self.code,
            "rule": self.rule,
            "severity": self.severity,
            "status": self.status,
            "step": self.step,
            "layers": list(self.layers),
            "message": self.message,
            "hint": self.hint,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Rebuild a finding written by :meth:`to_dict`."""
        return cls(
            code=str(data["code"]),
            rule=str(data["rule"]),
            severity=data["severity"],
            step=int(data["step"]),
            layers=tuple(data.get("layers", ())),
            message=str(data.get("message", "")),
            hint=str(data.get("hint", "")),
            evidence=dict(data.get("evidence", {})),
            status=data.get("status", "new"),
        )
