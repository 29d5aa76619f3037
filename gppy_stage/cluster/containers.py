"""One stage's pod in the night workflow (cluster/workflow.py builds the DAG around them): the
container's command line from the graph, image, resources and GPU pool, environment, mounts,
security context, retries of the retriable exit code, and the semaphores."""

from __future__ import annotations

from hera.workflows import Container, Parameter
from hera.workflows import models as m

from .. import errors, graph
from .submission import SEM_GPU, SEMAPHORE_CONFIGMAP

# the image ships config/ here (GPPY_CONFIG); the cluster's pipeline.yaml (ConfigMap gppy-config,
# from k8s/config/pipeline.yaml) is mounted over the image's copy so settings change without a rebuild
CONFIG_DIR = "/opt/gppy/config"
CONFIG_FILE = "pipeline.yaml"
OUTPUTS_DIR = "/tmp/outputs"
# the root filesystem is read-only (Pod Security "restricted" and then some): a stage writes only
# to these two emptyDirs. /tmp holds the planner's outputs and HOME (astropy's and CuPy's caches);
# the scratch root holds each invocation's working folders (gppy_stage/scratch.py, GPPY_SCRATCH)
TMP_DIR, SCRATCH_DIR = "/tmp", "/scratch"
GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "gppy.io/pool"
STAGE_DEADLINE_S = 2 * 3600
RETRY_LIMIT = 4
# a stage's command line: options common to all stages get these values; an extra option a
# stage declares in graph.extra_args must be listed here, or rendering stops (so nobody ships
# a workflow that forgets an argument the local runner passes)
EXTRA_ARG_VALUES = {
    "--status": "{{workflow.status}}",
    "--workflow": "{{workflow.name}}",
    "--force": None,  # a flag the local runner may pass; the workflow never forces
}


def planner() -> graph.Stage:
    """The one per-night stage with no ``needs``: it writes the lists every fan-out consumes."""
    roots = [s for s in graph.ordered() if not s.needs and not s.exit_handler]
    if len(roots) != 1 or roots[0].fanout != "night":
        raise ValueError(f"the graph needs exactly one per-night root stage, found {[s.name for s in roots]}")
    return roots[0]


def stage_args(stage: graph.Stage, night: str, item: str | None) -> list[str]:
    """The container arguments for one stage, from ``stage.args`` (the same list the local runner uses)."""
    values = {
        "--root": "{{workflow.parameters.root}}",
        "--obs": "{{workflow.parameters.obs}}",
        "--night": night,
    }
    if stage.item_arg:
        values[stage.item_arg] = item
    out = ["stage", stage.name]
    for opt in stage.args:
        if opt in values:
            out += [opt, values[opt]]
        elif opt in EXTRA_ARG_VALUES:
            if EXTRA_ARG_VALUES[opt] is not None:
                out += [opt, EXTRA_ARG_VALUES[opt]]
        else:
            raise ValueError(f"stage {stage.name}: no workflow value for option {opt}; add it to EXTRA_ARG_VALUES")
    if stage is planner():
        out += ["--outputs-dir", OUTPUTS_DIR]
    return out


def _retry() -> m.RetryStrategy:
    # Only the documented retriable exit code (and pods lost with their node, which Argo reports as
    # an Error with no exit code) are worth another try; bad input, tool failures and bugs are not.
    return m.RetryStrategy(
        limit=RETRY_LIMIT,
        retry_policy="Always",
        expression=f'asInt(lastRetry.exitCode) == {errors.RETRIABLE} || lastRetry.status == "Error"',
        backoff=m.Backoff(duration="30s", factor=2, max_duration="15m"),
    )


def semaphore(key: str) -> m.Synchronization:
    return m.Synchronization(
        semaphores=[m.SemaphoreRef(config_map_key_ref=m.ConfigMapKeySelector(name=SEMAPHORE_CONFIGMAP, key=key))]
    )


def _env(stage: graph.Stage) -> tuple[list, list]:
    env = [
        m.EnvVar(name="GPPY_CONFIG", value=CONFIG_DIR),
        m.EnvVar(name="GPPY_DEVICE", value="gpu" if stage.gpu else "cpu"),
        m.EnvVar(name="GPPY_STAGE", value=stage.name),
        m.EnvVar(name="GPPY_SCRATCH", value=SCRATCH_DIR),
        # the image's home folder is on the read-only root: caches (astropy, CuPy's kernels) go to /tmp
        m.EnvVar(name="HOME", value=TMP_DIR),
        m.EnvVar(name="XDG_CACHE_HOME", value=f"{TMP_DIR}/.cache"),
        m.EnvVar(name="CUPY_CACHE_DIR", value=f"{TMP_DIR}/.cupy"),
    ]
    # credentials come only from Secrets; the endpoint and region from a ConfigMap
    env_from = [
        m.EnvFromSource(config_map_ref=m.ConfigMapEnvSource(name="gppy-env")),
        m.EnvFromSource(secret_ref=m.SecretEnvSource(name="gppy-s3")),
    ]
    if stage.exit_handler:
        env_from.append(m.EnvFromSource(secret_ref=m.SecretEnvSource(name="gppy-slack", optional=True)))
    return env, env_from


def container(stage: graph.Stage) -> Container:
    inputs = [Parameter(name="night")]
    if stage.item_arg:
        inputs.append(Parameter(name="item"))
    outputs = []
    if stage is planner():
        for fanout, key in graph.PLAN_LISTS.items():
            outputs.append(Parameter(name=key, value_from=m.ValueFrom(path=f"{OUTPUTS_DIR}/{key}.json")))
        # globalName: the exit handler runs outside the DAG and can only see workflow outputs;
        # the default keeps the exit handler resolvable when the planner fails before choosing
        outputs.append(
            Parameter(
                name="night",
                global_name="night",
                value_from=m.ValueFrom(path=f"{OUTPUTS_DIR}/night", default="{{workflow.parameters.night}}"),
            )
        )
    requests = {"cpu": stage.cpu, "memory": stage.memory}
    limits = {"memory": stage.memory}
    kwargs = {}
    if stage.gpu:
        requests[GPU_RESOURCE] = "1"
        limits[GPU_RESOURCE] = "1"
        kwargs.update(
            tolerations=[m.Toleration(key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")],
            node_selector={POOL_LABEL: "{{workflow.parameters.gpu-pool}}"},
            synchronization=semaphore(SEM_GPU),
        )
    env, env_from = _env(stage)
    return Container(
        name=stage.name,
        image="{{workflow.parameters.gpu-image}}" if stage.gpu else "{{workflow.parameters.image}}",
        command=["gppy"],
        args=stage_args(stage, "{{inputs.parameters.night}}", "{{inputs.parameters.item}}"),
        inputs=inputs,
        outputs=outputs or None,
        resources=m.ResourceRequirements(requests=requests, limits=limits),
        env=env,
        env_from=env_from,
        volume_mounts=[
            m.VolumeMount(name="config", mount_path=f"{CONFIG_DIR}/{CONFIG_FILE}", sub_path=CONFIG_FILE, read_only=True),
            m.VolumeMount(name="tmp", mount_path=TMP_DIR),
            m.VolumeMount(name="scratch", mount_path=SCRATCH_DIR),
        ],
        retry_strategy=_retry(),
        active_deadline_seconds=STAGE_DEADLINE_S,
        priority_class_name="{{workflow.parameters.priority-class}}",
        security_context=m.SecurityContext(
            run_as_non_root=True, run_as_user=10001, allow_privilege_escalation=False, privileged=False,
            read_only_root_filesystem=True, capabilities=m.Capabilities(drop=["ALL"]),
            seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
        ),
        **kwargs,
    )
