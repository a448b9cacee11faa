"""Access lines: the batched fast path writes exactly what ``logging`` would, in both formats,
and any other logging set-up still gets ordinary records with the fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from vllm_autoserve.logs import ACCESS_LOGGER, AccessEntry, AccessLog, setup_logging

ENTRY = AccessEntry(
    created=1_800_000_000.25,
    model="m",
    route="/v1/chat/completions",
    status=200,
    duration=0.0123456,
    held=1.5,
    bytes_out=345,
    upstream_broke=True,
    client="10.0.0.7",
)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Each test starts from untouched loggers (others, e.g. the Modal gateway's start-up,
    set the package logger's level) and leaves them as they were."""
    loggers = [
        logging.getLogger(),
        logging.getLogger("vllm_autoserve"),
        logging.getLogger(ACCESS_LOGGER),
        logging.getLogger("httpx"),
    ]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    for lg in loggers[1:]:
        lg.setLevel(logging.NOTSET)
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def written(fmt: str, via_logging: bool) -> str:
    setup_logging("info", fmt)
    handler = logging.getLogger(ACCESS_LOGGER).handlers[0]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    if via_logging:
        record = logging.makeLogRecord(
            {
                "name": ACCESS_LOGGER,
                "levelno": logging.INFO,
                "levelname": "INFO",
                "msg": ENTRY.message(),
                "created": ENTRY.created,
                "msecs": 250.0,
                "fields": ENTRY.fields(),
            }
        )
        handler.handle(record)
    else:
        AccessLog().write(ENTRY)
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_fast_access_lines_match_what_logging_writes(fmt: str) -> None:
    assert written(fmt, via_logging=False) == written(fmt, via_logging=True)


def test_access_line_says_what_happened() -> None:
    line = written("json", via_logging=False)
    entry = json.loads(line)
    assert entry["message"] == (
        "client=10.0.0.7 model=m route=/v1/chat/completions status=200 duration=0.012 held=1.500 "
        "bytes_out=345 upstream_broke=1"
    )
    assert entry["status"] == 200 and entry["held"] == 1.5 and entry["upstream_broke"] is True
    assert entry["client"] == "10.0.0.7"


def test_another_logging_set_up_gets_records_with_the_fields() -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [Collect()]
    access.setLevel(logging.INFO)
    try:
        AccessLog().write(ENTRY)
    finally:
        access.setLevel(logging.NOTSET)
    assert records[0].getMessage() == ENTRY.message()
    assert records[0].fields["bytes_out"] == 345  # type: ignore[attr-defined]


def test_no_access_lines_below_info() -> None:
    setup_logging("warning")
    handler = logging.getLogger(ACCESS_LOGGER).handlers[0]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    AccessLog().write(ENTRY)
    handler.flush()
    assert stream.getvalue() == ""


def test_httpx_request_lines_are_left_out_but_at_debug() -> None:
    setup_logging("info")
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    setup_logging("debug")
    assert logging.getLogger("httpx").isEnabledFor(logging.DEBUG)
