"""A small parent for one engine, so that no engine process outlives the gateway.

    python -m vllm_autoserve.engine_guard --grace 10 --parent PID -- vllm-or-any-command args...

vLLM's API server starts ``EngineCore``/``Worker`` children; if the API server dies, those
live on and keep their GPU memory. The guard is started in a process group of its own, as
a child subreaper (orphaned descendants are re-parented to it), with ``PDEATHSIG`` so that
it hears of the gateway's death even after a SIGKILL. When the engine exits, or the guard is
told to stop (the engine is told first), every remaining descendant is killed. The guard
exits with the engine's code, and says so on its output (``exit_line``) as soon as the
engine exits, before it has cleaned up after it: that is when the gateway must stop
sending the engine requests. The line carries a token the gateway gives the guard alone
(``TOKEN_ENV``), so that nothing the engine prints can pass for it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TOKEN_ENV = "AUTOSERVE_GUARD_TOKEN"


def exit_line(token: str) -> str:
    """What the guard prints when the engine has exited, before the engine's exit code."""
    return f"engine_guard {token}: the engine exited with code "


# On a stop, the engine alone gets SIGTERM for this long before the rest of its processes.
_ENGINE_FIRST_SECONDS = 2.0

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the gateway's group kill still applies
        pass


def _descendants() -> list[int]:
    """The engine's processes: the guard's children (orphans are re-parented to it as
    subreaper) and everything else in its process group."""
    mine = os.getpid()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces, so split after ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        ppid, pgrp = int(fields[1]), int(fields[2])
        if int(entry.name) != mine and (ppid == mine or pgrp == os.getpgrp()):
            pids.append(int(entry.name))
    return pids


def _kill_all(sig: int) -> None:
    for pid in _descendants():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    grace = 10.0
    parent = None
    while args[:1] in (["--grace"], ["--parent"]):
        if args[0] == "--grace":
            grace = float(args[1])
        else:
            parent = int(args[1])
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: engine_guard [--grace S] [--parent PID] -- COMMAND...", file=sys.stderr)
        return 2
    # The gateway's pid as the gateway saw it: if it died while this interpreter was still
    # starting, getppid() here is already 1 (or a subreaper), and PDEATHSIG would never fire.
    parent = os.getppid() if parent is None else parent
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the gateway died before PDEATHSIG was armed
        return 1

    stop_requested: list[float] = []
    engine: subprocess.Popen[bytes] | None = None

    def request_stop(signum: int, _frame: object) -> None:
        if not stop_requested:
            stop_requested.append(time.monotonic())
            # The engine alone first: vLLM's API server ends its streams and stops its own
            # helpers in about half a second, where helpers stopped under it would leave
            # its streams hanging until the SIGKILL.
            if engine is not None:
                engine.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    token = os.environ.pop(TOKEN_ENV, "")  # the engine does not inherit it
    if stop_requested:  # told to stop while starting up
        return 1
    try:
        engine = subprocess.Popen(args)
    except OSError as exc:
        print(f"cannot start engine command {args[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127

    helpers_told = False
    while engine.poll() is None:
        if stop_requested:
            waited = time.monotonic() - stop_requested[0]
            if waited > grace:
                _kill_all(signal.SIGKILL)
            elif waited > min(_ENGINE_FIRST_SECONDS, grace / 2) and not helpers_told:
                # An engine that does not pass the signal on (a shell script's child): the
                # rest of its processes are told too.
                _kill_all(signal.SIGTERM)
                helpers_told = True
        time.sleep(0.05)
    code = engine.returncode if engine.returncode >= 0 else 128 - engine.returncode
    try:
        # On a line of its own, even if the engine died in the middle of one.
        print(f"\n{exit_line(token)}{code}", flush=True)
    except OSError:  # nobody reads any more (the gateway is gone): clean up all the same
        pass
    # The engine is gone: its helpers must go too.
    _kill_all(signal.SIGTERM)
    deadline = time.monotonic() + min(grace, 5.0)
    while _descendants() and time.monotonic() < deadline:
        _reap()
        time.sleep(0.05)
    _kill_all(signal.SIGKILL)
    _reap()
    return code


if __name__ == "__main__":
    sys.exit(main())
