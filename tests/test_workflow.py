"""The night workflow: rendered from graph.STAGES, committed, valid for Argo v4, self-consistent,
and running the same gppy commands the local runner runs."""

from __future__ import annotations

import copy
from pathlib import Path

import manifest_checks as checks
import pytest
import typer
import yaml

from gppy_stage import graph
from gppy_stage.cluster import workflow

REPO = Path(__file__).resolve().parents[1]


def _template() -> dict:
    return workflow.template_dict()


def _by_name(doc: dict) -> dict[str, dict]:
    return {t["name"]: t for t in checks._spec_of(doc)["templates"]}


def _committed() -> list[dict]:
    docs = []
    for p in sorted((REPO / "workflows").glob("*.yaml")):
        docs += [d for d in checks.load_yaml_docs(p) if d.get("kind") in checks.ARGO_KINDS]
    return docs


def _library() -> dict[str, dict]:
    return {workflow.TEMPLATE_NAME: _template()}


def _submitted_bodies() -> list[dict]:
    """Workflows the watcher and the backlog command create."""
    return [
        workflow.night_workflow("7DT03", "2025-01-01_gain2750", name="gppy-7dt03-x", root="s3://b"),
        workflow.night_workflow("7DT03", "2025-01-01_ToO_gain2750", too=True, name="gppy-7dt03-y"),
        workflow.night_workflow("7DT03", "2024-02-01_gain2750", backlog=True, name="gppy-7dt03-z"),
    ]


# --- committed == rendered -------------------------------------------------------------------


def test_committed_yaml_is_a_fresh_render():
    for name, text in workflow.rendered().items():
        path = REPO / "workflows" / name
        assert path.is_file(), f"{path} missing: run `python -m gppy_stage.cluster.workflow render`"
        assert path.read_text() == text, f"{path} is stale: run `python -m gppy_stage.cluster.workflow render`"
    for name, data in workflow.k8s_config_files().items():
        path = REPO / "k8s" / "config" / name
        assert path.read_bytes() == data, f"{path} differs from config/{name}: run the render"


def test_render_writes_the_files(tmp_path):
    written = workflow.render(tmp_path / "wf", tmp_path / "k8s")
    assert {p.name for p in written} == set(workflow.rendered()) | set(workflow.k8s_config_files())
    doc = yaml.safe_load((tmp_path / "wf" / "night-template.yaml").read_text())
    assert doc["kind"] == "WorkflowTemplate" and doc["metadata"]["name"] == workflow.TEMPLATE_NAME


def test_night_yaml_works_with_argo_submit_p_obs():
    wf = yaml.safe_load((REPO / "workflows" / "night.yaml").read_text())
    assert wf["kind"] == "Workflow" and "generateName" in wf["metadata"]
    assert wf["spec"]["workflowTemplateRef"] == {"name": workflow.TEMPLATE_NAME}
    # `-p obs=...` is the one thing a user must give; everything else has a default in the template
    params = {p["name"]: p for p in _template()["spec"]["arguments"]["parameters"]}
    assert [n for n, p in params.items() if "value" not in p] == ["obs"]
    assert params["night"]["value"] == ""
    assert {"root", "gpu-pool", "image", "priority-class"} <= set(params)


# --- Argo's CRD schemas, strict ----------------------------------------------------------------


def test_every_manifest_passes_the_strict_crd_schemas():
    docs = _committed() + _submitted_bodies()
    assert {d["kind"] for d in docs} == {"WorkflowTemplate", "Workflow"}
    for d in docs:
        assert checks.argo_schema_errors(d) == []


def test_k8s_copy_of_the_template_is_valid_too():
    k8s = checks.kustomize_build(REPO / "k8s")
    argo = [d for d in k8s if d.get("kind") in checks.ARGO_KINDS]
    assert [d["metadata"]["name"] for d in argo] == [workflow.TEMPLATE_NAME]
    assert checks.argo_schema_errors(argo[0]) == []


@pytest.mark.parametrize(
    "breakage, expect",
    [
        (lambda d: _by_name(d)["frames"]["dag"]["tasks"][0].update(withParams=
                                                                    _by_name(d)["frames"]["dag"]["tasks"][0].pop("withParam")),
         "withParams"),
        (lambda d: d["spec"]["templates"][0].update(nodeSelectr={"a": "b"}), "nodeSelectr"),
        # v3 spelling: v4 only has the plural
        (lambda d: d["spec"].update(synchronization={"semaphore": {"configMapKeyRef": {"name": "s", "key": "k"}}}),
         "semaphore"),
        (lambda d: d["spec"]["podGC"].update(strategy="OnPodSucess"), "OnPodSucess"),
        (lambda d: d["spec"].update(parallelism="many"), "many"),
    ],
)
def test_schema_check_fails_on_a_broken_manifest(breakage, expect):
    doc = copy.deepcopy(_template())
    breakage(doc)
    errs = checks.argo_schema_errors(doc)
    assert errs and any(expect in e for e in errs), errs


def test_cronworkflow_v3_schedule_is_refused_v4_schedules_accepted():
    cron = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "CronWorkflow",
        "metadata": {"name": "c"},
        "spec": {"schedules": ["0 12 * * *"], "concurrencyPolicy": "Forbid",
                 "workflowSpec": {"workflowTemplateRef": {"name": workflow.TEMPLATE_NAME}}},
    }
    assert checks.argo_schema_errors(cron) == []
    cron["spec"]["schedule"] = "0 12 * * *"
    assert any("schedule" in e for e in checks.argo_schema_errors(cron))


def test_strict_closes_objects_and_honours_nullable():
    import jsonschema

    s = checks.strict({"type": "object", "properties": {"a": {"type": "string", "nullable": True},
                                                        "free": {"type": "object", "properties": {"x": {}},
                                                                 "x-kubernetes-preserve-unknown-fields": True}}})
    v = jsonschema.Draft4Validator(s)
    assert v.is_valid({"a": None, "free": {"y": 1}})
    assert not v.is_valid({"a": None, "b": 1})
    assert not v.is_valid({"a": 3})


# --- references --------------------------------------------------------------------------------


def test_references_resolve():
    lib = _library()
    for d in _committed() + _submitted_bodies():
        assert checks.reference_errors(d, lib) == []


def _night_task(doc, name):
    return next(t for t in _by_name(doc)["night"]["dag"]["tasks"] if t["name"] == name)


@pytest.mark.parametrize(
    "breakage, expect",
    [
        (lambda d: _night_task(d, "frames").update(template="framez"), "'framez' does not exist"),
        (lambda d: _night_task(d, "frames")["arguments"]["parameters"][1].update(
            value="{{tasks.plan.outputs.parameters.framez}}"), "no output parameter 'framez'"),
        (lambda d: _by_name(d)["plan"]["container"]["args"].append("{{inputs.parameters.nite}}"),
         "no input parameter 'nite'"),
        (lambda d: _by_name(d)["plan"]["container"]["args"].append("{{workflow.parameters.unit}}"),
         "no workflow parameter 'unit'"),
        # reading a task's outputs without waiting for it
        (lambda d: _night_task(d, "frames").pop("depends") and _night_task(d, "frames")["arguments"]
         ["parameters"].__setitem__(0, {"name": "night", "value": "{{tasks.calsets.outputs.parameters.x}}"}),
         "not something this task depends on"),
        (lambda d: d["spec"].update(onExit="exit-handlr"), "exit-handlr"),
        (lambda d: _night_task(d, "frames")["arguments"]["parameters"].pop(), "does not pass 'items'"),
    ],
)
def test_reference_check_fails_on_a_broken_manifest(breakage, expect):
    doc = copy.deepcopy(_template())
    breakage(doc)
    errs = checks.reference_errors(doc)
    assert any(expect in e for e in errs), errs


def test_reference_check_on_a_workflow_needs_its_template_parameters():
    wf = workflow.night_workflow("7DT03", "n", name="x")
    wf["spec"]["arguments"]["parameters"].append({"name": "gpu_pool", "value": "gpu"})
    assert any("gpu_pool" in e for e in checks.reference_errors(wf, _library()))
    assert any("not given" in e for e in checks.reference_errors(wf, {}))


# --- the graph decides the shape -----------------------------------------------------------------


def test_every_stage_of_the_graph_has_its_container_and_resources():
    t = _by_name(_template())
    for s in graph.STAGES:
        c = t[s.name]
        assert c["container"]["command"] == ["gppy"]
        assert c["container"]["args"][:2] == ["stage", s.name]
        res = c["container"]["resources"]
        assert res["requests"]["cpu"] == s.cpu and res["requests"]["memory"] == s.memory
        if s.gpu:
            assert res["limits"][workflow.GPU_RESOURCE] == "1"
            assert {"key": workflow.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in c["tolerations"]
            assert c["nodeSelector"] == {workflow.POOL_LABEL: "{{workflow.parameters.gpu-pool}}"}
            assert c["synchronization"]["semaphores"][0]["configMapKeyRef"]["key"] == workflow.SEM_GPU
        else:
            assert workflow.GPU_RESOURCE not in res["requests"] and "tolerations" not in c
        # retried only on the retriable exit code (or a lost pod)
        assert "asInt(lastRetry.exitCode) == 75" in c["retryStrategy"]["expression"]
        assert c["priorityClassName"] == "{{workflow.parameters.priority-class}}"


def test_workflow_level_policies():
    spec = _template()["spec"]
    assert spec["archiveLogs"] is True
    assert spec["podGC"]["strategy"] == "OnPodSuccess" and spec["podGC"]["deleteDelayDuration"]
    assert spec["synchronization"]["semaphores"][0]["configMapKeyRef"]["key"] == workflow.SEM_NIGHTS
    assert spec["parallelism"] > 0
    backlog = workflow.night_workflow("7DT03", "n", backlog=True, name="x")
    assert backlog["spec"]["synchronization"]["semaphores"][0]["configMapKeyRef"]["key"] == workflow.SEM_BACKLOG
    assert {"name": "priority-class", "value": workflow.PRIORITY_BACKLOG} in backlog["spec"]["arguments"]["parameters"]
    assert backlog["spec"]["priority"] < workflow.WORKFLOW_PRIORITY_LIVE


FUTURE = (
    ("plan", "night", (), False, ()),
    ("masters", "calset", ("plan",), True, ()),
    ("reduce", "frame", ("masters",), True, ()),
    ("astrometry", "frame", ("reduce",), False, ()),
    ("photometry", "frame", ("astrometry",), False, ()),
    ("stack", "stack", ("photometry",), False, ()),
    ("subtract", "stack", ("stack",), True, ()),
    ("detect", "stack", ("subtract",), False, ()),
    ("curate", "night", ("detect",), False, ()),
    ("notify", "night", (), False, ("--status",)),
)


@pytest.fixture
def future_graph(monkeypatch):
    stages = tuple(
        graph.Stage(name=n, fanout=f, needs=needs, entry=f"x:{n}", help=n, gpu=gpu, extra_args=extra,
                    exit_handler=(n == "notify"))
        for n, f, needs, gpu, extra in FUTURE
    )
    monkeypatch.setattr(graph, "STAGES", stages)
    return stages


def test_the_workflow_follows_a_grown_graph(future_graph, monkeypatch):
    doc = _template()
    t = _by_name(doc)
    assert checks.argo_schema_errors(doc) == [] and checks.reference_errors(doc) == []
    one_frame = {x["name"]: x for x in t["one-frame"]["dag"]["tasks"]}
    assert list(one_frame) == ["reduce", "astrometry", "photometry"]
    assert one_frame["photometry"]["depends"] == "astrometry"
    night = {x["name"]: x for x in t["night"]["dag"]["tasks"]}
    assert night["stacks"]["depends"] == "frames" and night["curate"]["depends"] == "stacks"
    assert doc["spec"]["onExit"] == "exit-handler"
    notify = t["notify"]["container"]["args"]
    assert notify[notify.index("--status") + 1] == "{{workflow.status}}"
    assert [x["template"] for x in t["exit-handler"]["dag"]["tasks"]] == ["notify"]
    listing = checks.workflow_invocations(doc)
    assert listing == [(s.name, s.fanout, s.args) for s in graph.STAGES]


def test_an_unknown_extra_option_stops_the_render(future_graph, monkeypatch):
    # known to the graph (so the local runner would pass it) but given no value by the workflow
    monkeypatch.setitem(graph.EXTRA_ARGS, "--mystery", "an option the workflow builder has not heard of")
    monkeypatch.setattr(graph, "STAGES", graph.STAGES + (
        graph.Stage(name="later", fanout="night", needs=("curate",), entry="x:y", help="", extra_args=("--mystery",)),))
    with pytest.raises(ValueError, match="--mystery"):
        workflow.template_dict()


def test_workflow_lists_the_stages_of_the_graph():
    listing = checks.workflow_invocations(_template())
    assert listing == [(s.name, s.fanout, s.args) for s in graph.STAGES]


def test_invocation_listing_notices_a_missing_fanout():
    doc = copy.deepcopy(_template())
    task = _by_name(doc)["frames"]["dag"]["tasks"][0]
    task["withItems"] = ["a"]
    del task["withParam"]
    del task["withItems"]  # the per-frame stage now runs once, not per frame
    listing = checks.workflow_invocations(doc)
    assert listing != [(s.name, s.fanout, s.args) for s in graph.STAGES]


def test_workflow_and_local_runner_list_the_same_stages():
    # gppy_stage.runner.stage_invocations(): per stage (name, fanout, args), from the runner itself
    runner = pytest.importorskip("gppy_stage.runner", reason="gppy_stage/runner.py not landed yet")
    local = sorted((d["name"], d["fanout"], tuple(d["args"])) for d in runner.stage_invocations())
    assert sorted(checks.workflow_invocations(_template())) == local


# --- container commands are real gppy commands ---------------------------------------------------


def _toy_app() -> typer.Typer:
    """A stand-in CLI with the interface of `gppy stage ...`, to prove the checker can fail."""
    app = typer.Typer()
    stage = typer.Typer()
    app.add_typer(stage, name="stage")

    @app.command("version")
    def version() -> None: ...

    for s in graph.STAGES:
        def cmd(root: str = typer.Option(..., "--root"), obs: str = typer.Option(..., "--obs"),
                night: str = typer.Option("", "--night"), calset: str = typer.Option(None, "--calset"),
                frame: str = typer.Option(None, "--frame"), stack: str = typer.Option(None, "--stack"),
                status: str = typer.Option(None, "--status"), outputs_dir: str = typer.Option(None, "--outputs-dir")):
            ...
        stage.command(s.name)(cmd)
    return app


def test_command_check_passes_on_a_matching_cli_and_fails_on_a_broken_manifest():
    root = typer.main.get_command(_toy_app())
    doc = copy.deepcopy(_template())
    assert checks.command_errors(doc, root) == []
    args = _by_name(doc)["reduce"]["container"]["args"]
    args[args.index("--frame")] = "--frme"
    _by_name(doc)["plan"]["container"]["args"][1] = "plann"
    errs = checks.command_errors(doc, root)
    assert any("no option --frme" in e for e in errs) and any("no subcommand 'plann'" in e for e in errs)


def test_every_container_command_is_a_real_gppy_command():
    root = checks.gppy_command()  # gppy_stage.cli.app, introspected
    for d in _committed():
        assert checks.command_errors(d, root) == []


def test_a_stage_table_with_a_typo_is_refused_naming_the_stage(tmp_path):
    table = tmp_path / "graph.yaml"
    table.write_text("- {name: plan, fanout: night, needs: [], entry: 'x:y', help: h, memroy: 1Gi}\n")
    with pytest.raises(ValueError, match=r"graph.yaml: stage plan: .*memroy"):
        graph._load(table)
    table.write_text("- {name: plan, fanout: nightly, needs: [], entry: 'x:y', help: h}\n")
    with pytest.raises(ValueError, match="stage plan: unknown fanout 'nightly'"):
        graph._load(table)
    table.write_text("- {name: plan, fanout: night, needs: [masters], entry: 'x:y', help: h}\n")
    assert graph._load(table)[0].needs == ("masters",)  # ordered() is what checks that needs exist
