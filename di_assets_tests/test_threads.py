"""CPU threads sized to the CPUs the process may use, and idle OpenMP threads that sleep."""

import os
import subprocess
import sys

import pytest

from di_assets.ml.threads import cgroup_cpu_limit, cpu_budget, set_wait_policy, thread_count


def _cgroup(tmp_path, **files):
    for name, text in files.items():
        path = tmp_path / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, limit", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # a pod's `limits: {cpu: 1500m}`
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu__cpu.cfs_quota_us": "50000\n", "cpu__cpu.cfs_period_us": "100000\n"}, 0.5),  # cgroup v1
    ({"cpu__cpu.cfs_quota_us": "-1\n", "cpu__cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cgroup_cpu_limit_is_read_from_v2_and_v1_files(tmp_path, files, limit):
    assert cgroup_cpu_limit(_cgroup(tmp_path, **files)) == limit


def test_the_budget_is_the_affinity_capped_by_the_quota(tmp_path):
    cpus = len(os.sched_getaffinity(0))
    assert cpu_budget(_cgroup(tmp_path / "none")) == cpus
    assert cpu_budget(_cgroup(tmp_path / "half", **{"cpu.max": "50000 100000"})) == 1  # at least one
    assert cpu_budget(_cgroup(tmp_path / "big", **{"cpu.max": "6400000 100000"})) == cpus  # 64 CPUs: the mask wins


def test_a_setting_or_the_variable_overrides_the_budget(monkeypatch):
    monkeypatch.setenv("DI_ASSETS_THREADS", "3")
    assert thread_count() == 3 and thread_count(5) == 5
    monkeypatch.setenv("DI_ASSETS_THREADS", "many")
    with pytest.raises(ValueError, match="DI_ASSETS_THREADS must be a positive whole number of threads, got 'many'"):
        thread_count()


def _fresh(code: str, env: dict | None = None, affinity: set | None = None) -> str:
    """Run `code` in a fresh interpreter (torch not yet loaded), with this environment and CPUs."""
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DI_ASSETS_THREADS")}
    full.update(env or {})
    pre = f"import os; os.sched_setaffinity(0, {affinity!r}); " if affinity else ""
    out = subprocess.run([sys.executable, "-c", pre + code], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_process_pinned_to_one_cpu_runs_torch_on_one_thread():
    code = "import di_assets.ml.models, torch, os; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    assert _fresh(code, affinity={0}) == "1 PASSIVE"
    # a user's own choices win
    assert _fresh(code, env={"DI_ASSETS_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}, affinity={0}) == "2 ACTIVE"


def test_the_wait_policy_setting_applies_before_torch_and_is_reported_after(caplog):
    code = ("from di_assets.settings import Settings; from di_assets.defs import build_resources; "
            "build_resources(Settings.load(models={'family': 'tiny', 'omp_wait_policy': 'active'})); "
            "import os, torch; print(os.environ['OMP_WAIT_POLICY'])")
    assert _fresh(code) == "ACTIVE"
    import torch  # noqa: F401 - loaded in this process: too late to change the policy

    with caplog.at_level("WARNING", logger="di_assets"):
        set_wait_policy("active" if os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE" else "passive")
    assert "takes effect only before torch is imported" in caplog.text


def test_a_step_sizes_torch_threads_from_the_models_setting():
    import torch

    from di_assets.defs.resources import ModelResource

    before = torch.get_num_threads()
    try:
        with ModelResource(family="tiny", device="cpu", threads=1).leased_spec():
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value, expected", [(None, "(50000, 10, 10) frozen"), ("700,10,10", "(700, 10, 10) 0"),
                                             ("7", "DI_ASSETS_GC_THRESHOLD='7': give three integers")])
def test_a_process_that_loads_the_definitions_collects_garbage_less_often(value, expected):
    """Full collections walk every object of a process with torch and Dagster loaded (0.2-0.35 s each):
    the code location makes them rarer and freezes the objects it found loaded, once, in every process
    that loads it (a second build freezes nothing more); the variable sets the thresholds back and
    freezes nothing."""
    env = {k: v for k, v in os.environ.items() if k != "DI_ASSETS_GC_THRESHOLD"}
    if value is not None:
        env["DI_ASSETS_GC_THRESHOLD"] = value
    code = ("import gc, di_assets.definitions; from di_assets.defs import build_defs; from di_assets.settings "
            "import Settings; n = gc.get_freeze_count(); build_defs(Settings.load()); "
            "print(gc.get_threshold(), 'frozen' if n > 10_000 and gc.get_freeze_count() <= n else n)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert expected in (out.stdout if out.returncode == 0 else out.stderr), out.stderr[-2000:]
    assert (out.returncode == 0) == (value != "7")
