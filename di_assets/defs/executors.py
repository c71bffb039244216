"""Where steps run: in this process, in spawned processes on one machine, or in Kubernetes pods.

- `in_process` (default): one process runs every step, so models load once per run.
- `multiprocess`: one spawned process per step (fork would break CUDA). Each GPU step leases
  a GPU of its own (`ModelResource.leased_spec`); the `gpu` pool caps how many run at once.
- `k8s`: one Kubernetes Job per step through dagster-k8s; GPU steps request `nvidia.com/gpu`
  through the tags of `gpu_tags()`.

Chosen by argument or $DI_ASSETS_EXECUTOR. No torch import here.
"""

from __future__ import annotations

import json
import os

import dagster as dg

EXECUTOR_ENV = "DI_ASSETS_EXECUTOR"
EXECUTORS = ("in_process", "multiprocess", "k8s")

K8S_CONFIG_TAG = "dagster-k8s/config"
GPUS_ENV = "DI_ASSETS_K8S_GPUS"  # GPUs per GPU step, default 1
NODE_SELECTOR_ENV = "DI_ASSETS_K8S_NODE_SELECTOR"  # JSON object, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}
TOLERATIONS_ENV = "DI_ASSETS_K8S_TOLERATIONS"  # JSON list of Kubernetes tolerations
# GPU node pools are usually tainted so that only GPU work lands there (GKE and AKS do this).
DEFAULT_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def build_executor(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor named by `name`, else by $DI_ASSETS_EXECUTOR, else in_process."""
    name = (name or os.environ.get(EXECUTOR_ENV) or "in_process").strip().lower().replace("-", "_")
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        # spawn, never fork: a forked child cannot use CUDA once the parent has touched it.
        return dg.multiprocess_executor.configured(
            lambda cfg: {"start_method": {"spawn": {}}, "max_concurrent": cfg.get("max_concurrent")},
            name="multiprocess",
            config_schema={"max_concurrent": dg.Field(dg.Noneable(int), default_value=None,
                                                      description="Processes at once (default: CPU count)")},
        )
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError:
            raise ImportError("the k8s executor needs dagster-k8s: pip install 'di-assets[k8s]'") from None
        return k8s_job_executor
    raise ValueError(f"unknown executor {name!r} (from argument or ${EXECUTOR_ENV}); choose one of {', '.join(EXECUTORS)}")


def _env_json(var: str, default, kind: type):
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"${var} is not valid JSON ({exc.msg}): {raw!r}") from None
    if not isinstance(value, kind):
        raise ValueError(f"${var} must be a JSON {kind.__name__}, got {raw!r}")
    return value


def gpu_tags(gpus: int | None = None, node_selector: dict | None = None, tolerations: list | None = None) -> dict:
    """Op tags that make dagster-k8s run a step in a pod with `gpus` GPUs, on GPU nodes.

    Unset arguments come from $DI_ASSETS_K8S_GPUS (default 1), $DI_ASSETS_K8S_NODE_SELECTOR
    (JSON, default none) and $DI_ASSETS_K8S_TOLERATIONS (JSON, default: tolerate the
    `nvidia.com/gpu` taint). Other executors ignore these tags.
    """
    gpus = gpus if gpus is not None else int(os.environ.get(GPUS_ENV) or 1)
    if gpus < 1:
        raise ValueError(f"a GPU step needs at least 1 GPU, got {gpus} (argument or ${GPUS_ENV})")
    node_selector = node_selector if node_selector is not None else _env_json(NODE_SELECTOR_ENV, {}, dict)
    tolerations = tolerations if tolerations is not None else _env_json(TOLERATIONS_ENV, DEFAULT_TOLERATIONS, list)
    pod_spec = {"tolerations": tolerations}
    if node_selector:
        pod_spec["node_selector"] = node_selector
    return {K8S_CONFIG_TAG: {
        # Extended resources such as GPUs are requested through limits alone (requests default to them).
        "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}},
        "pod_spec_config": pod_spec,
    }}
