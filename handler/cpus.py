"""The CPU a worker runs on: how many cores it may use (its CPU quota where a cgroup sets one, else
its affinity) and which instructions it has (the ISA that picks numerics and kernels).

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



def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the kernel lists them (empty where there is no /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_isa(flags: set[str] | None = None) -> dict[str, bool]:
    """The CPU features that decide the fast numerics and their kernels."""
    flags = cpu_flags() if flags is None else flags
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags and "amx_int8" in flags}


def isa_name(isa: dict[str, bool]) -> str:
    """The CPU's class for numerics: amx, avx512_bf16, vnni or avx2."""
    return "amx" if isa["amx"] else "avx512_bf16" if isa["avx512_bf16"] else "vnni" if isa["vnni"] else "avx2"


def cpu_has_vnni() -> bool:
    """VNNI (AVX512-VNNI, AVX-VNNI) or AMX: int8 dot products without int16 saturation."""
    isa = cpu_isa()
    return isa["vnni"] or isa["amx"]


# The CPU flags (as lscpu prints them) that decide int8 and bf16 speed; a machine line lists those present.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict:
    """The machine line every measured figure carries: CPU model, cores, ISA class and speed flags,
    torch and Python versions."""
    import platform

    import torch

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        cpu = "?"
    flags = cpu_flags()
    isa = cpu_isa(flags)
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": str(torch.__version__),
            "python": platform.python_version(), **isa, "isa": isa_name(isa),
            "flags": [f for f in SPEED_FLAGS if f in flags]}
