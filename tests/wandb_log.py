"""Read back what wandb wrote: the offline run's transaction log (``run-<id>.wandb``).

An offline run records everything it would send (history rows, alerts, summary,
metric definitions, config) in ``run.settings.sync_file``. The file is a LevelDB-style
log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte), then 32 KiB blocks of
chunks. Each chunk is ``CRC32 (4 bytes) | length (2, little-endian) | type (1)``
followed by ``length`` bytes; type 1 holds a whole record, 2/3/4 the first, middle and
last pieces of one split across blocks. A block's tail shorter than a chunk header is
zero padding. Every record is a ``wandb.proto.wandb_internal_pb2.Record``.

Tests use it to check what the real library stored, not what we meant to send:

>>> log = read_run_log(run.settings.sync_file)            # doctest: +SKIP
>>> log.history_at(10)["gradwatch/grad_rms/0"]            # doctest: +SKIP
>>> [a.title for a in log.alerts]                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7  # crc32 (4) + length (2) + type (1)
FILE_HEADER = 7  # ":W&B" + magic (2) + version (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class LogFormatError(ValueError):
    """The file is not a wandb transaction log, or it is damaged."""


@dataclass(frozen=True)
class Alert:
    title: str
    text: str
    level: str
    wait_duration: int  # milliseconds, as wandb stores it


@dataclass(frozen=True)
class HistoryRow:
    step: int
    values: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


@dataclass
class RunLog:
    """What one offline run recorded, in file order."""

    history: list[HistoryRow] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    exited: bool = False

    def keys(self, prefix: str = "") -> set[str]:
        """Every history key (starting with ``prefix``) seen in any row."""
        return {k for row in self.history for k in row.values if k.startswith(prefix)}

    def rows_with(self, key: str) -> list[HistoryRow]:
        return [row for row in self.history if key in row.values]

    def history_at(self, step: int) -> HistoryRow:
        """The row wandb committed at ``_step == step``."""
        for row in self.history:
            if row.step == step:
                return row
        raise KeyError(f"no history row at step {step}; steps: {[r.step for r in self.history]}")

    def series(self, key: str, x: str = "_step") -> list[tuple[Any, Any]]:
        """``(x, value)`` pairs of ``key`` over the rows that hold it."""
        return [
            (row.step if x == "_step" else row.values.get(x), row.values[key])
            for row in self.history
            if key in row.values
        ]


def offline_run(directory: Path, name: str) -> Any:
    """A real wandb run in offline mode, writing under ``directory`` (no server, no
    console capture): what the tests log into and read back with :func:`read_run_log`."""
    import wandb

    return wandb.init(
        project="gradwatch-tests",
        name=name,
        mode="offline",
        dir=str(directory),
        settings=wandb.Settings(silent=True, console="off"),
    )


def read_chunks(path: str | Path) -> Iterator[bytes]:
    """The raw records (protobuf bytes) of a transaction log, reassembled from chunks."""
    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER or not data.startswith(b":W&B"):
        raise LogFormatError(f"{path} does not start with the ':W&B' header")
    offset = FILE_HEADER
    pending: bytearray | None = None
    while offset < len(data):
        room = BLOCK_SIZE - offset % BLOCK_SIZE
        if room < CHUNK_HEADER:  # trailing zero padding of a block
            offset += room
            continue
        if offset + CHUNK_HEADER > len(data):
            break  # a header cut off by a crash: ignore the torn tail
        crc, length, kind = struct.unpack_from("<IHB", data, offset)
        start = offset + CHUNK_HEADER
        if crc == 0 and length == 0 and kind == 0:
            offset += room  # zero-filled rest of a block
            continue
        if start + length > len(data):
            break
        payload = data[start : start + length]
        if _crc(kind, payload) != crc:
            raise LogFormatError(f"{path}: CRC mismatch in chunk at byte {offset}")
        offset = start + length
        if kind == FULL:
            pending = None
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            pending += payload
            yield bytes(pending)
            pending = None
        else:
            raise LogFormatError(f"{path}: unexpected chunk type {kind} at byte {offset}")


def _crc(kind: int, payload: bytes) -> int:
    """wandb's checksum: plain CRC-32 of the type byte then the payload (LevelDB itself
    uses a masked CRC-32C; wandb does not)."""
    return zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF


def read_records(path: str | Path) -> Iterator[Any]:
    """Each record as a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in read_chunks(path):
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def read_run_log(path: str | Path, *, wait: float = 15.0) -> RunLog:
    """History rows, alerts, summary, metric definitions and config of one run.

    ``run.finish()`` can return before wandb's writer has flushed the file (wandb 0.31
    offline: now and then only the 7-byte header is there yet), so this waits up to
    ``wait`` seconds for the run's closing ``exit`` record; ``wait=0`` reads once.
    """
    deadline = time.monotonic() + wait
    while True:
        log = _read_once(path)
        if log.exited or time.monotonic() >= deadline:
            return log
        time.sleep(0.05)


def _read_once(path: str | Path) -> RunLog:
    log = RunLog()
    for record in read_records(path):
        kind = record.WhichOneof("record_type") or "none"
        log.kinds[kind] = log.kinds.get(kind, 0) + 1
        if kind == "history":
            values: dict[str, Any] = {}
            for item in record.history.item:
                _put(values, item)
            step = values.get("_step", record.history.step.num)
            log.history.append(HistoryRow(step=int(step), values=values))
        elif kind == "alert":
            a = record.alert
            log.alerts.append(Alert(a.title, a.text, a.level, a.wait_duration))
        elif kind == "summary":
            for item in record.summary.update:
                _put(log.summary, item)
            for item in record.summary.remove:
                log.summary.pop(item.key or "/".join(item.nested_key), None)
        elif kind == "metric":
            m = record.metric
            log.metrics.append(
                {"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric}
            )
        elif kind == "config":
            for item in record.config.update:
                _put(log.config, item)
        elif kind == "exit":
            log.exited = True
    return log


def _put(target: dict[str, Any], item: Any) -> None:
    """Store an item by its key, or by its nested key path (media such as tables are
    written as ``["gradwatch/findings_table", "path"]``) as nested dictionaries."""
    if item.key or not item.nested_key:
        target[item.key] = _value(item)
        return
    *parents, last = item.nested_key
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[last] = _value(item)


def _value(item: Any) -> Any:
    # wandb 0.31 writes JSON text in value_json; newer fields are typed oneofs.
    which = item.WhichOneof("value") if _has_value_oneof(item) else None
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    if which == "none":
        return None
    text = item.value_json or (item.json if which == "json" else "")
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _has_value_oneof(item: Any) -> bool:
    return "value" in item.DESCRIPTOR.oneofs_by_name


def read_table(sync_file: str | Path, entry: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of a logged ``wandb.Table``: ``entry`` is its history or summary
    value (``{"_type": "table-file", "path": "media/table/...", ...}``)."""
    if not isinstance(entry, dict) or "path" not in entry:
        raise ValueError(f"not a logged table: {entry!r}")
    path = Path(sync_file).parent / "files" / entry["path"]
    data = json.loads(path.read_text(encoding="utf-8"))
    return list(data["columns"]), [list(row) for row in data["data"]]
