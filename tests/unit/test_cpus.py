"""The CPU budget a worker sizes its threads by: cgroup quota (v1 or v2) over affinity."""
import os

import pytest

from handler.cpus import cpu_budget, cpu_quota


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def proc_cgroup(tmp_path):
    p = tmp_path / "proc_cgroup"
    p.write_text("0::/\n")
    return p


def test_v2_quota_as_a_container_sees_it(tmp_path, proc_cgroup):
    write(tmp_path / "cg" / "cpu.max", "150000 100000\n")
    assert cpu_quota(tmp_path / "cg", proc_cgroup) == 1.5
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    assert cpu_quota(tmp_path / "cg", proc_cgroup) is None


def test_v1_quota_as_podman_sets_it(tmp_path, proc_cgroup):  # podman --cpus 1 (NOTES.md, Containers)
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", "100000\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path / "cg", proc_cgroup) == 1.0
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota(tmp_path / "cg", proc_cgroup) is None


def test_a_host_process_reads_its_own_cgroup_below_the_mount(tmp_path):
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/x\n1:cpu,cpuacct:/kubepods/pod1\n0::/system.slice/app.service\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "kubepods" / "pod1" / "cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "cg" / "cpu,cpuacct" / "kubepods" / "pod1" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path / "cg", proc) == 2.0
    write(tmp_path / "cg" / "system.slice" / "app.service" / "cpu.max", "50000 100000\n")
    assert cpu_quota(tmp_path / "cg", proc) == 0.5  # the tighter of the two


def test_budget_rounds_the_quota_down_caps_it_by_the_affinity_and_never_says_zero(tmp_path, proc_cgroup,
                                                                                   monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    root = tmp_path / "cg"
    assert cpu_budget(root, proc_cgroup) == 64  # nothing to read: the affinity
    write(root / "cpu.max", "250000 100000\n")
    assert cpu_budget(root, proc_cgroup) == 2
    write(root / "cpu.max", "50000 100000\n")
    assert cpu_budget(root, proc_cgroup) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    write(root / "cpu.max", "400000 100000\n")
    assert cpu_budget(root, proc_cgroup) == 1


def test_garbage_in_the_files_reads_as_no_quota(tmp_path, proc_cgroup):
    write(tmp_path / "cg" / "cpu.max", "lots\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", "x")
    assert cpu_quota(tmp_path / "cg", proc_cgroup) is None
