"""Logging for the daemon: plain text or one JSON object per line (``logging.json_lines``).

Structured fields travel as ``extra=`` on the record (``association``, ``calling_ae``, ``study_uid``,
``series_uid``, ``sop_uid``, ``job_id``, ``state``, ``reason``, ``status``, ``count``, ...): the JSON formatter
writes every non-standard attribute as a key, the plain formatter appends them as ``key=value``.

Logger names follow one rule: each module logs as ``logging.getLogger(__name__)``, named ``log``, so a logger's
name is its module's and a package's name selects a stage: ``dicom_node.receive`` (one line per association, one
per instance batch of a series), ``dicom_node.jobs`` (one line per job transition), ``dicom_node.series``,
``dicom_node.export`` (the SEG, the outbox, the SCU), ``dicom_node.daemon``. pynetdicom's own chatter is kept at
WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dicom_node.settings import LoggingSection

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extras(record).items():
            out[key] = _jsonable(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extras(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def setup_logging(section: LoggingSection, stream: Any = None) -> None:
    """Configure the root logger once for the daemon (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLinesFormatter() if section.json_lines else PlainFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dicom_node", False):
            root.removeHandler(h)
    handler._dicom_node = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(section.level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
