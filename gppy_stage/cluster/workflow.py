"""The night workflow, built with Hera from ``graph.STAGES`` and rendered to YAML.

Nothing here names a stage: the DAG is derived from the graph, so a stage added to
``graph.STAGES`` appears in the workflow after ``python -m gppy_stage.cluster.workflow render``
(and ``tests/test_workflow.py`` fails until the committed YAML is re-rendered).

Shape::

    <root night stage>  (the planner: writes the fan-out lists and the night it chose)
      -> <fanout>s: one template per fan-out (its own parallelism) whose task runs withParam over
         the planner's list, each item in ``one-<fanout>``: that fan-out's stages one after another
      -> later night stages
    onExit: the stages marked ``exit_handler`` (notify), run whatever the night's outcome.

Run ``python -m gppy_stage.cluster.workflow render`` to write ``workflows/*.yaml`` (and ``k8s/config/``).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import yaml
from hera.workflows import DAG, Container, Parameter, Task, WorkflowTemplate
from hera.workflows import models as m

from .. import errors, graph

REPO = Path(__file__).resolve().parents[2]
# names the watcher's submissions share with the template (in a module without Hera, which
# the watcher, polling every 5 minutes, would otherwise import for nothing)
from .submission import (  # noqa: E402,F401
    NAMESPACE, PRIORITY_BACKLOG, PRIORITY_LIVE, SEM_BACKLOG, SEM_GPU, SEM_NIGHTS, SEMAPHORE_CONFIGMAP,
    TEMPLATE_NAME, WORKFLOW_PRIORITY_BACKLOG, WORKFLOW_PRIORITY_LIVE, WORKFLOW_PRIORITY_TOO, night_workflow,
)

SERVICE_ACCOUNT = "gppy-workflow"
ARTIFACT_REPOSITORY = ("artifact-repositories", "gppy-logs")
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
# items of one fan-out running at once inside one night (bounded so one night cannot flood
# the cluster; the GPU semaphore bounds GPU pods across nights)
FANOUT_PARALLELISM = {"calset": 8, "frame": 32, "stack": 16}
WORKFLOW_PARALLELISM = 48
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


def _version() -> str:
    # from pyproject, not importlib.metadata: the render must not depend on how (or whether)
    # the package was installed, or the committed YAML would differ between machines; an
    # installed wheel has no pyproject, and its metadata was written from that same file
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        from importlib.metadata import version

        return version("gppy-stage")
    return tomllib.loads(pyproject.read_text())["project"]["version"]


def default_image(gpu: bool = False) -> str:
    return f"ghcr.io/7dimensionaltelescope/gppy-stage:{_version()}{'-cuda12' if gpu else ''}"


def planner() -> graph.Stage:
    """The one per-night stage with no ``needs``: it writes the lists every fan-out consumes."""
    roots = [s for s in graph.ordered() if not s.needs and not s.exit_handler]
    if len(roots) != 1 or roots[0].fanout != "night":
        raise ValueError(f"the graph needs exactly one per-night root stage, found {[s.name for s in roots]}")
    return roots[0]


def group_name(fanout: str) -> str:
    """The template (and night-DAG task) running every item of a fan-out: ``frames``."""
    return graph.PLAN_LISTS[fanout]


def item_template(fanout: str) -> str:
    """The template running one item's stages: ``one-frame``."""
    return f"one-{fanout}"


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


def _semaphore(key: str) -> m.Synchronization:
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


def _container(stage: graph.Stage) -> Container:
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
            synchronization=_semaphore(SEM_GPU),
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


PARAMETERS = [
    ("obs", None, "the unit, e.g. 7DT03 (required)"),
    ("night", "", "night folder, e.g. 2025-01-01_gain2750; empty: the unit's latest complete night"),
    ("root", "s3://gppy", "storage root URL holding obsdata/, master_frame/, processed/, runs/"),
    ("gpu-pool", "gpu", f"value of the {POOL_LABEL} node label GPU stages select"),
    ("image", None, "pipeline image for CPU stages"),
    ("gpu-image", None, "pipeline image (CUDA variant) for GPU stages"),
    ("priority-class", PRIORITY_LIVE, f"pod PriorityClass: {PRIORITY_LIVE} or {PRIORITY_BACKLOG}"),
]


def _parameters() -> list[Parameter]:
    defaults = {"image": default_image(False), "gpu-image": default_image(True)}
    out = []
    for name, value, desc in PARAMETERS:
        value = defaults.get(name, value)
        out.append(Parameter(name=name, value=value, description=desc) if value is not None
                   else Parameter(name=name, description=desc))
    return out


def _dag_deps(stages: list[graph.Stage], task_of: dict[str, str], own: str) -> list[str]:
    deps = []
    for s in stages:
        for need in s.needs:
            t = task_of[need]
            if t != own and t not in deps:
                deps.append(t)
    return deps


# Argo adds its own containers to every pod (``init``, ``wait``) and gives them no security
# context of their own unless the controller's executor config does: this patch (merged by
# container name into each pod) makes them pass Pod Security "restricted" too, so the namespace
# can enforce it whatever the controller's settings
_EXECUTOR_SECURITY = {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                      "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                      "seccompProfile": {"type": "RuntimeDefault"}}
POD_SPEC_PATCH = json.dumps({
    "initContainers": [{"name": "init", "securityContext": _EXECUTOR_SECURITY}],
    "containers": [{"name": "wait", "securityContext": _EXECUTOR_SECURITY}],
}, sort_keys=True)


def build_template() -> WorkflowTemplate:
    stages = graph.ordered()
    plan = planner()
    fanouts = [f for f in graph.FANOUTS if f != "night" and any(s.fanout == f for s in stages)]
    exits = [s for s in stages if s.exit_handler]
    task_of = {s.name: (s.name if s.fanout == "night" else group_name(s.fanout)) for s in stages}
    for s in exits:
        users = [t.name for t in stages if s.name in t.needs]
        if users:
            raise ValueError(f"exit-handler stage {s.name} is needed by {users}; it runs after the night ends")

    own = ["night", "exit-handler"] + [group_name(f) for f in fanouts] + [item_template(f) for f in fanouts]
    clash = sorted(set(own) & {s.name for s in stages})
    if clash:
        raise ValueError(f"stage names {clash} clash with the workflow's own template names")

    with WorkflowTemplate(
        name=TEMPLATE_NAME,
        namespace=NAMESPACE,
        labels={"app.kubernetes.io/name": "gppy-stage", "app.kubernetes.io/component": "night"},
        annotations={"workflows.argoproj.io/description": "One 7DT night: plan, masters, frames, stacks, report."},
        entrypoint="night",
        on_exit="exit-handler" if exits else None,
        arguments=_parameters(),
        service_account_name=SERVICE_ACCOUNT,
        archive_logs=True,
        artifact_repository_ref=m.ArtifactRepositoryRef(config_map=ARTIFACT_REPOSITORY[0], key=ARTIFACT_REPOSITORY[1]),
        # successful pods go soon; failed ones stay (with their logs) until the workflow itself is
        # deleted by the TTL below, so an operator can `kubectl describe` them for days
        pod_gc=m.PodGC(strategy="OnPodSuccess", delete_delay_duration="10m"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=2 * 86400, seconds_after_failure=7 * 86400),
        parallelism=WORKFLOW_PARALLELISM,
        priority=WORKFLOW_PRIORITY_LIVE,
        pod_priority_class_name="{{workflow.parameters.priority-class}}",
        synchronization=_semaphore(SEM_NIGHTS),
        active_deadline_seconds=24 * 3600,
        volumes=[
            m.Volume(name="config", config_map=m.ConfigMapVolumeSource(name="gppy-config")),
            # no size limits: a stack's SWarp resampling of 61-Mpix frames and a calibrated frame
            # being written (550 MB) need what they need; the node's ephemeral storage bounds them
            m.Volume(name="tmp", empty_dir=m.EmptyDirVolumeSource()),
            m.Volume(name="scratch", empty_dir=m.EmptyDirVolumeSource()),
        ],
        security_context=m.PodSecurityContext(
            run_as_non_root=True, run_as_user=10001, fs_group=10001, seccomp_profile=m.SeccompProfile(type="RuntimeDefault")
        ),
        pod_spec_patch=POD_SPEC_PATCH,
    ) as wt:
        containers = {s.name: _container(s) for s in stages}

        for fanout in fanouts:
            members = [s for s in stages if s.fanout == fanout]
            # one item: that fan-out's stages after what they need of it (reduce -> astrometry ->
            # photometry; detect and completeness both after subtract, side by side), a stage
            # needing none of them after the one before
            with DAG(name=item_template(fanout), inputs=[Parameter(name="night"), Parameter(name="item")]):
                prev, made = None, {}
                for s in members:
                    t = Task(
                        name=s.name,
                        template=containers[s.name],
                        arguments=[
                            Parameter(name="night", value="{{inputs.parameters.night}}"),
                            Parameter(name="item", value="{{inputs.parameters.item}}"),
                        ],
                    )
                    for before in [made[n] for n in s.needs if n in made] or ([prev] if prev is not None else []):
                        before >> t
                    prev = made[s.name] = t
            # all items: a template of its own so that its parallelism bounds this fan-out only
            with DAG(
                name=group_name(fanout),
                inputs=[Parameter(name="night"), Parameter(name="items")],
                parallelism=FANOUT_PARALLELISM.get(fanout, 8),
            ):
                Task(
                    name=fanout,
                    template=item_template(fanout),
                    arguments=[
                        Parameter(name="night", value="{{inputs.parameters.night}}"),
                        Parameter(name="item", value="{{item}}"),
                    ],
                    with_param="{{inputs.parameters.items}}",
                    # one bad item (a quarantined frame) must not stop the stacks and the report;
                    # the report names the items that failed
                    continue_on=m.ContinueOn(failed=True),
                )

        plan_night = f"{{{{tasks.{plan.name}.outputs.parameters.night}}}}"
        with DAG(name="night"):
            tasks: dict[str, Task] = {}
            members_of: dict[str, list[graph.Stage]] = {}
            # in graph order, so the rendered DAG reads like STAGES
            for s in stages:
                if s.exit_handler:
                    continue
                if s.fanout == "night":
                    night_value = "{{workflow.parameters.night}}" if s is plan else plan_night
                    tasks[s.name] = Task(
                        name=s.name,
                        template=containers[s.name],
                        arguments=[Parameter(name="night", value=night_value)],
                    )
                    members_of[s.name] = [s]
                    continue
                name = group_name(s.fanout)
                if name in tasks:
                    continue
                tasks[name] = Task(
                    name=name,
                    template=name,
                    arguments=[
                        Parameter(name="night", value=plan_night),
                        Parameter(
                            name="items",
                            value=f"{{{{tasks.{plan.name}.outputs.parameters.{graph.PLAN_LISTS[s.fanout]}}}}}",
                        ),
                    ],
                )
                members_of[name] = [x for x in stages if x.fanout == s.fanout]
            for name, t in tasks.items():
                deps = _dag_deps(members_of[name], task_of, name)
                if deps:
                    t.depends = " && ".join(deps)

        if exits:
            with DAG(name="exit-handler"):
                for s in exits:
                    Task(
                        name=s.name,
                        template=containers[s.name],
                        arguments=[Parameter(name="night", value="{{workflow.outputs.parameters.night}}")],
                    )
    return wt


def template_dict() -> dict:
    return build_template().to_dict()


HEADER = "# Generated by `python -m gppy_stage.cluster.workflow render` from gppy_stage/graph.py.\n# Do not edit: change the graph or the builder and re-render (a test compares this file to a fresh render).\n"


def _dump(doc: dict) -> str:
    return HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=120)


def rendered() -> dict[str, str]:
    """File name -> YAML text of everything ``render`` writes."""
    return {
        "night-template.yaml": _dump(template_dict()),
        "night.yaml": _dump(night_workflow()),
        "kustomization.yaml": HEADER + yaml.safe_dump(
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
             "resources": ["night-template.yaml"]}, sort_keys=False),
    }


def k8s_config_files() -> dict[str, bytes]:
    """Files of ``k8s/config/`` (the ConfigMap gppy-config), copied from ``config/``."""
    return {CONFIG_FILE: (REPO / "config" / CONFIG_FILE).read_bytes()}


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def render(out_dir: str | Path, k8s_dir: str | Path | None = None) -> list[Path]:
    """Write the workflow YAML to ``out_dir`` and, given ``k8s_dir``, the ConfigMap's files."""
    written = [_write(Path(out_dir) / name, text.encode()) for name, text in rendered().items()]
    if k8s_dir is not None:
        written += [_write(Path(k8s_dir) / "config" / n, b) for n, b in k8s_config_files().items()]
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "render" or len(argv) > 3:
        print("usage: python -m gppy_stage.cluster.workflow render [WORKFLOWS_DIR [K8S_DIR]]\n"
              "  (no directories: the repository's workflows/ and k8s/)", file=sys.stderr)
        return errors.CONFIG
    out = Path(argv[1]) if len(argv) > 1 else REPO / "workflows"
    k8s = Path(argv[2]) if len(argv) > 2 else (REPO / "k8s" if len(argv) == 1 else None)
    for p in render(out, k8s):
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
