"""Process plumbing for the benchmarks: process groups that always die,
CPU and memory from ``/proc``, and ``wrk`` runs parsed into numbers.

What it is for: the measuring instruments of ``run.py``. Every server the
bench starts is a :class:`Procs` member in a process group of its own, so
``Procs.stop_all`` (called from a ``finally``) kills it and everything it
forked, even when a step failed half-way.

Not for: deciding what to measure (``run.py``) or how to report it
(``report.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes -------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        """This process and every descendant (workers, gunicorn's children)."""
        return process_tree(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Procs:
    """Every process the bench started; each leads its own process group."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        out = log_path.open("ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches its children
        )
        out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 5.0) -> None:
        """SIGTERM to the group, then SIGKILL to the group and any stray
        descendant that left it."""
        stray = proc.tree()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in stray:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, grace_s=3.0)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, by walking /proc/<pid>/task/*/children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        if not Path(f"/proc/{current}").exists():
            continue
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def cpu_ticks(pids: Sequence[int], *, with_reaped: bool = False) -> dict[int, int]:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat, all threads) per
    pid; ``with_reaped`` adds cutime + cstime (16, 17: its reaped children)."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces: split after its ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = int(fields[11]) + int(fields[12])  # fields 14, 15 counted from 1
        if with_reaped:
            out[pid] += int(fields[13]) + int(fields[14])
    return out


def cpu_delta_s(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds spent between two snapshots (a pid born in between counts
    from zero, one that died in between is lost: the bench restarts none)."""
    ticks = sum(after[pid] - before.get(pid, 0) for pid in after)
    return ticks / CLOCK_TICKS_PER_S


def system_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores
    (/proc/stat: user nice system idle iowait irq softirq steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS_PER_S, (busy + idle + iowait) / CLOCK_TICKS_PER_S


def busy_fraction(seconds: float = 2.0) -> float:
    """Share of all cores busy over the next ``seconds``."""
    busy0, total0 = system_cpu_s()
    time.sleep(seconds)
    busy1, total1 = system_cpu_s()
    return (busy1 - busy0) / max(total1 - total0, 1e-9)


class ForeignCpu:
    """CPU the machine spent on processes that are not the bench's own over a
    section: the noise other work added to the measurements.

    The bench's own CPU is its process and every descendant (servers, wrk,
    Playwright's driver, Chromium and its renderers), polled every 0.5 s
    so that a process that ends, or is orphaned as Chromium's renderers are
    when the browser closes, still counts up to its last poll.
    """

    POLL_S = 0.5

    def __init__(self) -> None:
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.busy_s = self.wall_cores_s = self.ours_s = 0.0

    def _sample(self) -> None:
        for pid, ticks in cpu_ticks(process_tree(os.getpid())[1:]).items():
            self._first.setdefault(pid, ticks if not self._last else 0)
            self._last[pid] = ticks

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._sample()

    def __enter__(self) -> ForeignCpu:
        self._busy0, self._total0 = system_cpu_s()
        own = resource.getrusage(resource.RUSAGE_SELF)
        self._self0 = own.ru_utime + own.ru_stime
        self._sample()
        self._last[-1] = 0  # marks "started": later newcomers count from zero
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        busy, total = system_cpu_s()
        own = resource.getrusage(resource.RUSAGE_SELF)
        children_s = sum(
            last - self._first.get(pid, 0) for pid, last in self._last.items() if pid > 0
        )
        self.busy_s = busy - self._busy0
        self.wall_cores_s = total - self._total0
        self.ours_s = children_s / CLOCK_TICKS_PER_S + own.ru_utime + own.ru_stime - self._self0

    @property
    def foreign_share(self) -> float:
        """Foreign CPU as a share of all cores over the section (≥ 0)."""
        return max(self.busy_s - self.ours_s, 0.0) / max(self.wall_cores_s, 1e-9)


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            total += int(match.group(1)) if match else 0
    return total


# -- network ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, proc: Proc | None = None, timeout_s: float = 30.0) -> None:
    """Poll ``url`` until it answers (any status), with a deadline."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                response.read()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError as exc:
            last = exc
            time.sleep(0.1)
    tail = proc.tail() if proc is not None else ""
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s ({last})\n{tail}")


def http_get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()
        return response.status, {k.lower(): v for k, v in response.headers.items()}


# -- wrk ---------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if not match:
        raise ValueError(f"cannot read wrk latency {value!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not total:
        raise ValueError(f"wrk printed no totals:\n{text}")
    duration_s = _ms(total.group(2) + total.group(3)) / 1e3
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", text, re.M))
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors = sum(int(g) for g in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    requests = int(total.group(1))
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        rps=requests / duration_s if duration_s else 0.0,
        p50_ms=_ms(percentiles["50"]),
        p99_ms=_ms(percentiles["99"]),
        errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> WrkResult:
    """One bounded wrk run in its own process (1 thread at c=1, else 2)."""
    threads = 1 if connections < 2 else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, math.ceil(duration_s))}s",  # wrk takes whole seconds
        f"--timeout={timeout_s:g}s",
        "--latency",
    ]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _RUNNING.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=duration_s + timeout_s + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _RUNNING.discard(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr or stdout}")
    return parse_wrk(stdout)


#: Load generators and samplers in flight, killed by :func:`kill_running`
#: (the bench's ``finally``) should the run be cut short.
_RUNNING: set[subprocess.Popen[str]] = set()


def track(proc: subprocess.Popen[str]) -> None:
    _RUNNING.add(proc)


def kill_running() -> None:
    for proc in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        _RUNNING.discard(proc)


@dataclass
class LoadSample:
    """One wrk run against one case, with the proxy's CPU over the window."""

    case: str
    connections: int
    result: WrkResult
    cpu_s: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s * 1e6 / self.result.requests if self.result.requests else float("nan")


def measured_load(
    case: str,
    url: str,
    pids: Sequence[int],
    *,
    connections: int,
    duration_s: float,
    headers: Mapping[str, str] | None = None,
) -> LoadSample:
    before = cpu_ticks(pids)
    result = wrk(url, connections=connections, duration_s=duration_s, headers=headers)
    after = cpu_ticks(pids)
    return LoadSample(case, connections, result, cpu_delta_s(before, after))


def python() -> str:
    return sys.executable
