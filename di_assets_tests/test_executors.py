"""Executors and the Kubernetes GPU tags, read back by dagster-k8s's own parser."""

import json
from pathlib import Path

import dagster as dg
import pytest

from di_assets.defs.executors import (
    EXECUTOR_ENV, K8S_CONFIG_TAG, NODE_SELECTOR_ENV, TOLERATIONS_ENV, build_executor, gpu_tags,
)
from di_assets.defs.resources import ModelResource
from di_assets.ml.devices import LOCK_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent


def _gpu_asset(tags: dict):
    @dg.asset(pool="gpu", op_tags=tags)
    def gpu_step() -> None:
        pass

    return gpu_step


def _pod(tags: dict):
    """The Job that the k8s executor would launch for a step with these op tags."""
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    step_tags = _gpu_asset(tags).node_def.tags  # as Dagster stores them: the config as a JSON string
    assert isinstance(step_tags[K8S_CONFIG_TAG], str)
    user_config = get_user_defined_k8s_config(step_tags)
    job = construct_dagster_k8s_job(DagsterK8sJobConfig(job_image="di-assets:test"), ["dagster"],
                                    "dagster-step-x", user_defined_k8s_config=user_config)
    return job.spec.template.spec


def test_gpu_tags_parse_into_a_container_with_a_gpu_limit_and_tolerations(monkeypatch):
    monkeypatch.delenv(NODE_SELECTOR_ENV, raising=False)
    monkeypatch.delenv(TOLERATIONS_ENV, raising=False)
    pod = _pod(gpu_tags())
    (container,) = pod.containers
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.node_selector is None


def test_node_selector_tolerations_and_gpu_count_are_configurable(monkeypatch):
    monkeypatch.setenv(NODE_SELECTOR_ENV, json.dumps({"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}))
    monkeypatch.setenv(TOLERATIONS_ENV, json.dumps([{"key": "gpu", "operator": "Equal", "value": "yes",
                                                     "effect": "NoSchedule"}]))
    pod = _pod(gpu_tags())
    assert pod.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert [(t.key, t.value) for t in pod.tolerations] == [("gpu", "yes")]
    pod = _pod(gpu_tags(gpus=2, node_selector={"pool": "a100"}, tolerations=[]))  # arguments win over env
    assert pod.containers[0].resources.limits == {"nvidia.com/gpu": "2"}
    assert pod.node_selector == {"pool": "a100"} and not pod.tolerations


@pytest.mark.parametrize("var, value, message", [
    (NODE_SELECTOR_ENV, "pool=a100", "is not valid JSON"),
    (TOLERATIONS_ENV, '{"key": "gpu"}', "must be a JSON list"),
])
def test_bad_k8s_settings_fail_with_the_variable_named(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=rf"\${var} {message}"):
        gpu_tags()


@pytest.mark.parametrize("name, expected", [
    (None, "in_process"), ("in_process", "in_process"), ("multiprocess", "multiprocess"),
    ("k8s", "k8s"), ("K8S", "k8s"), ("in-process", "in_process"),
])
def test_build_executor_by_argument_or_env(monkeypatch, name, expected):
    monkeypatch.delenv(EXECUTOR_ENV, raising=False)
    assert build_executor(name).name == expected
    if name:
        monkeypatch.setenv(EXECUTOR_ENV, name)
        assert build_executor().name == expected


def test_unknown_executor_is_refused():
    with pytest.raises(ValueError, match="unknown executor 'slurm'.*in_process, multiprocess, k8s"):
        build_executor("slurm")


@pytest.mark.parametrize("run_config, max_concurrent", [({}, None), ({"max_concurrent": 2}, 2)])
def test_multiprocess_executor_spawns(run_config, max_concurrent):
    defs = dg.Definitions(assets=[_gpu_asset({})], executor=build_executor("multiprocess"))
    job = defs.resolve_implicit_global_asset_job_def()
    config = dg.validate_run_config(job, {"execution": {"config": run_config}})["execution"]["multiprocess"]
    assert config["start_method"] == {"spawn": {}} and config["max_concurrent"] == max_concurrent


# A real run: two GPU steps in spawned processes, each leasing one of two fake GPUs through
# the models resource, as the GPU assets do.
OUT_ENV = "DI_TEST_OUT"


def _leasing_step(name: str):
    @dg.asset(name=name, pool="gpu", op_tags=gpu_tags())
    def step(models: ModelResource) -> None:
        import os
        import time

        out = Path(os.environ[OUT_ENV])
        with models.leased_spec(timeout=60) as spec:
            (out / f"{name}.device").write_text(spec.device)
            # hold the device until the other step holds one too: they must run at once
            deadline = time.monotonic() + 30
            while len(list(out.glob("*.device"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)

    return step


def leasing_job():
    return dg.Definitions(
        assets=[_leasing_step("gpu_a"), _leasing_step("gpu_b")], jobs=[dg.define_asset_job("leasing")],
        resources={"models": ModelResource(devices=["cuda:0", "cuda:1"])}, executor=build_executor("multiprocess"),
    ).resolve_job_def("leasing")


def test_multiprocess_run_gives_each_concurrent_gpu_step_its_own_device(tmp_path, monkeypatch):
    monkeypatch.setenv(OUT_ENV, str(tmp_path))
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))  # the spawned steps inherit it
    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        result = dg.execute_job(dg.reconstructable(leasing_job), instance=instance)
        assert result.success
    assert sorted(f.read_text() for f in tmp_path.glob("*.device")) == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("name", ["in_process", "multiprocess", "k8s"])
def test_definitions_load_with_each_executor_and_gpu_tags(name):
    defs = dg.Definitions(assets=[_gpu_asset(gpu_tags())], executor=build_executor(name))
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.executor_def.name == name
    node = defs.resolve_assets_def("gpu_step").node_def
    assert node.pool == "gpu" and K8S_CONFIG_TAG in node.tags


def test_shipped_dagster_yaml_sets_the_gpu_pool_limit(tmp_path):
    """The instance that `dagster dev` makes when started in the project folder without DAGSTER_HOME."""
    from dagster._core.instance.config import PoolGranularity
    from dagster._core.instance.ref import InstanceRef

    ref = InstanceRef.from_dir(str(tmp_path), config_dir=str(ROOT))  # as dagster._cli.utils does
    with dg.DagsterInstance.from_ref(ref) as instance:
        pools = instance.get_concurrency_config().pool_config
    assert (pools.default_pool_limit, pools.pool_granularity) == (1, PoolGranularity.OP)
