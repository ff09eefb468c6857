"""How many cores this process may use: its CPU quota where a cgroup sets one, else its affinity.

A container's ``--cpus 1`` (a Kubernetes CPU limit) is a CFS quota, not an affinity: on a 64-core
node ``os.sched_getaffinity`` still lists 64 cores, and a worker that starts a thread per core is
throttled most of every period. So the worker's thread count comes from the quota when there is
one: cgroup v2's ``cpu.max`` (``"QUOTA PERIOD"`` or ``"max PERIOD"``) or v1's
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none).
"""
from __future__ import annotations

import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_quota(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs' worth of time per period that this process's cgroup allows (1.5 for ``--cpus 1.5``),
    or None where no quota is set or none can be read."""
    limits = []
    for folder in _cgroup_folders(root, proc_cgroup):
        limit = _v2_limit(folder / "cpu.max")
        if limit is None:
            limit = _v1_limit(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def cpu_budget(root: Path = CGROUP, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """Whole cores this process may keep busy: the quota rounded down (at least 1), capped by the
    cores in its affinity."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_quota(root, proc_cgroup)
    return cores if quota is None else max(1, min(cores, int(quota)))


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[Path]:
    """Where this process's CPU controller files may be: the mount's top (what a container sees)
    and the process's own cgroup below it (what a host process sees), for v2 and for v1."""
    folders = [root, root / "cpu", root / "cpu,cpuacct"]
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if not rel:
            continue
        if controllers == "":  # v2: one unified hierarchy
            folders.append(root / rel)
        elif "cpu" in controllers.split(","):
            folders += [root / "cpu" / rel, root / "cpu,cpuacct" / rel]
    return folders


def _v2_limit(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(quota_path: Path, period_path: Path) -> float | None:
    try:
        quota, period = int(quota_path.read_text()), int(period_path.read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None
