"""The ``autoserve`` command: start, watch, stop and try models on a vLLM Autoserve gateway.

    autoserve up MODEL [--timeout S]      start MODEL's pool; a spinner until it is healthy
    autoserve status                      every pool: state, since, last request, engines, ...
    autoserve down MODEL                  stop MODEL's pool (or let it scale to zero)
    autoserve models                      the gateway's model list
    autoserve chat MODEL ["prompt"]       stream a chat completion, waiting out a cold start
                                          (no prompt, or -: read it from stdin)

``--base-url`` and ``--api-key`` go before or after the command; they fall back to the
environment like the client classes do (``AUTOSERVE_BASE_URL``, ``OPENAI_BASE_URL``;
``AUTOSERVE_API_KEY``, ``VLLM_GATEWAY_AUTH``, ``OPENAI_API_KEY``). Expected failures (no
gateway there, a refused key, a failed model, a timeout) print one readable message and exit
with status 1; a usage error exits with 2; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

import httpx2
from openai import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    NotFoundError,
    OpenAIError,
    omit,
)
from rich.console import Console, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ._base import up_not_found
from ._client import AutoserveClient
from ._errors import AutoserveError
from ._settings import DEFAULT_UP_TIMEOUT, resolve_base_url

QUICK_TIMEOUT = 10.0
"""Seconds ``status`` and ``models`` give the gateway (``--timeout``), and any to connect."""
DOWN_TIMEOUT = 60.0
"""Seconds ``down`` waits for its answer (``--timeout``): the engine's stop takes a while."""

_STATE_STYLES = {
    "healthy": "green",
    "starting": "yellow",
    "stopping": "yellow",
    "failed": "bold red",
    "cold": "dim",
}


class _Waiting:
    """A live line: spinner, model, the gateway's last reported state, seconds waited."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.state = "asking the gateway"
        self.started = time.monotonic()
        self.log_to: Console | None = None  # where state changes go, when not a spinner
        self._spinner = Spinner("dots")

    def on_wait(self, model: str, state: str, elapsed: float) -> None:
        if self.log_to is not None and state != self.state and state != "healthy":
            self.log_to.print(f"{model}: {state} ({elapsed:.0f} s)")
        self.state = state

    def __rich__(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        self._spinner.update(text=Text(f"{self.model}: {self.state} ({elapsed:.0f} s)"))
        return self._spinner


def _wait_with_spinner(
    client: AutoserveClient, waiting: _Waiting, console: Console, timeout: float | None
) -> float:
    """A spinner on a terminal; elsewhere (a CI log, a pipe) a line per change of state, so
    that a long cold start does not read as a hang."""
    if console.is_terminal:
        with Live(waiting, console=console, refresh_per_second=8, transient=True):
            client.wait_until_ready(waiting.model, timeout=timeout)
    else:
        waiting.log_to = console
        client.wait_until_ready(waiting.model, timeout=timeout)
    return time.monotonic() - waiting.started


def _age(epoch: object) -> str:
    if not isinstance(epoch, int | float):
        return "-"
    seconds = max(0.0, time.time() - float(epoch))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _state(value: object, waiting_for_slot: object = False, making_way: object = False) -> Text:
    state = str(value or "-")
    style = _STATE_STYLES.get(state, "")
    if waiting_for_slot:
        state += " (waiting for a slot)"
    elif making_way:
        state += " (making way)"
    return Text(state, style=style)


def _first_line(value: object) -> str:
    lines = str(value or "").strip().splitlines()
    return lines[0] if lines else ""


# -- commands ---------------------------------------------------------------------------------


def _up(args: argparse.Namespace, out: Console, err: Console) -> None:
    waiting = _Waiting(args.model)
    client = _client(args, on_wait=waiting.on_wait)
    elapsed = _wait_with_spinner(client, waiting, err, args.timeout)
    out.print(Text.assemble(("✓ ", "green"), f"{args.model} is healthy ({elapsed:.1f} s)"))


def _status(args: argparse.Namespace, out: Console, err: Console) -> None:
    pools: list[dict[str, Any]] = _quick_client(args).status().get("pools", [])
    if not pools:
        out.print("No pools yet: no model is configured or has been asked for.")
        return
    table = Table(show_edge=False)
    columns = (
        "model",
        "state",
        "since",
        "last request",
        "in flight",
        "held",
        "engines",
        "gpus",
        "pinned",
    )
    for column in columns:
        table.add_column(column, no_wrap=True)
    # On a terminal the first line of an error is cut to fit; piped, it is whole.
    error_width = 60 if out.is_terminal else None
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=error_width)
    for pool in pools:
        gpus = pool.get("gpus") or []
        table.add_row(
            Text(str(pool.get("model", "?"))),
            _state(
                pool.get("state") or pool.get("status"),
                pool.get("waiting_for_slot"),
                pool.get("making_way"),
            ),
            _age(pool.get("since")),
            _age(pool.get("last_request")),
            str(pool.get("in_flight", 0)),
            str(pool.get("held", 0)),
            str(pool.get("engines", 0)),
            ",".join(str(g) for g in gpus) or "-",
            "yes" if pool.get("pinned") else "-",
            Text(_first_line(pool.get("error")), style="red"),
        )
    _print_whole(out, table)


def _print_whole(out: Console, table: Table) -> None:
    """Every cell whole, however narrow the terminal (it wraps the lines): model names are
    what people read and scripts grep for."""
    needed = Measurement.get(out, out.options.update_width(10_000), table).maximum
    if needed > out.width:
        out = Console(
            file=out.file,
            width=needed,
            force_terminal=out.is_terminal,
            color_system=out.color_system,  # type: ignore[arg-type]
        )
    out.print(table)


def _down(args: argparse.Namespace, out: Console, err: Console) -> None:
    # A local /down waits for the engine to exit: up to stop_grace_seconds, then SIGKILL.
    answer = _quick_client(args, read=DOWN_TIMEOUT).down(args.model)
    out.print(Text(f"{args.model}: down (now {answer.get('state', 'cold')})"))


def _models(args: argparse.Namespace, out: Console, err: Console) -> None:
    table = Table(show_edge=False)
    for column in ("model", "state", "serves"):
        table.add_column(column, no_wrap=True)
    for model in _quick_client(args).models.list():
        extra = model.model_extra or {}
        root = extra.get("root")
        table.add_row(
            Text(model.id),
            _state(extra.get("state")),
            Text(str(root) if root and root != model.id else ""),
        )
    _print_whole(out, table)


def _chat(args: argparse.Namespace, out: Console, err: Console) -> None:
    prompt = args.prompt
    if prompt == "-":  # `echo "..." | autoserve chat MODEL`, as with `ollama run`
        if sys.stdin.isatty():
            raise AutoserveError("no prompt: give one after MODEL, or pipe it in")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise AutoserveError("the prompt is empty")
    waiting = _Waiting(args.model)
    client = _client(args, on_wait=waiting.on_wait)
    _wait_with_spinner(client, waiting, err, None)
    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=omit if args.max_tokens is None else args.max_tokens,
        stream=True,
    )
    try:
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    sys.stdout.write(choice.delta.content)
                    sys.stdout.flush()
    except (APIConnectionError, httpx2.HTTPError) as exc:
        sys.stdout.write("\n")
        raise AutoserveError(
            "the answer broke off before its end (the connection was lost)"
        ) from exc
    sys.stdout.write("\n")


def _quick_client(args: argparse.Namespace, read: float = QUICK_TIMEOUT) -> AutoserveClient:
    """For a call the gateway answers soon (``read`` s): no retry, and a gateway that does
    not answer is reported in seconds, not after the SDK's ten minutes."""
    timeout = httpx2.Timeout(read, connect=QUICK_TIMEOUT)
    if args.timeout is not None:
        timeout = httpx2.Timeout(args.timeout)
    return _client(args, max_retries=0, timeout=timeout)


def _client(args: argparse.Namespace, **kwargs: Any) -> AutoserveClient:
    return AutoserveClient(
        base_url=args.base_url,
        api_key=args.api_key,
        up_timeout=DEFAULT_UP_TIMEOUT if args.timeout is None else args.timeout,
        **kwargs,
    )


# -- errors -----------------------------------------------------------------------------------


def describe(exc: Exception, base_url: str | None) -> str:
    """One readable message for an expected failure."""
    where = f" at {base_url}" if base_url else ""
    if isinstance(exc, AutoserveError):
        return str(exc)
    if isinstance(exc, APITimeoutError):
        return f"the gateway{where} did not answer in time"
    if isinstance(exc, APIConnectionError):
        cause = exc.__cause__ or exc
        return f"cannot reach the gateway{where}: {cause}"
    if isinstance(exc, AuthenticationError):
        return (
            "the gateway refused the API key (401): pass --api-key or set "
            "AUTOSERVE_API_KEY (or VLLM_GATEWAY_AUTH)"
        )
    if isinstance(exc, NotFoundError):  # the gateway's own 404s name a code; others not
        explained = up_not_found(exc)
        return _answered(exc) if explained is exc else str(explained)
    if isinstance(exc, APIStatusError):
        return _answered(exc)
    return str(exc)


def _answered(exc: APIStatusError) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    return f"the gateway answered {exc.status_code}: {message or exc.message}"


def _where(base_url: str | None) -> str | None:
    try:
        return resolve_base_url(base_url)
    except OpenAIError:
        return None


# -- the parser -------------------------------------------------------------------------------

Command = Callable[[argparse.Namespace, Console, Console], None]


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        default=argparse.SUPPRESS,
        help="the gateway's URL (default: $AUTOSERVE_BASE_URL, $OPENAI_BASE_URL)",
    )
    common.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="the gateway's key (default: $AUTOSERVE_API_KEY, $VLLM_GATEWAY_AUTH, $OPENAI_API_KEY)",
    )
    parser = argparse.ArgumentParser(
        prog="autoserve",
        parents=[common],
        description="Start, watch, stop and try models on a vLLM Autoserve gateway.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, run: Command, help_: str, *more: argparse.ArgumentParser
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common, *more], help=help_, description=help_)
        sub.set_defaults(run=run)
        return sub

    up = add("up", _up, "start a model's pool and wait until it is healthy")
    up.add_argument("model", metavar="MODEL")
    up.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"give up after this many seconds (default {DEFAULT_UP_TIMEOUT:.0f})",
    )
    quick_timeout = argparse.ArgumentParser(add_help=False)
    quick_timeout.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"give up after this many seconds (default {QUICK_TIMEOUT:.0f}; down: "
        f"{DOWN_TIMEOUT:.0f})",
    )
    add("status", _status, "show every pool the gateway knows", quick_timeout)
    down = add("down", _down, "stop a model's pool", quick_timeout)
    down.add_argument("model", metavar="MODEL")
    add("models", _models, "list the gateway's models", quick_timeout)
    chat = add("chat", _chat, "stream a chat completion (waits out a cold start)")
    chat.add_argument("model", metavar="MODEL")
    chat.add_argument(
        "prompt", metavar="PROMPT", nargs="?", default="-", help="the prompt; - or none: stdin"
    )
    chat.add_argument("--max-tokens", type=int, default=None)
    return parser


def _console(stream: TextIO) -> Console:
    """Piped, the output is for other programs: no terminal width to fit, nothing cut."""
    stderr = stream is sys.stderr
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=1000)


def _version() -> str:
    try:
        return version("vllm-autoserve-client")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("base_url", "api_key", "timeout"):
        if not hasattr(args, name):
            setattr(args, name, None)
    out, err = _console(sys.stdout), _console(sys.stderr)
    try:
        args.run(args, out, err)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except BrokenPipeError:  # `autoserve chat ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OpenAIError, ValueError) as exc:
        err.print(Text.assemble(("error: ", "bold red"), describe(exc, _where(args.base_url))))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
