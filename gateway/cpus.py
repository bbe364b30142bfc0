"""How many CPUs this process may really use: the default for ``--workers``.

What it is for: a container limited to 2 CPUs on a 64-core host sees 64 in
``os.cpu_count()``; 64 workers there would each get a sliver of the quota and
be throttled in turn, with 64 tracers, exporters and connection pools. The
limit comes from the cgroup CPU quota (v2 ``cpu.max``, ``"QUOTA PERIOD"`` or
``"max PERIOD"``; v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, ``-1`` for
none, see the kernel's Documentation/admin-guide/cgroup-v2.rst "cpu" and
Documentation/scheduler/sched-bwc.rst) and from the CPUs the process is
pinned to (``os.sched_getaffinity``, ``taskset``/cpuset), whichever is lower.
A quota of 1.5 CPUs is 2 workers (rounded up: the quota is spread over time,
not cores), and never fewer than 1.

Not for: reading the cgroup of another process, or anything at request time
(it runs once, when the configuration is built).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Where cgroup v1 mounts the cpu controller, by distribution.
_V1_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def quota_cpus(cgroup_root: Path | None = None) -> float | None:
    """The CPU quota as a number of CPUs, or None when there is none (or the
    files are missing or unreadable: then nothing limits us but the cores).
    ``cgroup_root`` defaults to :data:`CGROUP_ROOT`."""
    cgroup_root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    v2 = _read(cgroup_root / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            return _ratio(parts[0], parts[1])
        return None
    for name in _V1_DIRS:
        quota = _read(cgroup_root / name / "cpu.cfs_quota_us")
        period = _read(cgroup_root / name / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)  # -1: no quota
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def affinity_cpus() -> int:
    """The CPUs the scheduler may run this process on (all cores when the
    platform cannot say)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def allowed_cpus(cgroup_root: Path | None = None, affinity: int | None = None) -> int:
    """ceil(quota / period) when a quota is set, capped by the affinity mask;
    at least 1."""
    cpus = affinity if affinity is not None else affinity_cpus()
    quota = quota_cpus(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)
