"""Where a gateway worker's time goes, sampled by py-spy under load.

What it is for: the profile ``make bench`` takes when a CPU or latency target
is missed. During one bounded wrk load at c=16 it samples two workers of the
same gateway at once: one into ``benchmarks/flamegraph.svg`` (the picture),
the other as collapsed stacks (``--format raw``), which :func:`analyse`
turns into tables: the share of samples by component, and by the gateway's
own source lines (each sample attributed to the deepest ``gateway/`` frame
on its stack, so a line's share includes everything it calls).

Not for: changing anything; the findings go into RESULTS.md.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT, log, track, wrk

_FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")
_NATIVE_RE = re.compile(r"^(?P<func>\S+) \((?P<lib>[^()]+)\)$")
#: CPython 3.11 waits for the GIL in take_gil → pthread_cond_timedwait; no
#: other wait in the interpreter uses a condition variable.
_GIL_WAIT = ("take_gil", "pthread_cond_timedwait")

#: The functions of gateway/proxy.py that decide which headers cross.
_HEADER_RULES = (
    "connection_tokens",
    "header_limit_error",
    "_is_utf8",
    "forwarding",
    "_trusted_last",
    "preserved_host",
    "upstream_request_headers",
    "response_headers",
    "drop_default_headers",
)

#: Components of the request path, first match wins (any frame of the stack,
#: as "file:function").
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("latency checks (gateway/timing.py, measure.py)", ("gateway/timing.py", "gateway/measure.py")),
    (
        "spans: start/end/attributes, context, encoding as they end (OTel SDK/API,"
        " gateway/spans.py)",
        (
            "opentelemetry/sdk/",
            "opentelemetry/trace/",
            "opentelemetry/context/",
            "gateway/spans.py",
            "latency_common/otlp_",
        ),
    ),
    ("trace context extract/inject (gateway/context.py)", ("gateway/context.py",)),
    # Matched on "file:function": Upstream.call and .relay are in proxy.py
    # too, but what they cost is aiohttp's client and server (and their
    # sends), which the next two categories count.
    ("header rules (gateway/proxy.py)", tuple(f"gateway/proxy.py:{f}" for f in _HEADER_RULES)),
    ("CORS (gateway/cors.py)", ("gateway/cors.py",)),
    ("upstream request (aiohttp client)", ("aiohttp/client", "aiohttp/connector")),
    (
        "HTTP server (aiohttp web, parser, writer)",
        ("aiohttp/web_", "aiohttp/http_", "aiohttp/base_protocol", "aiohttp/streams"),
    ),
    ("upstream exchange glue (gateway/proxy.py)", ("gateway/proxy.py",)),
    ("gateway/app.py itself", ("gateway/app.py",)),
]
EXPORT_THREAD = "span export thread (BatchSpanProcessor: encode + POST)"
GIL_WAIT = "event loop thread waiting to take the GIL back (after a call released it)"


def _category(files: list[str], gil_wait: bool) -> str:
    """``files``: each frame as "file:function", outermost first."""
    if any("threading.py:" in f for f in files):
        # Threads other than the event loop: the batch processor's worker
        # (encoding and posting spans while it holds the GIL) or another one.
        if any("_shared_internal" in f or "exporter/" in f for f in files):
            return EXPORT_THREAD
        return "other threads"
    if gil_wait:
        return GIL_WAIT
    for name, needles in CATEGORIES:
        if any(needle in f for f in files for needle in needles):
            return name
    return "other (event loop, asyncio, runtime)"


@dataclass
class Profile:
    samples: int = 0
    by_category: Counter[str] = field(default_factory=Counter)
    by_gateway_line: Counter[str] = field(default_factory=Counter)
    by_leaf: Counter[str] = field(default_factory=Counter)
    svg: Path | None = None
    pid: int = 0


#: This repository's top-level packages: a frame in one of them is ours.
_OWN_PACKAGES = ("gateway", "viewer", "backend", "latency_common", "benchmarks")
_STDLIB_RE = re.compile(r"/python3\.\d+/")


def _short(path: str) -> str:
    """A frame's file as a path in its package: ``site-packages/`` and the
    standard library's directory trimmed off, and a file of this repository
    relative to its root (``gateway/timing.py``), wherever the profiled
    checkout lives. py-spy's ``--full-filenames`` gives absolute paths, and
    the gateway under test may run from another worktree than this module
    (``/work/wt-x/gateway/app.py``): a file counts as ours when its tail from
    one of our package directories names a file of this repository."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    parts = path.split("/")
    for i, part in enumerate(parts[:-1]):
        if part in _OWN_PACKAGES:
            tail = "/".join(parts[i:])
            if (ROOT / tail).is_file():
                return tail
    stdlib = _STDLIB_RE.search(path)
    return path[stdlib.end() :] if stdlib else path


def analyse(raw: str) -> Profile:
    profile = Profile()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = []
        native_tail: list[str] = []  # C functions below the last Python frame (--native)
        for frame in stack.split(";"):
            match = _FRAME_RE.match(frame)
            if match and (match["file"].endswith(".py") or match["file"].startswith("<")):
                frames.append((match["func"], _short(match["file"]), int(match["line"])))
                native_tail = []
            elif match:  # C code with debug info: "func (file.c:line)"
                native_tail.append(match["func"])
            elif native := _NATIVE_RE.match(frame):
                native_tail.append(native["func"])
        if not frames:
            continue
        profile.samples += count
        gil_wait = any(name in _GIL_WAIT for name in native_tail)
        where = [f"{file}:{func}" for func, file, _ in frames]
        profile.by_category[_category(where, gil_wait)] += count
        for func, file, lineno in reversed(frames):
            # cli.py and __main__.py only start the loop: not the request's work.
            if file.startswith("gateway/") and file not in (
                "gateway/cli.py",
                "gateway/__main__.py",
            ):
                profile.by_gateway_line[f"{file}:{lineno} ({func})"] += count
                break
        func, file, lineno = frames[-1]
        resolved = [n for n in native_tail if not n.startswith("0x")]
        tail = " → GIL wait" if gil_wait else (f" → {resolved[-1]}" if resolved else "")
        profile.by_leaf[f"{func} ({file}:{lineno}){tail}"] += count
    return profile


def record(
    url: str,
    worker_pids: list[int],
    svg_path: Path,
    raw_path: Path,
    *,
    headers: dict[str, str],
    seconds: int = 10,
    py_spy: str = "py-spy",
) -> Profile:
    """Sample two workers for ``seconds`` during a c=16 load."""
    if len(worker_pids) < 2:
        worker_pids = worker_pids * 2
    load = threading.Thread(
        target=wrk,
        args=(url,),
        kwargs={"connections": 16, "duration_s": seconds + 3, "headers": headers},
        daemon=True,
    )
    load.start()
    threading.Event().wait(1.0)  # past the connection set-up
    # Blocking sampling (each sample pauses the worker for a moment) gives
    # consistent stacks; --native on the analysed worker shows the C calls
    # below each Python frame, GIL waits included.
    common = ["record", "-d", str(seconds), "-r", "200"]
    svg = subprocess.Popen(
        [py_spy, *common, "-o", str(svg_path), "--pid", str(worker_pids[0])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    track(svg)
    raw = subprocess.Popen(
        [
            py_spy,
            *common,
            "--format",
            "raw",
            "--native",
            "--full-filenames",
            "-o",
            str(raw_path),
            "--pid",
            str(worker_pids[1]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    track(raw)
    for proc in (svg, raw):
        try:
            _, err = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            log(f"py-spy failed ({proc.returncode}): {err[-500:]}")
    load.join(timeout=seconds + 40)
    profile = analyse(raw_path.read_text()) if raw_path.exists() else Profile()
    profile.svg = svg_path if svg_path.exists() else None
    profile.pid = worker_pids[1]
    return profile
