"""CPU per request of gateway variants, side by side: the quick check for a hot-path change.

    uv run python bench/cpu_ab.py [--rounds 4] [--seconds 4] \\
        base=-  changed=/tmp/changed/server/src  quiet=-@warning ...

Each ``NAME=SRC`` runs ``vllm-autoserve serve`` with ``SRC`` first on PYTHONPATH (``-`` for the
installed package); a ``@LEVEL`` suffix sets ``--log-level`` (``@warning`` turns the access
log off). All variants share one stand-in upstream; ``wrk`` drives each at saturation for
``--seconds`` per round, the order shuffled every round, and the gateway's own CPU time
(user + system, from psutil) is divided by the requests wrk completed. CPU per request is
far steadier than requests per second on a shared 2-core machine, so differences of a few
percent show. Needs ``wrk`` (Debian package).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import KEY, Proc, start_gateway, start_upstream


def cpu_seconds(proc: Proc) -> float:
    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help="NAME=SRC[@LEVEL]")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="SSE responses (8 chunks)")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        print("cpu_ab: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="autoserve-cpu-ab-"))
    procs: list[Proc] = []
    try:
        upstream = start_upstream(workdir)
        procs.append(upstream)
        gateways: dict[str, Proc] = {}
        for spec in args.variants:
            name, _, rest = spec.partition("=")
            src, _, level = rest.partition("@")
            gateways[name] = start_gateway(
                workdir,
                upstream.url,
                name=f"gw-{name}",
                src=None if src in ("", "-") else src,
                log_level=level or "info",
            )
            procs.append(gateways[name])
        body = '{"model":"bench","messages":[{"role":"user","content":"Say hello."}]'
        body += ',"stream":true}' if args.stream else "}"
        script = workdir / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = '{body}'\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
        )
        cpu: dict[str, list[float]] = {name: [] for name in gateways}
        rps: dict[str, list[float]] = {name: [] for name in gateways}
        order = list(gateways)
        for name in order:  # warm-up
            subprocess.run(
                [
                    wrk,
                    "-t1",
                    "-c16",
                    "-d1s",
                    "-s",
                    str(script),
                    gateways[name].url + "/v1/chat/completions",
                ],
                capture_output=True,
                timeout=60,
                check=False,
            )
        rng = random.Random(1)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                gw = gateways[name]
                before = cpu_seconds(gw)
                out = subprocess.run(
                    [
                        wrk,
                        "-t1",
                        f"-c{args.connections}",
                        f"-d{args.seconds}s",
                        "-s",
                        str(script),
                        gw.url + "/v1/chat/completions",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=args.seconds + 60,
                    check=False,
                ).stdout
                used = cpu_seconds(gw) - before
                done = re.search(r"(\d+) requests in", out)
                bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
                if bad:
                    print(f"{name}: {bad.group(1)} non-2xx responses", file=sys.stderr)
                if done and int(done.group(1)):
                    cpu[name].append(used / int(done.group(1)) * 1e6)
                    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
                    rps[name].append(float(rate.group(1)) if rate else float("nan"))
        first = next(iter(gateways))
        ref = statistics.median(cpu[first])
        print(
            f"{'variant':<12} {'CPU µs/req (median)':>20} {'vs ' + first:>10} "
            f"{'req/s (median)':>15}  rounds (µs)"
        )
        for name in gateways:
            med = statistics.median(cpu[name])
            print(
                f"{name:<12} {med:>20.1f} {med / ref - 1:>+10.1%} "
                f"{statistics.median(rps[name]):>15.0f}  "
                + ", ".join(f"{v:.0f}" for v in cpu[name])
            )
    finally:
        for proc in reversed(procs):
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
