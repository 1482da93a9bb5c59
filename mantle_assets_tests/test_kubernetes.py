"""The Kubernetes code location: pod specs built by dagster-k8s's own code, no cluster needed."""

import pytest
from dagster._core.workspace.autodiscovery import loadable_targets_from_python_module
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from mantle_assets.kubernetes import defs

# cell_masks may run a Cellpose whole-cell model (method cellpose), so it is GPU-tagged whatever the method.
GPU_STEPS = {"segmentation_masks", "cell_masks", "trained_cellpose_model"}


def step_pod(op_tags) -> dict:
    """The pod spec dagster-k8s's step handler builds for a step with these tags."""
    job = construct_dagster_k8s_job(
        job_config=DagsterK8sJobConfig(
            job_image="registry.example.org/mantle-assets:latest",
            dagster_home="/opt/dagster/dagster_home",
            instance_config_map="dagster-instance",
        ),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        pod_name="dagster-step-test",
        component="step_worker",
        user_defined_k8s_config=get_user_defined_k8s_config(op_tags),
    )
    return job.to_dict()["spec"]["template"]["spec"]


def asset_steps():
    graph = defs.resolve_asset_graph()
    return {key.to_user_string(): graph.get(key).assets_def for key in graph.executable_asset_keys}


def test_the_kubernetes_location_runs_steps_with_the_k8s_job_executor():
    assert defs.resolve_job_def("segmentation_job").executor_def.name == "k8s"


@pytest.mark.parametrize("step", sorted(asset_steps()))
def test_only_gpu_steps_request_a_gpu(step):
    assets_def = asset_steps()[step]
    (container,) = step_pod(assets_def.op.tags)["containers"]
    limits = (container.get("resources") or {}).get("limits") or {}
    if step in GPU_STEPS:
        assert limits.get("nvidia.com/gpu") == "1"  # a Kubernetes quantity
    else:
        assert "nvidia.com/gpu" not in limits


@pytest.mark.parametrize("module", ["mantle_assets.kubernetes", "mantle_assets.celery", "mantle_assets.definitions"])
def test_each_code_location_module_holds_one_definitions_object(module):
    # How `dagster api grpc --module-name` (the Helm chart's code server) and `dagster dev -m` find the location.
    targets = loadable_targets_from_python_module(module, working_directory=None)
    assert [target.attribute for target in targets] == ["defs"]
