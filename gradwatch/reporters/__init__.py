"""Where findings go: the terminal, ``logging``, a JSONL record, or your own reporter."""

from .base import Reporter
from .chart import gradient_flow_table, gradient_flow_text
from .defaults import default_reporters
from .jsonl import JsonlRecorder, Record, read_record
from .logging import LoggingReporter
from .terminal import TerminalReporter

__all__ = [
    "JsonlRecorder",
    "LoggingReporter",
    "Record",
    "Reporter",
    "TerminalReporter",
    "default_reporters",
    "gradient_flow_table",
    "gradient_flow_text",
    "read_record",
]
