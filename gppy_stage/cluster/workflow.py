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
from hera.workflows import DAG, Parameter, Task, WorkflowTemplate
from hera.workflows import models as m

from .. import errors, graph

REPO = Path(__file__).resolve().parents[2]
# names the watcher's submissions share with the template (in a module without Hera, which
# the watcher, polling every 5 minutes, would otherwise import for nothing)
from .submission import (  # noqa: E402,F401
    NAMESPACE, PRIORITY_BACKLOG, PRIORITY_LIVE, SEM_BACKLOG, SEM_GPU, SEM_NIGHTS, SEMAPHORE_CONFIGMAP,
    TEMPLATE_NAME, WORKFLOW_PRIORITY_BACKLOG, WORKFLOW_PRIORITY_LIVE, WORKFLOW_PRIORITY_TOO, night_workflow,
)

from .containers import CONFIG_FILE, GPU_RESOURCE, POOL_LABEL, container, planner, semaphore  # noqa: E402,F401

SERVICE_ACCOUNT = "gppy-workflow"
ARTIFACT_REPOSITORY = ("artifact-repositories", "gppy-logs")
# items of one fan-out running at once inside one night (bounded so one night cannot flood
# the cluster; the GPU semaphore bounds GPU pods across nights)
FANOUT_PARALLELISM = {"calset": 8, "frame": 32, "stack": 16}
WORKFLOW_PARALLELISM = 48
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


def group_name(fanout: str) -> str:
    """The template (and night-DAG task) running every item of a fan-out: ``frames``."""
    return graph.PLAN_LISTS[fanout]


def item_template(fanout: str) -> str:
    """The template running one item's stages: ``one-frame``."""
    return f"one-{fanout}"


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
    fanouts = [f for f in graph.FANOUTS if f != "night" and any(s.fanout == f for s in stages)]
    exits = [s for s in stages if s.exit_handler]
    _check_names(stages, fanouts, exits)
    with WorkflowTemplate(**_template_options(bool(exits))) as wt:
        containers = {s.name: container(s) for s in stages}
        for fanout in fanouts:
            _fanout_templates(fanout, [s for s in stages if s.fanout == fanout], containers)
        _night_dag(stages, containers)
        if exits:
            with DAG(name="exit-handler"):
                for s in exits:
                    Task(
                        name=s.name,
                        template=containers[s.name],
                        arguments=[Parameter(name="night", value="{{workflow.outputs.parameters.night}}")],
                    )
    return wt


def _check_names(stages: list[graph.Stage], fanouts: list[str], exits: list[graph.Stage]) -> None:
    for s in exits:
        users = [t.name for t in stages if s.name in t.needs]
        if users:
            raise ValueError(f"exit-handler stage {s.name} is needed by {users}; it runs after the night ends")
    own = ["night", "exit-handler"] + [group_name(f) for f in fanouts] + [item_template(f) for f in fanouts]
    clash = sorted(set(own) & {s.name for s in stages})
    if clash:
        raise ValueError(f"stage names {clash} clash with the workflow's own template names")


def _template_options(has_exit_handler: bool) -> dict:
    return dict(
        name=TEMPLATE_NAME,
        namespace=NAMESPACE,
        labels={"app.kubernetes.io/name": "gppy-stage", "app.kubernetes.io/component": "night"},
        annotations={"workflows.argoproj.io/description": "One 7DT night: plan, masters, frames, stacks, report."},
        entrypoint="night",
        on_exit="exit-handler" if has_exit_handler else None,
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
        synchronization=semaphore(SEM_NIGHTS),
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
    )


def _fanout_templates(fanout: str, members: list[graph.Stage], containers: dict) -> None:
    """``one-<fanout>`` (one item's stages) and ``<fanout>s`` (every item, its own parallelism)."""
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


def _night_dag(stages: list[graph.Stage], containers: dict) -> None:
    """The entry DAG: the planner, then each fan-out's group and the later night stages."""
    plan = planner()
    task_of = {s.name: (s.name if s.fanout == "night" else group_name(s.fanout)) for s in stages}
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
