"""Proxy overhead budget: the gateway against direct access to a fast upstream, in one run.

    uv run python bench/proxy_bench.py [--quick] [--no-peers] [--upstream vllm-front|vllm]

Starts the stand-in upstream (``upstream.py``), the real gateway (``vllm-autoserve serve``)
in front of it, nginx and LiteLLM's proxy as peers when installed, and a load generator in a
separate process (``loadgen.py``; ``wrk`` for saturation when installed). Every scenario
runs in rounds, and each round visits every target in a shuffled order, so that whatever the
machine does meanwhile hits all targets alike. Then: memory with 1,000 open streams, a
profile of the gateway under load (py-spy, when installed) and the cold-start path.

The measured part of ``bench/RESULTS.md`` (between its ``bench:begin``/``bench:end``
markers; ``bench-vllm-front:...`` and ``bench-vllm:...`` with ``--upstream vllm-front`` and
``--upstream vllm``) is rewritten; the rest of the file (the analysis) is kept. ``--out FILE`` writes
elsewhere. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import (
    BENCH_DIR,
    KEY,
    UPSTREAM,
    LoadGen,
    Proc,
    free_port,
    http_json,
    loaded_native_modules,
    spawn,
    start_gateway,
    start_litellm,
    start_nginx,
    start_upstream,
    wait_ready,
)

RESULTS = BENCH_DIR / "RESULTS.md"
# Each stand-in's measured block in the results file, between its own markers.
UPSTREAM_KINDS = {
    "bare": ("bench", "`upstream.py` (raw asyncio and httptools: as cheap as an upstream gets)"),
    "vllm-front": (
        "bench-vllm-front",
        "`upstream_vllm_front.py` (vLLM {version}'s own HTTP front, uvicorn + FastAPI + its "
        "request and response models, answering at once: no template, tokenizer or model)",
    ),
    "vllm": (
        "bench-vllm",
        "the real vLLM {version} CPU engine, pinned to one core, serving the tiny test model "
        "(2 layers, hidden size 256); non-streamed chat capped at {tokens} tokens",
    ),
}
# Non-streamed chat against a real engine stops here (the tiny model never ends on its own).
REAL_ENGINE_CHAT_TOKENS = 8

# The proxy overhead budget, as ratios to direct access in the same run.
BUDGET = {
    "p50_c1": 3.0,
    "p50_c16": 2.0,
    "p99_c16": 3.0,
    "ttfb_p50_c16": 2.5,
    "extra_gap_p99_ms": 5.0,
    "rps_share": 0.40,
    "kib_per_stream": 64.0,
    "cold_held_ms": 100.0,
    "cold_client_ms": 300.0,
}


# -- statistics ---------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ms(seconds: float) -> str:
    return "—" if seconds != seconds else f"{seconds * 1e3:.2f}"


# -- the run ------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.workdir = Path(tempfile.mkdtemp(prefix="autoserve-bench-"))
        self.procs: list[Proc] = []
        self.targets: dict[str, tuple[str, str | None]] = {}  # name -> (url, key)
        self.proxies: dict[str, Proc] = {}  # target name -> process to measure
        self.skipped: dict[str, str] = {}
        self.results: dict[str, Any] = {"scenarios": {}}
        self.loadgen: LoadGen | None = None

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    # -- set-up -----------------------------------------------------------------------

    def start(self) -> None:
        args = self.args
        self.log(f"work dir {self.workdir}")
        self.upstream = start_upstream(self.workdir, kind=args.upstream)
        self.procs.append(self.upstream)
        self.targets["direct"] = (self.upstream.url, None)
        gateway = start_gateway(self.workdir, self.upstream.url, src=args.gateway_src)
        self.procs.append(gateway)
        self.targets["gateway"] = (gateway.url, gateway.key)
        self.proxies["gateway"] = gateway
        if args.compare_src or args.compare_log_level:
            other = start_gateway(
                self.workdir,
                self.upstream.url,
                name="gateway-b",
                src=args.compare_src or args.gateway_src,
                log_level=args.compare_log_level or "info",
            )
            self.procs.append(other)
            self.targets["gateway-b"] = (other.url, other.key)
            self.proxies["gateway-b"] = other
        for kind in args.floor:
            # floor.py's bare proxies: what a Python proxy costs at least (see floor.py).
            port = free_port()
            floor = spawn(
                f"{kind}-floor",
                [sys.executable, str(BENCH_DIR / "floor.py"), "serve", kind, str(port)],
                self.workdir,
                {"FLOOR_UPSTREAM": self.upstream.url},
            )
            floor.url = f"http://127.0.0.1:{port}"
            self.procs.append(floor)
            wait_ready(floor, floor.url + "/health", 20)
            self.targets[floor.name] = (floor.url, None)
            self.proxies[floor.name] = floor
        if not args.no_peers:
            for name, starter in (
                ("nginx", lambda: start_nginx(self.workdir, self.upstream.url)),
                (
                    "litellm",
                    lambda: start_litellm(self.workdir, self.upstream.url, args.litellm),
                ),
            ):
                if name in args.skip:
                    self.skipped[name] = "skipped with --skip"
                    continue
                self.log(f"starting {name}")
                started = starter()
                if isinstance(started, str):
                    self.skipped[name] = started
                    self.log(f"{name}: {started}")
                    continue
                self.procs.append(started)
                self.targets[name] = (started.url, started.key)
                self.proxies[name] = started
        self.loadgen = LoadGen(self.workdir)
        self.results["native"] = {
            name: loaded_native_modules(p.pid)
            for name, p in self.proxies.items()
            if name.startswith("gateway")
        }
        self.log("targets: " + ", ".join(self.targets))

    def stop(self) -> None:
        if self.loadgen is not None:
            self.loadgen.close()
        for proc in reversed(self.procs):
            proc.stop()

    # -- helpers ----------------------------------------------------------------------

    def latency(self, target: str, **spec: Any) -> dict[str, Any]:
        url, key = self.targets[target]
        assert self.loadgen is not None
        cmd = {"op": "latency", "url": url, "key": key, "client": self.args.client, **spec}
        result = self.loadgen.call(cmd)
        if "error" in result:
            raise RuntimeError(f"{target}: load generator failed: {result['error']}")
        return result

    def rounds(self, name: str, spec: dict[str, Any], rounds: int) -> dict[str, dict[str, Any]]:
        """Run ``spec`` ``rounds`` times against every target, order shuffled per round."""
        pooled: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"total": [], "first": [], "gaps": [], "n": 0, "errors": 0, "wall": 0.0}
        )
        rng = random.Random(hash(name) & 0xFFFF)
        order = list(self.targets)
        for target in order:  # warm-up: connections, upstream pools, first health check
            self.latency(target, **{**spec, "count": min(spec["count"], 64), "seconds": 5})
        for r in range(rounds):
            rng.shuffle(order)
            for target in order:
                result = self.latency(target, **spec)
                acc = pooled[target]
                for key in ("total", "first", "gaps"):
                    acc[key].extend(result[key])
                acc["n"] += result["n"]
                acc["errors"] += result["errors"]
                acc["wall"] += result["wall"]
                acc.setdefault("round_p50", []).append(pct(result["total"], 50))
            self.log(f"{name}: round {r + 1}/{rounds} done")
        summary = {}
        for target, acc in pooled.items():
            summary[target] = {
                "n": acc["n"],
                "errors": acc["errors"],
                "rps": acc["n"] / acc["wall"] if acc["wall"] else float("nan"),
                "p50": pct(acc["total"], 50),
                "p99": pct(acc["total"], 99),
                "ttfb_p50": pct(acc["first"], 50),
                "ttfb_p99": pct(acc["first"], 99),
                "gap_p50": pct(acc["gaps"], 50),
                "gap_p99": pct(acc["gaps"], 99),
                "gap_max": max(acc["gaps"]) if acc["gaps"] else float("nan"),
                "gaps": len(acc["gaps"]),
                "round_p50": acc["round_p50"],
            }
        self.results["scenarios"][name] = summary
        return summary

    # -- scenarios --------------------------------------------------------------------

    def scenario_latency(self) -> None:
        q = self.quick
        rounds = self.args.rounds or (2 if q else 5)
        seconds = 2.0 if q else 3.0
        base: dict[str, Any] = {"model": "bench", "seconds": seconds}
        if self.args.upstream == "vllm":
            base["max_tokens"] = REAL_ENGINE_CHAT_TOKENS
        self.rounds("chat_c1", {**base, "concurrency": 1, "count": 600 if q else 1500}, rounds)
        self.rounds("chat_c16", {**base, "concurrency": 16, "count": 3000 if q else 8000}, rounds)
        self.rounds(
            "stream_c16",
            {
                **base,
                "stream": True,
                "max_tokens": 8,
                "concurrency": 16,
                "count": 1500 if q else 4000,
            },
            rounds,
        )
        chunks = 25 if q else 50
        self.rounds(
            "tick_c16",
            {
                "model": "bench-tick",
                "stream": True,
                "max_tokens": chunks,
                "concurrency": 16,
                "count": 32 if q else 64,
                "seconds": 10.0,
            },
            rounds,
        )

    def scenario_saturation(self) -> None:
        wrk = shutil.which("wrk")
        rounds = self.args.rounds or (2 if self.quick else 3)
        duration = 3 if self.quick else 5
        conns = 64
        rps: dict[str, list[float]] = defaultdict(list)
        cpu_us: dict[str, list[float]] = defaultdict(list)
        errors: dict[str, int] = defaultdict(int)
        order = list(self.targets)
        rng = random.Random(7)
        if wrk is None:
            self.results["saturation_tool"] = "loadgen (wrk not installed)"
        else:
            self.results["saturation_tool"] = f"wrk -t1 -c{conns} -d{duration}s"
        for r in range(rounds):
            rng.shuffle(order)
            for target in order:
                proc = self.proxies.get(target, self.upstream if target == "direct" else None)
                cpu_before = self._cpu(proc)
                if wrk is None:
                    result = self.latency(
                        target,
                        model="bench",
                        concurrency=conns,
                        count=200000,
                        seconds=duration,
                    )
                    value, done = result["n"] / result["wall"], result["n"]
                    errors[target] += result["errors"]
                else:
                    value, errs, done = self._wrk(wrk, target, conns, duration)
                    errors[target] += errs
                rps[target].append(value)
                if proc is not None and done:
                    cpu_us[target].append((self._cpu(proc) - cpu_before) / done * 1e6)
            self.log(f"saturation: round {r + 1}/{rounds} done")
        self.results["saturation"] = {
            t: {
                "rps": sorted(v)[len(v) // 2],
                "rounds": v,
                "errors": errors[t],
                "cpu_us": sorted(cpu_us[t])[len(cpu_us[t]) // 2] if cpu_us[t] else float("nan"),
                "cpu_us_rounds": cpu_us[t],
            }
            for t, v in rps.items()
        }

    @staticmethod
    def _cpu(proc: Proc | None) -> float:
        """User + system CPU seconds of a process and its children (nginx's worker)."""
        if proc is None:
            return 0.0
        total = 0.0
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(proc.pid)
            for q in (p, *p.children(recursive=True)):
                t = q.cpu_times()
                total += t.user + t.system
        return total

    def _wrk(self, wrk: str, target: str, conns: int, duration: int) -> tuple[float, int, int]:
        url, key = self.targets[target]
        script = self.workdir / f"wrk-{target}.lua"
        request: dict[str, Any] = {
            "model": "bench",
            "messages": [{"role": "user", "content": "Say hello."}],
        }
        if self.args.upstream == "vllm":
            request["max_tokens"] = REAL_ENGINE_CHAT_TOKENS
        body = json.dumps(request)
        lines = [
            'wrk.method = "POST"',
            f"wrk.body = {json.dumps(body)}",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
        if key:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
        script.write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{conns}",
                f"-d{duration}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                url + "/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        ).stdout
        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        errs = 0
        for pattern in (r"Non-2xx or 3xx responses:\s+(\d+)", r"Socket errors:.*?(\d+)"):
            m = re.search(pattern, out)
            errs += int(m.group(1)) if m else 0
        return (
            float(found.group(1)) if found else float("nan"),
            errs,
            int(total.group(1)) if total else 0,
        )

    def scenario_memory(self) -> None:
        count = self.args.streams
        assert self.loadgen is not None
        memory = {}
        for name in self.targets:  # warm up: connections, upstream pools, code paths
            self.latency(name, model="bench", stream=True, concurrency=16, count=400, seconds=10)
        for name, proc in self.proxies.items():
            tree = name != "gateway" and not name.startswith("gateway")
            url, key = self.targets[name]
            time.sleep(1.0)
            before = proc.rss(tree)
            self.loadgen.send(
                {
                    "op": "open_streams",
                    "url": url,
                    "key": key,
                    "model": "bench-hold",
                    "stream": True,
                    "count": count,
                    "seconds": 90,
                }
            )
            opened = self.loadgen.read()
            if "error" in opened:
                memory[name] = {"error": opened["error"]}
                continue
            time.sleep(1.0)
            during = proc.rss(tree)
            self.loadgen.send({"op": "close_streams"})
            self.loadgen.read()
            time.sleep(1.0)
            after = proc.rss(tree)
            per = (during - before) / max(1, opened["opened"]) / 1024
            memory[name] = {
                "opened": opened["opened"],
                "failed": opened["failed"],
                "open_seconds": opened["seconds"],
                "before_mib": before / 2**20,
                "during_mib": during / 2**20,
                "after_mib": after / 2**20,
                "kib_per_stream": per,
                "processes": "tree" if tree else "one",
            }
            self.log(
                f"memory {name}: {opened['opened']} open, {per:.1f} KiB/stream "
                f"({before / 2**20:.1f} -> {during / 2**20:.1f} MiB)"
            )
        self.results["memory"] = memory

    def scenario_profile(self) -> None:
        spy = self.args.py_spy or shutil.which("py-spy")
        if spy is None and os.path.exists("/tmp/bench-tools-venv/bin/py-spy"):
            spy = "/tmp/bench-tools-venv/bin/py-spy"
        if spy is None:
            self.results["profile"] = {"skipped": "py-spy not installed (uv tool install py-spy)"}
            return
        wrk = shutil.which("wrk")
        gateway = self.proxies["gateway"]
        seconds = 8 if self.quick else 15
        raw = self.workdir / "profile.txt"
        spy_proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(gateway.pid),
                "--duration",
                str(seconds),
                "--rate",
                "100",
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        if wrk:
            self._wrk(wrk, "gateway", 64, seconds - 2)
        else:
            self.latency("gateway", model="bench", concurrency=64, count=10**6, seconds=seconds - 2)
        spy_proc.wait(seconds + 30)
        if not raw.exists():
            self.results["profile"] = {"skipped": "py-spy wrote nothing (ptrace not allowed?)"}
            return
        self.results["profile"] = summarise_profile(raw.read_text())
        shutil.copy(raw, self.workdir / "profile-gateway.txt")

    def scenario_cold(self) -> None:
        """Held requests for ``command =`` models whose stand-in listens only after a delay.

        The delays are staggered over 0.5 s past the point where the gateway's health poll
        has reached its longest interval, so the engines come up at every phase of the poll;
        the held requests are sent at once, one thread each.
        """
        reps = 3 if self.quick else 6
        delays = [2.0 + 0.5 * i / reps for i in range(reps)]
        events = [self.workdir / f"cold-{i}.jsonl" for i in range(reps)]
        cold = [
            (
                f"bench-cold-{i}",
                [
                    sys.executable,
                    str(UPSTREAM),
                    "--port",
                    "{port}",
                    "--startup-delay",
                    f"{delays[i]:.3f}",
                    "--events",
                    str(events[i]),
                    "--lifetime",
                    "600",
                ],
            )
            for i in range(reps)
        ]
        client_model = (
            "bench-cold-client",
            [
                sys.executable,
                str(UPSTREAM),
                "--port",
                "{port}",
                "--startup-delay",
                "2.0",
                "--events",
                str(self.workdir / "cold-client.jsonl"),
                "--lifetime",
                "600",
            ],
        )
        gateway = start_gateway(
            self.workdir,
            None,
            name="gateway-cold",
            src=self.args.gateway_src,
            cold=[*cold, client_model],
        )
        self.procs.append(gateway)

        def held_request(i: int) -> dict[str, Any]:
            model = cold[i][0]
            sent = time.monotonic()
            status, _ = http_json(
                gateway.url + "/v1/chat/completions",
                {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                key=KEY,
                timeout=90,
            )
            answered = time.monotonic()
            marks = read_events(events[i])
            return {
                "model": model,
                "status": status,
                "startup_delay_s": delays[i],
                "request_to_answer_s": answered - sent,
                "listening_to_health_ok_ms": (marks["health_ok"] - marks["listening"]) * 1e3
                if {"health_ok", "listening"} <= marks.keys()
                else float("nan"),
                "health_ok_to_request_ms": (marks["request"] - marks["health_ok"]) * 1e3
                if {"health_ok", "request"} <= marks.keys()
                else float("nan"),
            }

        with ThreadPoolExecutor(reps) as pool:
            held = list(pool.map(held_request, range(reps)))
        for h in held:
            self.log(f"cold {h['model']}: {h}")
        self.results["cold"] = {"held": held, "client": self._cold_client(gateway)}

    def _cold_client(self, gateway: Proc) -> dict[str, Any]:
        try:
            from vllm_autoserve_client import AutoserveClient  # type: ignore[attr-defined]
        except ImportError as exc:
            return {"skipped": f"vllm_autoserve_client.AutoserveClient not importable ({exc})"}
        path = self.workdir / "cold-client.jsonl"
        client = AutoserveClient(
            model="bench-cold-client", base_url=gateway.url + "/v1", api_key=KEY
        )
        sent = time.monotonic()
        client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
        answered = time.monotonic()
        marks = read_events(path)
        return {
            "request_to_answer_s": answered - sent,
            "health_ok_to_response_ms": (answered - marks["health_ok"]) * 1e3
            if "health_ok" in marks
            else float("nan"),
            "health_ok_to_request_ms": (marks["request"] - marks["health_ok"]) * 1e3
            if {"health_ok", "request"} <= marks.keys()
            else float("nan"),
        }


def read_events(path: Path) -> dict[str, float]:
    marks: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            marks.setdefault(event["event"], event["t"])
    return marks


def summarise_profile(raw: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    total = 0
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            incl[name] += count
    roots = ("runpy", "cli.py", "runners.py", "uvicorn/server.py", "_compat.py", "<module>")
    incl = defaultdict(int, {k: v for k, v in incl.items() if not any(r in k for r in roots)})
    share = lambda d: sorted(((v / total, k) for k, v in d.items()), reverse=True)[:top]  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(incl)}


def _frame_name(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"; process/thread roots out.
    m = re.match(r"(.+?) \((.+?)(?::\d+)?\)$", frame.strip())
    if not m:
        return ""
    func, path = m.groups()
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    for marker in ("site-packages/", "vllm_autoserve/", "python3.11/"):
        if marker in path:
            short = path.split(marker, 1)[1]
            break
    return f"{func} ({short})"


# -- the report ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for dist in ("uvicorn", "aiohttp", "uvloop", "httptools", "orjson", "prometheus-client"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx_v = ""
    with contextlib.suppress(OSError):
        nginx_v = (
            subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
            .stderr.strip()
            .split("/")[-1]
        )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "nginx": nginx_v or "absent",
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**pass**" if ok else "**MISS**")


def _upstream_text(run: Run) -> str:
    from vllm_autoserve.cpu_engine import CPU_ENGINE_VERSION

    text = UPSTREAM_KINDS[run.args.upstream][1]
    return text.format(version=CPU_ENGINE_VERSION, tokens=REAL_ENGINE_CHAT_TOKENS)


def render(run: Run, command: str, started: dt.datetime) -> str:
    res = run.results
    sc: dict[str, dict[str, Any]] = defaultdict(dict, res["scenarios"])
    m = machine()
    names = list(run.targets)
    out: list[str] = []
    w = out.append
    w(f"Measured {started:%Y-%m-%d %H:%M} UTC with\n\n    {command}\n")
    w(
        f"Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']}, Python {m['python']}, "
        f"Linux {m['kernel']}; {m['libraries']}; nginx {m['nginx']}. Load generator: "
        f"`loadgen.py` ({run.args.client} client) in its own process; saturation: "
        f"{res.get('saturation_tool', '—')}. Stand-in upstream (`direct`): {_upstream_text(run)}.\n"
    )
    for name, why in res.get("failed", {}).items():
        w(f"- **scenario {name} failed**: {why.splitlines()[0] if why else ''}")
    if run.skipped:
        for name, why in run.skipped.items():
            w(f"- **{name} skipped**: {why}")
        w("")
    native = res.get("native", {})
    for name, mods in native.items():
        w(
            f"- {name} process has loaded: "
            + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in mods.items())
        )
    w("")

    # latency table
    w("### Latency (ms)\n")
    w(
        "| target | chat c=1 p50 | p99 | chat c=16 p50 | p99 | stream c=16 TTFB p50 | TTFB p99 "
        "| total p50 | 20 ms ticks: gap p50 | gap p99 | gap max | errors |"
    )
    w("|---|" + "---:|" * 11)
    for t in names:
        c1, c16 = sc["chat_c1"].get(t, {}), sc["chat_c16"].get(t, {})
        st, tk = sc["stream_c16"].get(t, {}), sc["tick_c16"].get(t, {})
        errors = sum(s.get("errors", 0) for s in (c1, c16, st, tk))
        w(
            f"| {t} | {ms(c1.get('p50', float('nan')))} | {ms(c1.get('p99', float('nan')))} "
            f"| {ms(c16.get('p50', float('nan')))} | {ms(c16.get('p99', float('nan')))} "
            f"| {ms(st.get('ttfb_p50', float('nan')))} | {ms(st.get('ttfb_p99', float('nan')))} "
            f"| {ms(st.get('p50', float('nan')))} | {ms(tk.get('gap_p50', float('nan')))} "
            f"| {ms(tk.get('gap_p99', float('nan')))} | {ms(tk.get('gap_max', float('nan')))} "
            f"| {errors} |"
        )
    w("")
    w(
        "Samples per target: "
        + "; ".join(
            f"{s}: " + ", ".join(f"{t} {sc[s][t]['n']}" for t in names if t in sc[s])
            for s in ("chat_c1", "chat_c16", "stream_c16")
        )
        + "; tick gaps: "
        + ", ".join(f"{t} {sc['tick_c16'][t]['gaps']}" for t in names if t in sc["tick_c16"])
        + ".\n"
    )

    # saturation + memory
    sat, mem = res.get("saturation", {}), res.get("memory", {})
    w("### Saturation and memory\n")
    w(
        "| target | req/s at saturation (median of rounds) | rounds | CPU µs per request "
        "| errors | RSS idle MiB "
        "| RSS with streams open MiB | streams open | KiB per open stream | RSS after close MiB |"
    )
    w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for t in names:
        s = sat.get(t, {})
        mm = mem.get(t, {})
        rounds = ", ".join(f"{v:.0f}" for v in s.get("rounds", []))
        if mm and "error" not in mm:
            memcols = (
                f"{mm['before_mib']:.1f} | {mm['during_mib']:.1f} | {mm['opened']}"
                f"{' (' + str(mm['failed']) + ' failed)' if mm['failed'] else ''} | "
                f"{mm['kib_per_stream']:.1f} | {mm['after_mib']:.1f}"
            )
        elif mm:
            memcols = f"error: {mm['error']} | | | |"
        else:
            memcols = "— | — | — | — | —"
        w(
            f"| {t} | {s.get('rps', float('nan')):.0f} | {rounds} "
            f"| {s.get('cpu_us', float('nan')):.0f} | {s.get('errors', 0)} "
            f"| {memcols} |"
        )
    w("")

    # verdicts
    w("### Budget verdicts (gateway vs direct, same run)\n")
    peers = [t for t in names if t not in ("direct", "gateway")]
    w("| budget | limit | gateway | " + "".join(f"{t} | " for t in peers) + "verdict (gateway) |")
    w("|---|---|---|" + "---|" * len(peers) + "---|")

    def ratio(scen: str, key: str, t: str) -> float:
        d, g = sc[scen].get("direct", {}).get(key), sc[scen].get(t, {}).get(key)
        return g / d if d and g else float("nan")

    rows: list[tuple[str, str, Callable[[str], float], Callable[[float], bool], str]] = [
        (
            "p50 chat c=1",
            f"≤ {BUDGET['p50_c1']}x direct",
            lambda t: ratio("chat_c1", "p50", t),
            lambda v: v <= BUDGET["p50_c1"],
            "{:.2f}x",
        ),
        (
            "p50 chat c=16",
            f"≤ {BUDGET['p50_c16']}x direct",
            lambda t: ratio("chat_c16", "p50", t),
            lambda v: v <= BUDGET["p50_c16"],
            "{:.2f}x",
        ),
        (
            "p99 chat c=16",
            f"≤ {BUDGET['p99_c16']}x direct",
            lambda t: ratio("chat_c16", "p99", t),
            lambda v: v <= BUDGET["p99_c16"],
            "{:.2f}x",
        ),
        (
            "stream TTFB p50 c=16",
            f"≤ {BUDGET['ttfb_p50_c16']}x direct",
            lambda t: ratio("stream_c16", "ttfb_p50", t),
            lambda v: v <= BUDGET["ttfb_p50_c16"],
            "{:.2f}x",
        ),
        (
            "extra inter-chunk gap p99 (20 ms ticks)",
            f"≤ {BUDGET['extra_gap_p99_ms']} ms",
            lambda t: (
                (
                    sc["tick_c16"].get(t, {}).get("gap_p99", float("nan"))
                    - sc["tick_c16"].get("direct", {}).get("gap_p99", float("nan"))
                )
                * 1e3
            ),
            lambda v: v <= BUDGET["extra_gap_p99_ms"],
            "{:+.2f} ms",
        ),
        (
            "req/s at saturation",
            f"≥ {BUDGET['rps_share']:.0%} of direct",
            lambda t: (
                sat.get(t, {}).get("rps", float("nan"))
                / sat.get("direct", {}).get("rps", float("nan"))
            ),
            lambda v: v >= BUDGET["rps_share"],
            "{:.0%}",
        ),
        (
            "memory per open stream",
            f"≤ {BUDGET['kib_per_stream']:.0f} KiB",
            lambda t: mem.get(t, {}).get("kib_per_stream", float("nan")),
            lambda v: v <= BUDGET["kib_per_stream"],
            "{:.1f} KiB",
        ),
    ]
    verdicts = {}
    for label, limit, get, check, fmt in rows:
        g = get("gateway")
        ok = None if g != g else check(g)
        verdicts[label] = ok
        peer_cols = " | ".join(("—" if get(p) != get(p) else fmt.format(get(p))) for p in peers)
        w(
            f"| {label} | {limit} | {'—' if g != g else fmt.format(g)} | "
            + (peer_cols + " | " if peers else "")
            + f"{verdict(ok)} |"
        )
    cold = res.get("cold", {})
    if cold.get("held"):
        worst = max(h["health_ok_to_request_ms"] for h in cold["held"])
        ok = worst <= BUDGET["cold_held_ms"]
        verdicts["cold held"] = ok
        w(
            f"| cold start: engine's first /health 200 → held request upstream (worst of "
            f"{len(cold['held'])}) | ≤ {BUDGET['cold_held_ms']:.0f} ms | {worst:.1f} ms | "
            + ("— | " * len(peers))
            + f"{verdict(ok)} |"
        )
    client = cold.get("client", {})
    if client and "skipped" not in client:
        v = client["health_ok_to_response_ms"]
        ok = v <= BUDGET["cold_client_ms"]
        verdicts["cold client"] = ok
        w(
            f"| cold start with AutoserveClient: first /health 200 → response | "
            f"≤ {BUDGET['cold_client_ms']:.0f} ms | {v:.1f} ms | "
            + ("— | " * len(peers))
            + f"{verdict(ok)} |"
        )
    w("")
    if client.get("skipped"):
        w(f"- Client cold-start check skipped: {client['skipped']}.")
    if cold.get("held"):
        w(
            "- Cold start, per engine (stand-in listening after its delay; the gateway polls "
            "`/health`):"
        )
        w("")
        w(
            "  | model | startup delay s | listening → first /health 200 ms "
            "| first /health 200 → held request received ms | request → answer s |"
        )
        w("  |---|---:|---:|---:|---:|")
        for h in cold["held"]:
            w(
                f"  | {h['model']} | {h['startup_delay_s']:.2f} | "
                f"{h['listening_to_health_ok_ms']:.1f} | {h['health_ok_to_request_ms']:.1f} | "
                f"{h['request_to_answer_s']:.2f} |"
            )
    w("")
    prof = res.get("profile", {})
    if prof.get("skipped"):
        w(f"### Profile\n\nSkipped: {prof['skipped']}\n")
    elif prof:
        w(f"### Profile of the gateway under saturation ({prof['samples']} py-spy samples)\n")
        w("| self % | function (leaf frame) | | inclusive % | function |")
        w("|---:|---|---|---:|---|")
        for (sv, sn), (iv, iname) in zip(prof["self"][:20], prof["inclusive"][:20], strict=False):
            w(f"| {sv:.1%} | `{sn}` | | {iv:.1%} | `{iname}` |")
        w("")
    res["verdicts"] = verdicts
    return "\n".join(out)


def write_results(text: str, path: Path, marker: str) -> None:
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{text}\n{end}"
    if path.exists():
        current = path.read_text()
        if begin in current and end in current:
            head, rest = current.split(begin, 1)
            _, tail = rest.split(end, 1)
            path.write_text(head + block + tail)
            return
        path.write_text(current.rstrip("\n") + "\n\n" + block + "\n")
        return
    path.write_text(f"# Proxy overhead: results\n\n{block}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description="Proxy overhead budget.")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about 3 minutes)")
    parser.add_argument("--no-peers", action="store_true", help="skip nginx and LiteLLM")
    parser.add_argument(
        "--skip",
        default="",
        help="comma-separated: nginx,litellm,latency,saturation,memory,profile,cold",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "aiohttp"],
        default="raw",
        help="the load generator's HTTP client (default: raw httptools)",
    )
    parser.add_argument("--rounds", type=int, default=0, help="override the rounds per scenario")
    parser.add_argument("--streams", type=int, default=1000, help="open streams for memory")
    parser.add_argument(
        "--gateway-src", default=None, help="server/src of another checkout to run as the gateway"
    )
    parser.add_argument(
        "--compare-src",
        default=None,
        help="also run a second gateway from this server/src ('gateway-b')",
    )
    parser.add_argument(
        "--compare-log-level",
        default=None,
        help="run 'gateway-b' with this --log-level (warning: no access log)",
    )
    parser.add_argument(
        "--floor",
        default="",
        help="comma-separated floor.py proxies to measure too: raw,aiohttp,splice ('KIND-floor')",
    )
    parser.add_argument(
        "--upstream",
        choices=list(UPSTREAM_KINDS),
        default="bare",
        help="the upstream: bare (raw asyncio stand-in, default), vllm-front (vLLM's HTTP "
        "front, no model) or vllm (the real CPU engine and the tiny model; no memory "
        "scenario); each kind's results go to their own block of the results file",
    )
    parser.add_argument("--litellm", default=None, help="path of LiteLLM's `litellm` script")
    parser.add_argument("--py-spy", default=None, help="path of py-spy")
    parser.add_argument("--out", default=str(RESULTS), help="markdown file to write")
    parser.add_argument("--json", default=None, help="also dump the raw summary here")
    args = parser.parse_args()
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.floor = [s.strip() for s in args.floor.split(",") if s.strip()]
    if args.upstream == "vllm":
        args.skip.add("memory")  # a held stream would be a generation running all along
    command = "uv run python bench/proxy_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = dt.datetime.now(dt.UTC)
    run = Run(args)
    try:
        run.start()
        # Memory first, on processes that have only been warmed up (after the load
        # scenarios their allocators would already hold memory that streams could reuse).
        for name, scenario in (
            ("memory", run.scenario_memory),
            ("latency", run.scenario_latency),
            ("saturation", run.scenario_saturation),
            ("profile", run.scenario_profile),
            ("cold", run.scenario_cold),
        ):
            if name in args.skip:
                continue
            try:
                scenario()
            except Exception as exc:  # keep what the other scenarios measured
                run.log(f"{name} failed: {type(exc).__name__}: {exc}")
                run.results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
    finally:
        run.stop()
    text = render(run, command.strip(), started)
    write_results(text, Path(args.out), UPSTREAM_KINDS[args.upstream][0])
    if args.json:
        Path(args.json).write_text(json.dumps(run.results, indent=1, default=str))
    print(text)
    run.log(f"wrote {args.out}; logs in {run.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
