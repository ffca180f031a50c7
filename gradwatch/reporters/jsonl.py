"""A JSONL record of a run: one line per monitored step and one per finding.

Each line is flushed as it is written, so a crash loses nothing already recorded. A run
appended to the file of a crashed one starts on a fresh line, and :func:`read_record`
skips a damaged line (the one a crash interrupted) and keeps everything else.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from .._version import __version__
from ..coverage import Coverage
from ..findings import Finding
from ..rules.engine import SummaryRow
from ..stats import StepStats
from .base import Reporter

FORMAT = "gradwatch-jsonl/1"
#: How every line written here begins: where a record starts inside a damaged line.
_LINE_START = '{"type": '

_KINDS = ("run", "step", "finding", "summary")

logger = logging.getLogger("gradwatch")


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
        _check_writable(self.path)  # now, not at the first write: the record would be lost
        self.meta = dict(meta or {})
        self._file: IO[str] | None = None

    def _write(self, data: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh_line = _ends_mid_line(self.path)
            self._file = self.path.open("a", encoding="utf-8")
            if fresh_line:  # a crashed run's last line: leave it alone, start below it
                self._file.write("\n")
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

    def coverage(self, coverage: Coverage) -> None:
        self._coverage = coverage

    def close(self, summary: Sequence[SummaryRow]) -> None:
        record: dict[str, Any] = {"type": "summary", "rows": [asdict(row) for row in summary]}
        coverage = getattr(self, "_coverage", None)
        if coverage is not None:
            record["coverage"] = coverage.to_dict()
        self._write(record)
        if self._file is not None:
            self._file.close()
            self._file = None


def _check_writable(path: Path) -> None:
    """Raise ``ValueError`` when ``path`` cannot become a record file: it is a folder,
    something on its way is a file, or the place is not writable.

    >>> _check_writable(Path("/"))
    Traceback (most recent call last):
    ...
    ValueError: JsonlRecorder('/'): / is a folder; give a file path, e.g. /run.jsonl
    """
    where = f"JsonlRecorder({str(path)!r})"
    if path.is_dir():
        raise ValueError(
            f"{where}: {path} is a folder; give a file path, e.g. {path / 'run.jsonl'}"
        )
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{where}: {path} exists and is not writable")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders in between are created at the first write
    if not parent.is_dir():
        raise ValueError(f"{where}: {parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: the folder {parent} is not writable")


def _ends_mid_line(path: Path) -> bool:
    """True when ``path`` exists and its last line has no newline (a crash cut it)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            if file.tell() == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except FileNotFoundError:
        return False


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
    #: what the run measured (steps, measured steps, layers), from the summary record
    coverage: Coverage | None = None
    #: the last line was cut short (a crash while writing it) and was left out
    truncated: bool = False
    version: str | None = None
    #: damaged lines before the last one that were left out (a crashed run's cut line
    #: that a resumed run wrote after, or a line corrupted on disk)
    skipped_lines: int = 0


def read_record(path: str | os.PathLike[str]) -> Record:
    """Read a file written by :class:`JsonlRecorder`. Several runs appended to one file
    are read as one. A damaged line is left out and the rest kept: ``record.truncated``
    tells when the last line was cut short, ``record.skipped_lines`` counts damaged lines
    before it. A file without a single gradwatch record in it (empty, other JSON, or
    damaged) is a ``ValueError`` that says why (naming its first bad line, if any).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> with open(path, "w") as f:
    ...     _ = f.write('{"type": "run", "meta": {"a": 1}}\\n{"type": "st\\n{"type": "summary"}\\n')
    >>> record = read_record(path)
    >>> record.meta, record.skipped_lines, record.truncated
    ({'a': 1}, 1, False)
    """
    record = Record()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    damaged: list[tuple[int, str]] = []
    records = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        entries, problem = _entries(line)
        for data in entries:
            if not _add(record, data):
                problem = "holds a record that cannot be read back"
            elif data.get("type") in _KINDS:
                records += 1
        if problem is None:
            continue
        if number == last and not entries:
            record.truncated = True
        else:
            damaged.append((number, problem))
    if damaged and not records:  # nothing of a gradwatch record: say what is wrong
        number, problem = damaged[0]
        raise ValueError(f"{path}: line {number} {problem}")
    if not records:  # valid JSON, or nothing at all, but no line a recorder writes
        what = "is empty" if last == 0 else "has no gradwatch lines"
        raise ValueError(
            f"{path}: the file {what}, so it is not a record written by "
            "gradwatch.JsonlRecorder"
        )
    if damaged:
        record.skipped_lines = len(damaged)
        shown = ", ".join(str(n) for n, _ in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        logger.warning("gradwatch: %s: left out %d damaged line(s): %s", path, len(damaged), shown)
    return record


def _entries(line: str) -> tuple[list[dict[str, Any]], str | None]:
    """The record on one line, and what is wrong with the line (``None``: nothing). When
    a crash cut a line and a run appended to the file wrote straight after it (as the
    recorder did before it started appended runs on a fresh line), the complete record
    that follows the cut is kept."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        start = line.find(_LINE_START, 1)
        while start > 0:
            try:
                tail = json.loads(line[start:])
            except json.JSONDecodeError:
                start = line.find(_LINE_START, start + 1)
                continue
            if isinstance(tail, dict):
                return [tail], "was cut short (a later record follows on the same line)"
            break
        return [], f"is not valid JSON ({error})"
    if not isinstance(data, dict):
        return [], "is not a JSON object"
    return [data], None


def _add(record: Record, data: dict[str, Any]) -> bool:
    """Add one line's record; False when its content cannot be read back."""
    try:
        kind = data.get("type")
        if kind == "run":
            meta = data.get("meta", {})
            record.meta.update(meta if isinstance(meta, dict) else {})
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
            if isinstance(data.get("coverage"), dict):
                record.coverage = Coverage.from_dict(data["coverage"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True
