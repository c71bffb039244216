"""deploy/helm/values.yaml, read the way the Dagster Helm chart reads it: does each setting take effect?

No Helm and no network here: the chart's schema and default values are stored test data
(data/dagster-chart-1.13.27, see its SOURCE.md). The few chart templates that matter are followed
line by line below (each function names its template), and what they render goes through
Dagster's and dagster-k8s's own code: the instance's dagster.yaml through DagsterInstance, the run
launcher's config through K8sRunLauncher, and a GPU step's pod through the k8s executor's merge
(K8sContainerContext.create_for_run, then the step's tags) and construct_dagster_k8s_job.
"""

import copy
import json
import os
from functools import cache
from pathlib import Path
from unittest import mock

import dagster as dg
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from di_assets.defs.executors import K8S_CONFIG_TAG, NODE_SELECTOR_ENV, gpu_tags

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "deploy" / "helm" / "values.yaml"
CHART = Path(__file__).resolve().parent / "data" / "dagster-chart-1.13.27"
RELEASE = NAMESPACE = "dagster"  # as in the README: helm upgrade --install dagster ... -n dagster
FULLNAME = RELEASE  # dagster.fullname: the release name already contains the chart's name
SUBCHART_FULLNAME = f"{RELEASE}-dagster-user-deployments"
IMAGE = "registry.example.com/di-assets:0.1.0"


def load_values() -> dict:
    return yaml.safe_load(VALUES.read_text())


# --- Helm: the chart's defaults, the values over them, and the schema ------------------------


@cache
def chart_defaults() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def helm_merge(defaults: dict, overrides: dict) -> dict:
    """Helm's coalescing of a values file over a chart's defaults: maps merge key by key, a null
    removes the key, anything else (lists too) replaces the default."""
    out = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _remote_refs(node) -> set[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        found = {ref} if isinstance(ref, str) and not ref.startswith("#") else set()
        return found.union(*(_remote_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_remote_refs(v) for v in node))
    return set()


@cache
def chart_validator():
    schema = json.loads((CHART / "values.schema.json").read_text())
    # The chart's Kubernetes objects ($ref to an online copy of Kubernetes' schema) become open
    # objects, offline; everything the chart itself defines is checked as written.
    stubs: dict = {}
    for ref in _remote_refs(schema):
        uri, _, pointer = ref.partition("#")
        node = stubs.setdefault(uri, {})
        for part in filter(None, pointer.split("/")):
            node = node.setdefault(part, {})
    registry = Registry().with_resources(
        (uri, Resource.from_contents(doc, default_specification=DRAFT202012)) for uri, doc in stubs.items()
    )
    return jsonschema.validators.validator_for(schema)(schema, registry=registry)


def schema_errors(merged: dict) -> list[str]:
    errors = chart_validator().iter_errors(merged)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# --- The instance's dagster.yaml (templates/configmap-instance.yaml) ---------------------------


def _concurrency(v: dict) -> dict:
    """templates/helpers/instance/_concurrency.tpl, under `{{- if .Values.concurrency.enabled }}`."""
    pools, runs = v["concurrency"]["pools"], v["concurrency"]["runs"]
    rc = v["dagsterDaemon"]["runCoordinator"]
    if rc["enabled"] and rc["type"] == "QueuedRunCoordinator":  # the template's `fail`s
        qrc = rc["config"]["queuedRunCoordinator"]
        if runs.get("maxConcurrentRuns") is not None and qrc.get("maxConcurrentRuns") is not None:
            raise ValueError("Cannot set both concurrency.runs.maxConcurrentRuns and ...maxConcurrentRuns")
        if runs.get("tagConcurrencyLimits") and qrc.get("tagConcurrencyLimits"):
            raise ValueError("Cannot set both concurrency.runs.tagConcurrencyLimits and ...tagConcurrencyLimits")
        block = qrc.get("blockOpConcurrencyLimitedRuns") or {}
        if pools.get("opGranularityRunBuffer") is not None and block.get("opConcurrencySlotBuffer") is not None:
            raise ValueError("Cannot set both concurrency.pools.opGranularityRunBuffer and ...opConcurrencySlotBuffer")
    out = {}
    rendered_pools = {}
    if pools.get("defaultLimit") is not None:  # `not (kindIs "invalid" ...)`: 0 counts
        rendered_pools["default_limit"] = pools["defaultLimit"]
    if pools.get("granularity"):
        rendered_pools["granularity"] = pools["granularity"]
    if pools.get("opGranularityRunBuffer") is not None:
        rendered_pools["op_granularity_run_buffer"] = pools["opGranularityRunBuffer"]
    if rendered_pools:
        out["pools"] = rendered_pools
    rendered_runs = {}
    if runs.get("maxConcurrentRuns") is not None:
        rendered_runs["max_concurrent_runs"] = runs["maxConcurrentRuns"]
    if runs.get("tagConcurrencyLimits"):
        rendered_runs["tag_concurrency_limits"] = runs["tagConcurrencyLimits"]
    if rendered_runs:
        out["runs"] = rendered_runs
    return out


def _queued_run_coordinator(v: dict) -> dict:
    """templates/helpers/instance/_run-coordinator.tpl (dagsterYaml.runCoordinator.queued), in its
    form that leaves out what `concurrency` sets when concurrency is enabled (dagster-io/dagster#33225)."""
    qrc = v["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    on = v["concurrency"]["enabled"]
    # The chart writes `module: dagster.core.run_coordinator`; the installed Dagster has the class here.
    out = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    if not any(qrc.values()):  # `if not (empty (compact (values $queuedRunCoordinatorConfig)))`
        return out
    config = {}
    if not on or qrc.get("maxConcurrentRuns") is not None:
        config["max_concurrent_runs"] = -1 if qrc.get("maxConcurrentRuns") is None else qrc["maxConcurrentRuns"]
    if qrc.get("tagConcurrencyLimits"):
        config["tag_concurrency_limits"] = qrc["tagConcurrencyLimits"]
    for key, name in (("dequeueIntervalSeconds", "dequeue_interval_seconds"),
                      ("dequeueUseThreads", "dequeue_use_threads"), ("dequeueNumWorkers", "dequeue_num_workers")):
        if qrc.get(key):
            config[name] = qrc[key]
    if qrc.get("blockOpConcurrencyLimitedRuns"):
        block = qrc["blockOpConcurrencyLimitedRuns"]
        config["block_op_concurrency_limited_runs"] = {"enabled": block["enabled"],
                                                       "op_concurrency_slot_buffer": block["opConcurrencySlotBuffer"]}
    out["config"] = config
    return out


def instance_sections(v: dict) -> dict:
    """The sections of configmap-instance.yaml's dagster.yaml that decide pool limits."""
    out = {}
    daemon = v["dagsterDaemon"]
    rc = daemon["runCoordinator"]
    if daemon["enabled"] and rc["enabled"] and rc["type"] == "QueuedRunCoordinator":
        out["run_coordinator"] = _queued_run_coordinator(v)
    if v["concurrency"]["enabled"]:  # `{{- if .Values.concurrency.enabled }}`
        out["concurrency"] = _concurrency(v)
    return out


_POOL_CONFIGS: dict = {}  # by rendered dagster.yaml: a new instance costs seconds (its SQLite storage)


def pool_config(v: dict, home: Path):
    """The pool settings that a Dagster instance with these sections uses (it validates them)."""
    from dagster._core.instance.ref import InstanceRef

    text = yaml.safe_dump(instance_sections(v))
    if text not in _POOL_CONFIGS:
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(text)
        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            _POOL_CONFIGS[text] = instance.get_concurrency_config().pool_config
    return _POOL_CONFIGS[text]


# --- Run and step pods ----------------------------------------------------------------------


def code_location_container_context(v: dict, deployment: dict) -> dict | None:
    """What a code server hands to the runs it launches (DAGSTER_CLI_API_GRPC_CONTAINER_CONTEXT):
    charts/dagster-user-deployments/templates/deployment-user.yaml and its helper
    dagsterUserDeployments.k8sContainerContext (templates/helpers/_helpers.tpl)."""
    include = deployment.get("includeConfigInLaunchedRuns") or {"enabled": True}  # `| default (dict "enabled" true)`
    if not include.get("enabled"):
        return None
    sub = v["dagster-user-deployments"]
    k8s = {"image_pull_policy": deployment["image"]["pullPolicy"]}
    if sub.get("imagePullSecrets"):
        k8s["image_pull_secrets"] = sub["imagePullSecrets"]
    k8s["env_config_maps"] = [f"{SUBCHART_FULLNAME}-{deployment['name']}-user-env"] + [
        c["name"] for c in deployment.get("envConfigMaps") or [] if "name" in c]
    if deployment.get("envSecrets"):
        k8s["env_secrets"] = [s["name"] for s in deployment["envSecrets"] if "name" in s]
    for key, name in (("volumeMounts", "volume_mounts"), ("volumes", "volumes"), ("labels", "labels"),
                      ("resources", "resources"), ("schedulerName", "scheduler_name")):
        if deployment.get(key):
            k8s[name] = deployment[key]  # `{{- if .resources }} resources: ...`: all of it, limits too
    k8s["namespace"] = NAMESPACE
    k8s["service_account_name"] = (v["global"]["serviceAccountName"] or sub.get("serviceAccount", {}).get("name")
                                   or f"{SUBCHART_FULLNAME}-user-deployments")
    if isinstance(deployment.get("env"), list) and deployment["env"]:
        k8s["env"] = deployment["env"]
    pod_spec = {name: deployment[key] for key, name in (("sidecarContainers", "containers"),
                                                         ("initContainers", "init_containers")) if deployment.get(key)}
    if pod_spec:
        k8s["run_k8s_config"] = {"pod_spec_config": pod_spec}
    return {"k8s": k8s}


def run_launcher_config(v: dict) -> dict:
    """templates/helpers/instance/_run-launcher.tpl (dagsterYaml.runLauncher.k8s): the K8sRunLauncher's config."""
    c = v["runLauncher"]["config"]["k8sRunLauncher"]
    out = {"load_incluster_config": c["loadInclusterConfig"], "job_namespace": c.get("jobNamespace") or NAMESPACE,
           "image_pull_policy": c["imagePullPolicy"],
           "service_account_name": v["global"]["serviceAccountName"] or v["serviceAccount"]["name"] or FULLNAME,
           "dagster_home": v["global"]["dagsterHome"], "instance_config_map": f"{FULLNAME}-instance",
           "postgres_password_secret": v["global"]["postgresqlSecretName"]}
    if c.get("kubeconfigFile"):
        out["kubeconfig_file"] = c["kubeconfigFile"]
    if v.get("imagePullSecrets"):
        out["image_pull_secrets"] = v["imagePullSecrets"]
    if c.get("envConfigMaps"):
        out["env_config_maps"] = [m["name"] for m in c["envConfigMaps"] if "name" in m]
    if c.get("envSecrets"):
        out["env_secrets"] = [s["name"] for s in c["envSecrets"] if "name" in s]
    for key, name in (("envVars", "env_vars"), ("volumeMounts", "volume_mounts"), ("volumes", "volumes"),
                      ("labels", "labels"), ("resources", "resources"), ("schedulerName", "scheduler_name"),
                      ("securityContext", "security_context")):
        if c.get(key):
            out[name] = c[key]
    if c.get("failPodOnRunFailure"):
        out["fail_pod_on_run_failure"] = True
    raw = c.get("runK8sConfig") or {}
    run_k8s = {name: raw[key] for key, name in (
        ("containerConfig", "container_config"), ("podSpecConfig", "pod_spec_config"),
        ("podTemplateSpecMetadata", "pod_template_spec_metadata"), ("jobSpecConfig", "job_spec_config"),
        ("jobMetadata", "job_metadata")) if raw.get(key)}
    if run_k8s:
        out["run_k8s_config"] = run_k8s
    return out


def the_deployment(v: dict) -> dict:
    (deployment,) = [d for d in v["dagster-user-deployments"]["deployments"] if d["name"] == "di-assets"]
    return deployment


def _gpu_step_tags(env: dict) -> dict:
    """The op tags of a GPU step as the code server computes them (from its env), as Dagster stores them."""
    with mock.patch.dict(os.environ, env):
        tags = gpu_tags()

    @dg.asset(pool="gpu", op_tags=tags)
    def gpu_step() -> None:
        pass

    return gpu_step.node_def.tags


def launched_pod(v: dict, step: bool = True):
    """The pod spec of a GPU step's Job (or, step=False, of the run's Job), built as dagster-k8s does."""
    from dagster._config import process_config
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._core.storage.dagster_run import DagsterRun
    from dagster_k8s import K8sRunLauncher
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import construct_dagster_k8s_job, get_user_defined_k8s_config

    config = process_config(K8sRunLauncher.config_type(), run_launcher_config(v))
    assert config.success, config.errors  # the rendered config is one that K8sRunLauncher accepts
    with mock.patch("dagster_k8s.launcher.load_kubernetes_config"):  # no cluster here
        launcher = K8sRunLauncher.from_config_value(None, config.value)
    deployment = the_deployment(v)
    origin = JobPythonOrigin("__ASSET_JOB", RepositoryPythonOrigin(
        executable_path="python", code_pointer=ModuleCodePointer("di_assets.definitions", "defs", None),
        container_image=IMAGE, container_context=code_location_container_context(v, deployment)))
    run = DagsterRun(job_name="__ASSET_JOB", job_code_origin=origin)
    # K8sStepHandler._get_container_context: the run's context (run launcher, then code location),
    # then the executor's own config (none here), then the step's `dagster-k8s/config` tags.
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=not step)
    if step:
        env = {e["name"]: e["value"] for e in deployment.get("env") or []}
        step_config = get_user_defined_k8s_config(_gpu_step_tags(env))
        context = context.merge(K8sContainerContext(run_k8s_config=step_config))
    job = construct_dagster_k8s_job(context.get_k8s_job_config(IMAGE, launcher), ["dagster", "api"],
                                    "dagster-step-x" if step else "dagster-run-x",
                                    user_defined_k8s_config=context.run_k8s_config)
    return job.spec.template.spec


# --- The check --------------------------------------------------------------------------------


def problems(values: dict, home: Path) -> list[str]:
    """What would keep these values from doing what they say on a cluster; [] when nothing."""
    v = helm_merge(chart_defaults(), values)
    found = [f"schema: {e}" for e in schema_errors(v)]
    if found:
        return found
    said = (values.get("concurrency") or {}).get("pools") or {}
    if not v["concurrency"]["enabled"]:
        found.append("concurrency.enabled is not true: the chart renders no concurrency block, "
                     "so the pool limit never reaches the instance")
    else:
        pools = pool_config(v, home)
        if pools.default_pool_limit != said.get("defaultLimit"):
            found.append(f"pool limit is {pools.default_pool_limit}, values say {said.get('defaultLimit')}")
        granularity = pools.pool_granularity.value if pools.pool_granularity else None
        if granularity != said.get("granularity"):
            found.append(f"pool granularity is {granularity}, values say {said.get('granularity')}")
    (container,) = launched_pod(v).containers
    limits = (container.resources and container.resources.limits) or {}
    env = {e["name"]: e["value"] for e in the_deployment(v).get("env") or []}
    asked = json.loads(_gpu_step_tags(env)[K8S_CONFIG_TAG])["container_config"]["resources"]["limits"]
    if limits.get("nvidia.com/gpu") != asked["nvidia.com/gpu"]:
        found.append(f"GPU step pod gets nvidia.com/gpu {limits.get('nvidia.com/gpu')}, "
                     f"its tags ask for {asked['nvidia.com/gpu']}")
    code_server = (the_deployment(v).get("resources") or {}).get("limits") or {}
    for name in sorted(set(limits) - set(asked)):  # e.g. the code server's memory limit: a cap
        same = " (the code server's limit)" if code_server.get(name) == limits[name] else ""
        found.append(f"GPU step pod gets a {name} limit it did not ask for: {limits[name]}{same}")
    return found


# --- Tests -------------------------------------------------------------------------------------


def test_stored_chart_data_is_whole_and_its_defaults_validate():
    """The stored schema checks what it should: the chart's own defaults pass, a wrong key fails."""
    assert "1.13.27" in (CHART / "SOURCE.md").read_text() and "Apache-2.0" in (CHART / "SOURCE.md").read_text()
    defaults = chart_defaults()
    assert schema_errors(defaults) == []
    assert defaults["concurrency"]["enabled"] is False  # the chart's default: no concurrency block
    assert schema_errors(helm_merge(defaults, {"concurrency": {"pool": {"defaultLimit": 8}}}))  # misspelt: refused
    assert schema_errors(helm_merge(defaults, {"concurrency": {"enabled": "yes"}}))


def test_values_validate_against_the_chart_schema():
    assert schema_errors(helm_merge(chart_defaults(), load_values())) == []


def test_the_instance_gets_the_pool_limit_and_granularity_the_values_set(tmp_path):
    from dagster._core.instance.config import PoolGranularity

    values = load_values()
    v = helm_merge(chart_defaults(), values)
    sections = instance_sections(v)
    said = values["concurrency"]["pools"]
    assert sections["concurrency"] == {"pools": {"default_limit": said["defaultLimit"],
                                                 "granularity": said["granularity"]}}
    assert "max_concurrent_runs" not in sections["run_coordinator"].get("config", {})  # would clash with `concurrency`
    pools = pool_config(v, tmp_path / "home")  # loaded and validated by Dagster itself
    assert pools.default_pool_limit == said["defaultLimit"]
    assert pools.pool_granularity == PoolGranularity(said["granularity"])
    assert isinstance(said["defaultLimit"], int) and said["defaultLimit"] >= 1  # a limit, not "no GPU step ever"


def test_a_gpu_step_pod_gets_its_gpu_and_no_code_server_memory_cap():
    v = helm_merge(chart_defaults(), load_values())
    deployment = the_deployment(v)
    assert deployment["resources"]["limits"] == {"memory": "2Gi"}  # the code server keeps its own limit
    assert code_location_container_context(v, deployment) is None  # ... and hands it to no launched pod
    pod = launched_pod(v)
    (container,) = pod.containers
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert not container.resources.requests or "memory" not in container.resources.requests
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert pod.node_selector == json.loads(env[NODE_SELECTOR_ENV])
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    run_pod = launched_pod(v, step=False)  # the run's own pod: no GPU, no cap either
    assert not (run_pod.containers[0].resources and run_pod.containers[0].resources.limits)


@pytest.mark.parametrize("step", [True, False], ids=["step pod", "run pod"])
def test_run_and_step_pods_keep_the_deployments_env_volumes_and_pull_policy(step):
    v = helm_merge(chart_defaults(), load_values())
    deployment = the_deployment(v)
    pod = launched_pod(v, step=step)
    (container,) = pod.containers
    env = {e.name: e.value for e in container.env}
    wanted = {e["name"]: e["value"] for e in deployment["env"]}  # DI_ASSETS_EXECUTOR=k8s, the settings file, ...
    assert {name: env.get(name) for name in wanted} == wanted
    assert {(m.name, m.mount_path) for m in container.volume_mounts} >= {
        (m["name"], m["mountPath"]) for m in deployment["volumeMounts"]}
    claims = {vol.name: vol.persistent_volume_claim.claim_name for vol in pod.volumes if vol.persistent_volume_claim}
    assert claims == {"di-data": "di-data"}
    assert {vol.name: vol.config_map.name for vol in pod.volumes if vol.config_map}["di-config"] == "di-assets-config"
    assert container.image == IMAGE and container.image_pull_policy == deployment["image"]["pullPolicy"]


def test_the_check_passes_on_these_values(tmp_path):
    assert problems(load_values(), tmp_path / "home") == []


def _old_values() -> dict:
    """The values as they were: no concurrency.enabled, the deployment's config in launched runs."""
    values = load_values()
    del values["concurrency"]["enabled"]
    the_deployment(values)["includeConfigInLaunchedRuns"] = {"enabled": True}
    del values["runLauncher"]["config"]
    return values


def _without_concurrency_enabled() -> dict:
    values = load_values()
    del values["concurrency"]["enabled"]
    return values


def _with_config_in_launched_runs() -> dict:
    values = load_values()
    the_deployment(values)["includeConfigInLaunchedRuns"] = {"enabled": True}
    return values


def _with_run_launcher_resources() -> dict:
    values = load_values()
    values["runLauncher"]["config"]["k8sRunLauncher"]["resources"] = {"limits": {"memory": "4Gi"}}
    return values


CAPPED = "memory limit it did not ask for: 2Gi (the code server's limit)"


@pytest.mark.parametrize("make, expected", [
    (_old_values, ["concurrency.enabled is not true", CAPPED]),
    (_without_concurrency_enabled, ["concurrency.enabled is not true"]),
    (_with_config_in_launched_runs, [CAPPED]),
    (_with_run_launcher_resources, ["memory limit it did not ask for: 4Gi"]),
], ids=["old values", "no concurrency.enabled", "includeConfigInLaunchedRuns on", "run launcher resources"])
def test_the_check_reports_values_that_would_not_take_effect(make, expected, tmp_path):
    found = problems(make(), tmp_path / "home")
    assert len(found) == len(expected), found
    for problem, text in zip(found, expected):
        assert text in problem


def test_the_charts_postgres_is_reached_through_psycopg2_the_driver_the_image_installs():
    """SQLAlchemy 2.1 reads a bare `postgresql://` as psycopg 3, which dagster-postgres does not install."""
    import sqlalchemy

    scheme = helm_merge(chart_defaults(), load_values())["postgresql"]["postgresqlScheme"]
    assert scheme == "postgresql+psycopg2"
    dialect = sqlalchemy.engine.make_url(f"{scheme}://u:p@localhost/db").get_dialect()
    assert dialect.driver == "psycopg2" and dialect.import_dbapi().__name__ == "psycopg2"
