"""``vllm-autoserve``: run the gateway locally, and set up a CPU engine to try it with.

vllm-autoserve serve [--config FILE] [--host 127.0.0.1] [--port 8000] [--no-auth]
vllm-autoserve check-config FILE
vllm-autoserve engine install-cpu [--extra-index-url URL]
vllm-autoserve make-tiny-model DIR
vllm-autoserve demo [--port 8000]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import shutil
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .auth import AUTH_ENV, ApiKeys, keys_from_env
from .config import CONFIG_ENV, Config, load_config
from .errors import ConfigError
from .logs import setup_logging

log = logging.getLogger("vllm_autoserve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_problem(host: str, port: int) -> str | None:
    """Why the gateway could not listen on ``host:port``, or None if it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{host}:{port} is already in use; choose another --port"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (1-65535)")
    return port


def serve(config: Config, *, host: str, port: int, keys: ApiKeys, log_level: str = "info") -> int:
    """Run the gateway with the local backend until SIGINT/SIGTERM; stops every engine."""
    import uvicorn

    from .app import create_app, tune_gc_for_serving
    from .http_server import GatewayServer, bounded_http_protocol
    from .pools.local import LocalPools

    problem = bind_problem(host, port)
    if problem:
        print(f"vllm-autoserve: {problem}", file=sys.stderr)
        return 1
    app = create_app(LocalPools(config), config, keys)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,  # the gateway writes its own access line (model, held time, bytes)
        log_config=None,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(config.gateway.drain_seconds),
        loop="auto",
        http=bounded_http_protocol(
            config.gateway.client_header_seconds, config.gateway.client_body_seconds
        ),
        # X-Forwarded-For is not trusted: the access line names the peer that connected.
        proxy_headers=False,
    )
    server = GatewayServer(uv_config, on_stopping=app.stopping, on_forced_exit=app.shutdown)
    tune_gc_for_serving()
    log.info("gateway on http://%s:%d (auth %s)", host, port, "off" if keys.open else "on")
    for problem in missing_programs(config):
        log.warning("%s: its engine will fail to start", problem)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it stopped for again: done, quietly
        return 130
    return 0 if server.started else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vllm-autoserve: {exc}", file=sys.stderr)
        return 2
    keys = keys_from_env()
    if args.no_auth:
        if not _is_loopback(args.host):
            print(
                f"vllm-autoserve: --no-auth is only allowed on a loopback host, not {args.host}",
                file=sys.stderr,
            )
            return 2
        api_keys = ApiKeys(keys, open=True)
    elif not keys:
        print(
            f"vllm-autoserve: set {AUTH_ENV} to the API key clients must send "
            "(several keys: comma-separated), or pass --no-auth on a loopback host",
            file=sys.stderr,
        )
        return 2
    else:
        api_keys = ApiKeys(keys)
    return serve(config, host=args.host, port=args.port, keys=api_keys, log_level=args.log_level)


def missing_programs(config: Config) -> list[str]:
    """Local engines' programs that this host lacks: a valid configuration still, since it
    may be meant for another host, but each would fail at its first request."""
    problems = []
    python = config.defaults.engine_python
    if python and shutil.which(python) is None:
        problems.append(f"defaults.engine_python: {python!r} is not a program on this host")
    for name, model in config.models.items():  # each key where it is written, once
        where = f'models."{name}"'
        if model.command and shutil.which(model.command[0]) is None:
            problems.append(f"{where}.command: {model.command[0]!r} is not a program on this host")
        python = model.engine_python
        if python and model.command is None and model.url is None and shutil.which(python) is None:
            problems.append(f"{where}.engine_python: {python!r} is not a program on this host")
    return problems


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vllm-autoserve: {exc}", file=sys.stderr)
        return 2
    for problem in missing_programs(config):
        print(f"warning: {problem}", file=sys.stderr)
    print(f"ok: {len(config.models)} model(s) configured")
    return 0


def _cmd_install_cpu(args: argparse.Namespace) -> int:
    from .cpu_engine import CpuEngineInstallError, install_cpu_engine

    try:
        python = install_cpu_engine(extra_index_url=args.extra_index_url, force=args.force)
    except CpuEngineInstallError as exc:
        print(f"vllm-autoserve: {exc}", file=sys.stderr)
        return 1
    print(f"vLLM CPU engine ready: {python}")
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import TinyModelError, write_tiny_model

    try:
        path = write_tiny_model(Path(args.path), seed=args.seed)
    except TinyModelError as exc:
        print(f"vllm-autoserve: {exc}", file=sys.stderr)
        return 1
    print(f"tiny model ready: {path}")  # written, or found there already
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(host=args.host, port=args.port, log_level=args.log_level)


def _version() -> str:
    try:
        return version("vllm-autoserve")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    # Logging options go with every command: `vllm-autoserve serve --log-format json`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    common.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line, with the fields as keys",
    )
    parser = argparse.ArgumentParser(
        prog="vllm-autoserve",
        description="OpenAI-compatible gateway that starts vLLM engines on demand.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common], help="run the gateway with local engines")
    p.add_argument("--config", default=None, help=f"TOML file (default: ${CONFIG_ENV})")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=_port, default=8000, help="port to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--no-auth", action="store_true", help="accept requests without a key (loopback hosts only)"
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check-config", parents=[common], help="validate a configuration file")
    p.add_argument("config")
    p.set_defaults(func=_cmd_check_config)

    engine = sub.add_parser("engine", help="manage local engine installs")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    p = engine_sub.add_parser(
        "install-cpu",
        parents=[common],
        help="provision vLLM's CPU build in its own venv",
    )
    p.add_argument(
        "--extra-index-url",
        default=None,
        help="extra package index for torch's CPU build, e.g. https://download.pytorch.org/whl/cpu",
    )
    p.add_argument("--force", action="store_true", help="reinstall even if present")
    p.set_defaults(func=_cmd_install_cpu)

    p = sub.add_parser(
        "make-tiny-model", parents=[common], help="write a tiny random model vLLM can serve"
    )
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_tiny_model)

    p = sub.add_parser(
        "demo", parents=[common], help="a working endpoint on this machine in one command"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
