"""Logging set-up: readable lines by default, one JSON object per line with ``--log-format json``.

Access lines and pool state changes carry their values as ``extra={"fields": {...}}`` so the
JSON form has them as keys (model, status, duration, held, bytes_out; model, old, new, reason).
Access lines are written in batches (``BatchedStreamHandler``), everything else at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class _PerSecond:
    """``strftime`` of a timestamp's whole second, reused while the second lasts (one
    access line per request would otherwise format the same date thousands of times)."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self.fmt = fmt
        self.convert = convert
        self._cached = (-1, "")  # one tuple: threads that log never see half an update

    def __call__(self, created: float) -> str:
        second = int(created)
        cached_second, text = self._cached
        if second != cached_second:
            text = time.strftime(self.fmt, self.convert(created))
            self._cached = (second, text)
        return text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._date = _PerSecond("%Y-%m-%d %H:%M:%S", time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._date(record.created)},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._date = _PerSecond("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": f"{self._date(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes a record at most ``delay`` seconds later, together
    with everything logged meanwhile, in one write.

    One write and flush per request cost the gateway more CPU than its metrics and its
    disconnect watching together. Outside a running event loop it writes at once.
    """

    def __init__(self, stream: TextIO, delay: float = 0.1) -> None:
        super().__init__(stream)
        self.delay = delay
        self._records: list[logging.LogRecord] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self.delay, self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            records, self._records = self._records, []
            lines = []
            for record in records:
                try:
                    lines.append(self.format(record))
                except Exception:
                    self.handleError(record)
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()


def setup_logging(level: str, fmt: str = "text") -> None:
    # The logging HOWTO's "Optimization" switches: no stack walk for the caller's file and
    # line, no thread or process look-ups per record (no format here shows them).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    batched = BatchedStreamHandler(sys.stderr)
    batched.setFormatter(formatter)
    access = logging.getLogger("vllm_autoserve.access")
    access.handlers[:] = [batched]
    access.propagate = False
