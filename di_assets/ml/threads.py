"""CPU threads that fit the machine, and that are fair to other processes on it.

torch sizes its intra-op thread pool from the cores it sees, not from the CPUs the process may
use (its affinity mask, or a Kubernetes pod's CPU limit, which is a cgroup quota), and OpenMP's
idle threads spin for a while before they sleep. On a shared machine both hurt: beside one busy
process on this 2-core machine, a textual-inversion step of the tiny model took 4.9 s instead of
0.14 s. So the pool is sized to the CPUs the process may use, and idle threads sleep
(`OMP_WAIT_POLICY=PASSIVE`, which must be in the environment before torch loads OpenMP:
`di_assets/__init__.py` sets it as a default). Both can be overridden: `DI_ASSETS_THREADS` or the
setting `models.threads`, and `OMP_WAIT_POLICY` or `models.omp_wait_policy`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger("di_assets")

THREADS_ENV = "DI_ASSETS_THREADS"
WAIT_ENV = "OMP_WAIT_POLICY"
WAIT_POLICIES = ("passive", "active")
DEFAULT_WAIT_POLICY = "PASSIVE"


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (a pod's CPU limit), or None when unlimited.

    cgroup v2 (`cpu.max`: "<quota> <period>" or "max <period>"), else v1 (`cpu.cfs_quota_us`,
    `cpu.cfs_period_us`; quota -1 means none).
    """
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def cpu_budget(cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def thread_count(threads: int | None = None) -> int:
    """The intra-op threads to use: `threads` (a setting), else $DI_ASSETS_THREADS, else cpu_budget()."""
    if threads:
        return int(threads)
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive whole number of threads, got {env!r}")
        return int(env)
    return cpu_budget()


def apply_threads(threads: int | None = None) -> int:
    """Size torch's intra-op thread pool (see thread_count); returns the number set."""
    import torch

    n = thread_count(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def set_wait_policy(policy: str | None) -> None:
    """OpenMP's wait policy for this process (passive: idle threads sleep). Takes effect only before
    torch is imported; after, a different policy is reported, not applied."""
    if policy is None:
        return
    if policy.lower() not in WAIT_POLICIES:
        raise ValueError(f"omp_wait_policy must be one of {', '.join(WAIT_POLICIES)}, got {policy!r}")
    want = policy.upper()
    if "torch" in sys.modules:
        if os.environ.get(WAIT_ENV, "").upper() != want:
            log.warning("omp_wait_policy %s takes effect only before torch is imported; this process keeps %s",
                        policy, os.environ.get(WAIT_ENV, "OpenMP's default"))
        return
    os.environ[WAIT_ENV] = want
