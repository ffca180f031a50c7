"""A JSONL record of a run: one line per monitored step and one per finding.

Each line is flushed as it is written, so a crash loses nothing already recorded, and
:func:`read_record` skips a truncated last line (the one a crash interrupts).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .._version import __version__
from ..findings import Finding
from ..rules.engine import SummaryRow
from ..stats import StepStats
from .base import Reporter

FORMAT = "gradwatch-jsonl/1"


class JsonlRecorder(Reporter):
    """Writes a run to ``path`` (parent folders are created).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> recorder = JsonlRecorder(path, meta={"model": "mlp"})
    >>> recorder.close([])
    >>> read_record(path).meta["model"]
    'mlp'
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str], *, meta: dict[str, Any] | None = None):
        self.path = Path(path)
        self.meta = dict(meta or {})
        self._file: IO[str] | None = None

    def _write(self, data: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            self._line(
                {
                    "type": "run",
                    "format": FORMAT,
                    "version": __version__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "meta": self.meta,
                }
            )
        self._line(data)

    def _line(self, data: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(_clean(data), allow_nan=False) + "\n")
        self._file.flush()

    def report(self, stats: StepStats, findings: Sequence[Finding]) -> None:
        self._write({"type": "step", **stats.to_dict()})
        for finding in findings:
            self._write({"type": "finding", **finding.to_dict()})

    def close(self, summary: Sequence[SummaryRow]) -> None:
        self._write({"type": "summary", "rows": [asdict(row) for row in summary]})
        if self._file is not None:
            self._file.close()
            self._file = None


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf become strings ("nan", "inf"), tuples lists, tensors numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):
        return _clean(value.item())
    return str(value)


@dataclass
class Record:
    """A run read back from a JSONL file."""

    meta: dict[str, Any] = field(default_factory=dict)
    steps: list[StepStats] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    summary: list[SummaryRow] = field(default_factory=list)
    truncated: bool = False
    version: str | None = None


def read_record(path: str | os.PathLike[str]) -> Record:
    """Read a file written by :class:`JsonlRecorder`; a truncated last line is skipped
    (``record.truncated`` tells). Several runs appended to one file are read as one."""
    record = Record()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                record.truncated = True
                break
            raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        kind = data.get("type")
        if kind == "run":
            record.meta.update(data.get("meta", {}))
            record.version = data.get("version")
        elif kind == "step":
            record.steps.append(StepStats.from_dict(data))
        elif kind == "finding":
            record.findings.append(Finding.from_dict(data))
        elif kind == "summary":
            record.summary = [
                SummaryRow(**{**row, "layers": tuple(row.get("layers", ()))})
                for row in data.get("rows", [])
            ]
    return record
