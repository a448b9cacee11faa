"""Logging set-up: readable lines by default, one JSON object per line with ``--log-format json``.

Access lines (``AccessLog``) and pool state changes carry their values as fields, so the JSON
form has them as keys (model, route, status, duration, held, bytes_out; model, old, new,
reason). Access lines are written in batches (``BatchedStreamHandler``), everything else at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TextIO

ACCESS_LOGGER = "vllm_autoserve.access"


class AccessEntry(NamedTuple):
    """One proxied request, as its access line tells it."""

    created: float
    model: str
    route: str
    status: int
    duration: float
    held: float
    bytes_out: int
    upstream_broke: bool
    client: str
    """The peer's address (a reverse proxy's, behind one)."""

    @property
    def msecs(self) -> int:
        return int((self.created - int(self.created)) * 1000)

    def message(self) -> str:
        broke = " upstream_broke=1" if self.upstream_broke else ""
        return (
            f"client={self.client} model={self.model} route={self.route} status={self.status} "
            f"duration={self.duration:.3f} held={self.held:.3f} bytes_out={self.bytes_out}{broke}"
        )

    def record(self) -> logging.LogRecord:
        """The entry as a ``LogRecord``, for logging set-ups other than the gateway's."""
        return logging.makeLogRecord(
            {
                "name": ACCESS_LOGGER,
                "levelno": logging.INFO,
                "levelname": "INFO",
                "msg": self.message(),
                "created": self.created,
                "msecs": self.msecs,
                "fields": self.fields(),
            }
        )

    def fields(self) -> dict[str, Any]:
        """The values as keys of a JSON line (``extra={"fields": ...}`` of a record)."""
        return {
            "client": self.client,
            "model": self.model,
            "route": self.route,
            "status": self.status,
            "duration": round(self.duration, 6),
            "held": round(self.held, 6),
            "bytes_out": self.bytes_out,
            "upstream_broke": self.upstream_broke,
        }


class AccessLog:
    """The access line of every proxied request, on the ``vllm_autoserve.access`` logger.

    With the gateway's own logging set-up (``setup_logging``), entries go straight to its
    batched handler and are formatted when written: a ``LogRecord`` per request cost a sixth
    of the gateway's CPU. With any other set-up (an embedding application's, a runtime's)
    they go through ``logging`` as usual."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def write(self, entry: AccessEntry) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        handlers = logger.handlers
        if (
            len(handlers) == 1
            and type(handlers[0]) is BatchedStreamHandler
            and not logger.filters
            and not handlers[0].filters
        ):
            handlers[0].add(entry)
            return
        logger.handle(entry.record())

    def flush(self) -> None:
        """Write what is batched now (at shutdown: the process may end by its signal next,
        before any exit hook)."""
        for handler in self.logger.handlers:
            handler.flush()


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

    def format_access(self, entry: AccessEntry) -> str:
        """The line ``format()`` would give for the entry's record, without the record."""
        return (
            f"{self._date(entry.created)},{entry.msecs:03d} INFO {ACCESS_LOGGER}: {entry.message()}"
        )


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

    def format_access(self, entry: AccessEntry) -> str:
        line = {
            "time": f"{self._date(entry.created)}.{entry.msecs:03d}Z",
            "level": "info",
            "logger": ACCESS_LOGGER,
            "message": entry.message(),
            **entry.fields(),
        }
        return json.dumps(line)


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes a record at most ``delay`` seconds later, together
    with everything logged meanwhile, in one write.

    One write and flush per request cost the gateway more CPU than its metrics and its
    disconnect watching together. Outside a running event loop it writes at once.
    """

    def __init__(self, stream: TextIO, delay: float = 0.1) -> None:
        super().__init__(stream)
        self.delay = delay
        self._records: list[logging.LogRecord | AccessEntry] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.add(record)

    def add(self, record: logging.LogRecord | AccessEntry) -> None:
        """Queue a record, or an access entry (``AccessLog``), for the next write."""
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
                    if isinstance(record, AccessEntry):
                        lines.append(self._format_access(record))
                    else:
                        lines.append(self.format(record))
                except Exception:
                    if isinstance(record, logging.LogRecord):
                        self.handleError(record)
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()

    def _format_access(self, entry: AccessEntry) -> str:
        formatter = self.formatter
        if isinstance(formatter, TextFormatter | JsonFormatter):
            return formatter.format_access(entry)
        return self.format(entry.record())


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
    # httpx logs every request it sends at INFO (the demo's own calls, health checks).
    logging.getLogger("httpx").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    batched = BatchedStreamHandler(sys.stderr)
    batched.setFormatter(formatter)
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [batched]
    access.propagate = False
    server = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DeliberatelyCutAnswers) for f in server.filters):
        server.addFilter(DeliberatelyCutAnswers())


class DeliberatelyCutAnswers(logging.Filter):
    """Drops uvicorn's ERROR for an answer the app ended without completing it: the gateway
    does that on purpose when an engine breaks off its answer (so that no client takes the
    cut answer for a whole one), and has already logged a warning saying which engine. And
    makes its ERROR for requests cut at the end of the drain a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Cancel %s running task(s), timeout graceful shutdown exceeded":
            # The end of drain_seconds, as configured: those requests are told (503 or an
            # error event) and logged. A warning, not an error that pages someone.
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return record.msg != "ASGI callable returned without completing response."
