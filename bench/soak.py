"""Soak: mixed traffic through the gateway for a while, its memory sampled throughout.

    uv run python bench/soak.py [--minutes 10] [--gateway-src DIR] [--out bench/RESULTS.md]

Not part of CI (it takes as long as it is told to). Against the stand-in upstream it cycles
through: non-streaming chat at concurrency 8, streamed chat, 20 ms-paced streams, 200 streams
held open and then dropped by the client (the disconnect path), and requests with a wrong
key (401). Every round is bounded in requests and seconds, the whole run by ``--minutes``.
The gateway's RSS, open file descriptors and CPU time are sampled every ``--every`` seconds;
the summary gives the growth over the second half of the run, where a leak would show
(the first half includes the allocator's warm-up).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import BENCH_DIR, LoadGen, Proc, start_gateway, start_upstream

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def sampler(proc: Proc, every: float, stop: threading.Event, out: list[dict[str, float]]) -> None:
    p = psutil.Process(proc.pid)
    start = time.monotonic()
    while not stop.is_set():
        try:
            cpu = p.cpu_times()
            out.append(
                {
                    "t": time.monotonic() - start,
                    "rss_mib": p.memory_info().rss / 2**20,
                    "fds": float(p.num_fds()),
                    "cpu_s": cpu.user + cpu.system,
                }
            )
        except psutil.Error:
            return
        stop.wait(every)


def slope_per_minute(samples: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` over time, per minute."""
    if len(samples) < 3:
        return float("nan")
    xs = [s["t"] for s in samples]
    ys = [s[key] for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=5.0, help="sampling interval, seconds")
    parser.add_argument("--gateway-src", default=None)
    parser.add_argument("--out", default=None, help="write the summary into this markdown file")
    args = parser.parse_args()
    command = "uv run python bench/soak.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started_at = dt.datetime.now(dt.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="autoserve-soak-"))
    procs: list[Proc] = []
    samples: list[dict[str, float]] = []
    stop = threading.Event()
    counts: dict[str, list[int]] = {}
    loadgen: LoadGen | None = None
    try:
        upstream = start_upstream(workdir)
        procs.append(upstream)
        gateway = start_gateway(workdir, upstream.url, src=args.gateway_src)
        procs.append(gateway)
        loadgen = LoadGen(workdir)
        thread = threading.Thread(target=sampler, args=(gateway, args.every, stop, samples))
        thread.start()
        url, key = gateway.url, gateway.key
        rounds: list[tuple[str, dict[str, Any]]] = [
            ("chat c=8", {"model": "bench", "concurrency": 8, "count": 4000, "seconds": 3}),
            (
                "stream c=8",
                {
                    "model": "bench",
                    "stream": True,
                    "max_tokens": 16,
                    "concurrency": 8,
                    "count": 2000,
                    "seconds": 3,
                },
            ),
            (
                "20 ms ticks c=8",
                {
                    "model": "bench-tick",
                    "stream": True,
                    "max_tokens": 25,
                    "concurrency": 8,
                    "count": 16,
                    "seconds": 5,
                },
            ),
            (
                "wrong key c=4",
                {
                    "model": "bench",
                    "concurrency": 4,
                    "count": 400,
                    "seconds": 2,
                    "key": "not-the-key",
                },
            ),
        ]
        deadline = time.monotonic() + args.minutes * 60
        cycle = 0
        while time.monotonic() < deadline:
            cycle += 1
            for name, spec in rounds:
                if time.monotonic() >= deadline:
                    break
                cmd = {"op": "latency", "url": url, "key": key, **spec}
                result = loadgen.call(cmd)
                ok, bad = counts.setdefault(name, [0, 0])
                counts[name] = [ok + result.get("n", 0), bad + result.get("errors", 0)]
            if time.monotonic() >= deadline:
                break
            loadgen.send(
                {
                    "op": "open_streams",
                    "url": url,
                    "key": key,
                    "model": "bench-hold",
                    "stream": True,
                    "count": 200,
                    "seconds": 20,
                }
            )
            opened = loadgen.read()
            time.sleep(0.5)
            loadgen.send({"op": "close_streams"})
            loadgen.read()
            ok, bad = counts.setdefault("200 held streams, dropped", [0, 0])
            counts["200 held streams, dropped"] = [
                ok + opened.get("opened", 0),
                bad + opened.get("failed", 0),
            ]
        time.sleep(args.every + 1)  # one sample at rest
    finally:
        stop.set()
        if loadgen is not None:
            loadgen.close()
        for proc in reversed(procs):
            proc.stop()

    half = [s for s in samples if s["t"] >= samples[-1]["t"] / 2] if samples else []
    lines = [
        f"Soak run {started_at:%Y-%m-%d %H:%M} UTC, {args.minutes:g} min, {cycle} cycles:",
        "",
        f"    {command.strip()}",
        "",
        "| traffic | requests / streams answered | not 200 (expected for wrong key) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ok} | {bad} |" for name, (ok, bad) in counts.items()]
    if samples:
        first, last = samples[0], samples[-1]
        peak = max(s["rss_mib"] for s in samples)
        lines += [
            "",
            f"Gateway RSS: {first['rss_mib']:.1f} MiB at start, peak {peak:.1f} MiB, "
            f"{last['rss_mib']:.1f} MiB at rest after the run; over the second half "
            f"{slope_per_minute(half, 'rss_mib'):+.2f} MiB/min. Open file descriptors: "
            f"{first['fds']:.0f} at start, {max(s['fds'] for s in samples):.0f} peak, "
            f"{last['fds']:.0f} at the end. Gateway CPU: {last['cpu_s'] - first['cpu_s']:.0f} s "
            f"in {last['t']:.0f} s ({len(samples)} samples every {args.every:g} s).",
            "",
            "RSS samples (MiB): "
            + ", ".join(f"{s['rss_mib']:.0f}" for s in samples[:: max(1, len(samples) // 24)]),
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        path = Path(args.out)
        block = f"{BEGIN}\n{text}\n{END}"
        current = path.read_text() if path.exists() else ""
        if BEGIN in current and END in current:
            head, rest = current.split(BEGIN, 1)
            path.write_text(head + block + rest.split(END, 1)[1])
        else:
            path.write_text(current + ("\n" if current else "") + block + "\n")
    print(f"[soak] logs in {workdir}; bench dir {BENCH_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
