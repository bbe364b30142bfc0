"""The ``--workers`` default: the CPUs the cgroup quota and the affinity mask
allow, read from fake cgroup trees (the kernel's cgroup v2 ``cpu.max`` and
cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cpus
from gateway.config import GatewayConfig
from gateway.cpus import allowed_cpus, quota_cpus


def _v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def _v1(root: Path, quota: str, period: str, folder: str = "cpu") -> Path:
    (root / folder).mkdir(parents=True)
    (root / folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / folder / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "affinity", "expected"),
    [
        ("200000 100000", 64, 2),  # a 2-CPU container on a 64-core host
        ("150000 100000", 64, 2),  # 1.5 CPUs: rounded up
        ("50000 100000", 64, 1),  # half a CPU: still one worker
        ("100000 100000", 64, 1),
        ("800000 100000", 4, 4),  # quota above the pinned CPUs: the CPUs win
        ("max 100000", 8, 8),  # no quota
        ("garbage", 8, 8),  # unreadable: the cores, not a crash
        ("0 100000", 8, 8),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, affinity: int, expected: int) -> None:
    assert allowed_cpus(_v2(tmp_path, cpu_max), affinity=affinity) == expected


@pytest.mark.parametrize(
    ("quota", "period", "affinity", "expected"),
    [
        ("300000", "100000", 32, 3),
        ("250000", "100000", 32, 3),
        ("-1", "100000", 6, 6),  # -1: no quota
        ("abc", "100000", 6, 6),
    ],
)
def test_cgroup_v1_quota(
    tmp_path: Path, quota: str, period: str, affinity: int, expected: int
) -> None:
    assert allowed_cpus(_v1(tmp_path, quota, period), affinity=affinity) == expected


def test_cgroup_v1_combined_controller_folder(tmp_path: Path) -> None:
    root = _v1(tmp_path, "200000", "100000", folder="cpu,cpuacct")
    assert allowed_cpus(root, affinity=16) == 2


def test_no_cgroup_files_means_the_affinity_mask(tmp_path: Path) -> None:
    assert quota_cpus(tmp_path) is None
    assert allowed_cpus(tmp_path, affinity=3) == 3
    assert allowed_cpus(tmp_path / "missing", affinity=0) == 1  # never fewer than one


def test_v2_wins_over_leftover_v1_files(tmp_path: Path) -> None:
    root = _v1(tmp_path, "800000", "100000")
    _v2(root, "100000 100000")
    assert allowed_cpus(root, affinity=16) == 1


def test_the_config_default_follows_the_quota_not_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpus, "CGROUP_ROOT", _v2(tmp_path, "100000 100000"))
    assert GatewayConfig.from_env({}, environ={}).workers == 1
    # A flag or the variable still wins.
    assert GatewayConfig.from_env({}, environ={"GATEWAY_WORKERS": "3"}).workers == 3
