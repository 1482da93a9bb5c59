"""The code location for a Kubernetes deployment: every step runs in its own pod.

The same assets, jobs, sensors and schedules as :mod:`mantle_assets.definitions`,
run by dagster-k8s's ``k8s_job_executor``. A step's pod takes its resources from
the step's ``dagster-k8s/config`` tag: the GPU steps (segmentation, training)
request ``nvidia.com/gpu: 1``, the others none. ``deploy/kubernetes/`` holds the
Helm values and the image; the README explains the deployment.
"""

from dagster._record import replace
from dagster_k8s import k8s_job_executor

from mantle_assets import definitions

# Definitions.merge refuses two executors: the local location's is replaced. The module holds no other
# Definitions object, since the code server (`--module-name mantle_assets.kubernetes`) refuses two.
defs = replace(definitions.defs, executor=k8s_job_executor)
