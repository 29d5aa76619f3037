"""Checks of the rendered manifests that need no cluster (development tooling: the tests and
``make check-manifests`` run them from a checkout; nothing in the runtime package needs them).

- :func:`argo_schema_errors`: Argo's own CRD schemas, made strict (a misspelt or v3-only field fails).
- :func:`reference_errors`: every template a task names exists; every ``{{...}}`` names something.
- :func:`command_errors`: every ``gppy`` container command is a real command taking those options.
- :func:`k8s_errors`: plain Kubernetes manifests against Kubernetes' schemas (kubernetes-validate,
  strict); custom resources it has no schema for are skipped with the reason.

Each returns a list of readable error strings (empty: fine). ``python tests/manifest_checks.py``
runs them all over ``workflows/`` and ``k8s/`` (``make check-manifests``).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parents[1]
# a copy of Argo's CRDs (provenance and licence beside them)
CRD_DIR = REPO / "tests" / "data" / "argo-workflows-crds"
ARGO_KINDS = {
    "Workflow": "argoproj.io_workflows.yaml",
    "WorkflowTemplate": "argoproj.io_workflowtemplates.yaml",
    "CronWorkflow": "argoproj.io_cronworkflows.yaml",
}
KUBERNETES_VERSION = "1.31"


def crd_dir() -> Path:
    import os

    return Path(os.environ.get("GPPY_ARGO_CRDS", CRD_DIR))


def load_yaml_docs(path: str | Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


# --- Argo CRD schemas --------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The CRD's schema made strict: closed objects where properties are listed, ``nullable`` honoured."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("nullable") is True:
        # OpenAPI's nullable is JSON Schema's "or null"
        if "type" in out:
            t = out["type"]
            out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    return out


@functools.lru_cache(maxsize=None)
def _validator(kind: str):
    import jsonschema

    path = crd_dir() / ARGO_KINDS[kind]
    crd = yaml.safe_load(path.read_text())
    schema = strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    # OpenAPI v3.0 schemas are closest to draft 4 (boolean exclusiveMinimum, no const)
    return jsonschema.Draft4Validator(schema)


def argo_schema_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in ARGO_KINDS:
        return [f"not an Argo kind this check knows: {kind!r}"]
    if doc.get("apiVersion") != "argoproj.io/v1alpha1":
        return [f"{kind}: apiVersion {doc.get('apiVersion')!r} is not argoproj.io/v1alpha1"]
    name = doc.get("metadata", {}).get("name") or doc.get("metadata", {}).get("generateName")
    errs = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{kind} {name}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs]


# --- references between templates ----------------------------------------------------------

_VAR = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
# variables Argo defines itself (the ones this project uses or may reasonably use)
_BUILTINS = {
    "workflow.name", "workflow.namespace", "workflow.uid", "workflow.status", "workflow.duration",
    "workflow.creationTimestamp", "workflow.serviceAccountName", "workflow.failures",
    "workflow.mainEntrypoint", "workflow.priority", "pod.name", "retries", "node.name",
}


def _strings(node: Any) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _params(items: list | None) -> dict[str, dict]:
    return {p["name"]: p for p in (items or [])}


def _spec_of(doc: dict) -> dict:
    return doc["spec"]["workflowSpec"] if doc.get("kind") == "CronWorkflow" else doc["spec"]


def _deps_of(task: dict) -> set[str]:
    names = set(task.get("dependencies") or [])
    if task.get("depends"):
        names |= {n.split(".")[0] for n in re.findall(r"[A-Za-z0-9][A-Za-z0-9_.-]*", task["depends"])}
    return names


def reference_errors(doc: dict, library: dict[str, dict] | None = None) -> list[str]:
    """Dangling names in one Workflow / WorkflowTemplate / CronWorkflow.

    ``library`` maps WorkflowTemplate names to their documents, for a Workflow that only refers
    to a template (``workflowTemplateRef``).
    """
    library = library or {}
    spec = _spec_of(doc)
    kind = doc.get("kind")
    errs: list[str] = []
    params = _params(spec.get("arguments", {}).get("parameters"))
    templates = {t["name"]: t for t in spec.get("templates") or []}
    if len(templates) != len(spec.get("templates") or []):
        errs.append(f"{kind}: duplicate template names")

    ref = spec.get("workflowTemplateRef")
    if ref:
        target = library.get(ref.get("name"))
        if target is None:
            return errs + [f"{kind}: workflowTemplateRef names {ref.get('name')!r}, which is not given"]
        tparams = _params(target["spec"].get("arguments", {}).get("parameters"))
        for name in params:
            if name not in tparams:
                errs.append(f"{kind}: argument {name!r} is not a parameter of template {ref['name']!r}")
        for name, p in tparams.items():
            if "value" not in p and "valueFrom" not in p and name not in params:
                errs.append(f"{kind}: template parameter {name!r} has no default and is not passed")
        merged = {**tparams, **params}
        if not templates:
            return errs
        params = merged

    globals_ = {
        p["globalName"]
        for t in templates.values()
        for p in (t.get("outputs") or {}).get("parameters") or []
        if p.get("globalName")
    }
    for field in ("entrypoint", "onExit"):
        if spec.get(field) and spec[field] not in templates:
            errs.append(f"{kind}: {field} names template {spec[field]!r}, which does not exist")
    if not spec.get("entrypoint") and not ref:
        errs.append(f"{kind}: no entrypoint")

    def check_var(var: str, where: str, inputs: dict, tasks: dict | None, ancestors: set[str] | None,
                  has_item: bool) -> None:
        var = var.strip()
        if var.startswith("="):
            return  # expression templates: not parsed here
        parts = var.split(".")
        if var in _BUILTINS or var.startswith("workflow.labels.") or var.startswith("workflow.annotations."):
            return
        if var == "item" or var.startswith("item."):
            if not has_item:
                errs.append(f"{where}: {{{{{var}}}}} outside a withParam/withItems task")
            return
        if parts[:2] == ["workflow", "parameters"] and len(parts) == 3:
            if parts[2] not in params:
                errs.append(f"{where}: {{{{{var}}}}}: no workflow parameter {parts[2]!r}")
            return
        if parts[:3] == ["workflow", "outputs", "parameters"] and len(parts) == 4:
            if parts[3] not in globals_:
                errs.append(f"{where}: {{{{{var}}}}}: no output parameter has globalName {parts[3]!r}")
            return
        if parts[:2] == ["inputs", "parameters"] and len(parts) == 3:
            if parts[2] not in inputs:
                errs.append(f"{where}: {{{{{var}}}}}: the template has no input parameter {parts[2]!r}")
            return
        if parts[0] in ("tasks", "steps") and len(parts) == 5 and parts[2:4] == ["outputs", "parameters"]:
            if tasks is None or parts[1] not in tasks:
                errs.append(f"{where}: {{{{{var}}}}}: no task {parts[1]!r} here")
                return
            if ancestors is not None and parts[1] not in ancestors:
                errs.append(f"{where}: {{{{{var}}}}}: task {parts[1]!r} is not something this task depends on")
            callee = templates.get(tasks[parts[1]].get("template"))
            outs = _params(((callee or {}).get("outputs") or {}).get("parameters"))
            if callee is not None and parts[4] not in outs:
                errs.append(f"{where}: {{{{{var}}}}}: template {callee['name']!r} has no output parameter {parts[4]!r}")
            return
        errs.append(f"{where}: {{{{{var}}}}} is not a variable this check knows")

    for tname, t in templates.items():
        inputs = _params((t.get("inputs") or {}).get("parameters"))
        body = {k: v for k, v in t.items() if k not in ("dag", "steps")}
        for s in _strings(body):
            for var in _VAR.findall(s):
                check_var(var, f"template {tname}", inputs, None, None, False)
        dag_tasks = (t.get("dag") or {}).get("tasks") or []
        step_tasks = [st for group in t.get("steps") or [] for st in group]
        tasks = {x["name"]: x for x in dag_tasks}
        for task in dag_tasks + step_tasks:
            where = f"template {tname} task {task.get('name')}"
            callee_name = task.get("template")
            if task.get("templateRef"):
                callee_name = None  # another WorkflowTemplate: checked where it is defined
            elif callee_name not in templates:
                errs.append(f"{where}: template {callee_name!r} does not exist")
                callee_name = None
            for dep in _deps_of(task) - {"Succeeded", "Failed", "Errored", "Skipped", "Omitted", "Daemoned",
                                           "AnySucceeded", "AllFailed", "Completed"}:
                if dep not in tasks:
                    errs.append(f"{where}: depends on {dep!r}, which is not a task of this DAG")
            # transitive dependencies: a task may only read outputs of tasks that ran before it
            ancestors: set[str] = set()
            todo = list(_deps_of(task))
            while todo:
                d = todo.pop()
                if d in tasks and d not in ancestors:
                    ancestors.add(d)
                    todo += list(_deps_of(tasks[d]))
            has_item = bool(task.get("withParam") or task.get("withItems") or task.get("withSequence"))
            for field, value in task.items():
                for s in _strings(value):
                    for var in _VAR.findall(s):
                        check_var(var, where, inputs, tasks if dag_tasks else None,
                                  ancestors if dag_tasks else None, has_item and field != "withParam")
            if callee_name:
                callee_inputs = _params((templates[callee_name].get("inputs") or {}).get("parameters"))
                passed = _params((task.get("arguments") or {}).get("parameters"))
                for name in passed:
                    if name not in callee_inputs:
                        errs.append(f"{where}: passes {name!r}, which template {callee_name!r} does not take")
                for name, p in callee_inputs.items():
                    if name not in passed and "value" not in p and "default" not in p:
                        errs.append(f"{where}: does not pass {name!r}, which template {callee_name!r} needs")
    return errs


# --- container commands ------------------------------------------------------------------


def containers(doc: dict) -> list[tuple[str, dict]]:
    spec = _spec_of(doc)
    return [(t["name"], t["container"]) for t in spec.get("templates") or [] if t.get("container")]


def parse_command(root_command, argv: list[str]) -> tuple[list[str], Any, list[str]]:
    """Walk a click command tree with ``argv``: (subcommand path, leaf command, option errors)."""
    # duck-typed: typer vendors its own click (typer._click) whose classes are not click's
    def is_group(c) -> bool:
        return isinstance(getattr(c, "commands", None), dict)

    cmd = root_command
    path: list[str] = []
    i = 0
    while is_group(cmd) and i < len(argv) and not argv[i].startswith("-"):
        sub = cmd.commands.get(argv[i])
        if sub is None:
            return path, None, [f"{' '.join(['gppy', *path])} has no subcommand {argv[i]!r}"]
        path.append(argv[i])
        cmd = sub
        i += 1
    if is_group(cmd):
        return path, None, [f"{' '.join(['gppy', *path])} is a group, not a command"]
    errs = []
    opts = {}
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "option":
            for o in list(p.opts) + list(p.secondary_opts):
                opts[o] = p
    seen = set()
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            errs.append(f"gppy {' '.join(path)}: unexpected argument {tok!r}")
            i += 1
            continue
        name = tok.split("=", 1)[0]
        p = opts.get(name)
        if p is None:
            errs.append(f"gppy {' '.join(path)}: no option {name}")
            i += 1
            continue
        seen.add(p.name)
        if p.is_flag or "=" in tok:
            i += 1
        else:
            if i + 1 >= len(argv):
                errs.append(f"gppy {' '.join(path)}: option {name} needs a value")
            i += 2
    for p in cmd.params:
        if p.required and p.name not in seen and not getattr(p, "envvar", None):
            errs.append(f"gppy {' '.join(path)}: required option {p.opts[0]} not given")
    return path, cmd, errs


def command_errors(doc: dict, root_command) -> list[str]:
    """``root_command``: the click command of the ``gppy`` app (``typer.main.get_command(app)``)."""
    errs = []
    for name, c in containers(doc):
        cmd = c.get("command") or []
        if cmd != ["gppy"]:
            errs.append(f"template {name}: command {cmd!r} is not the gppy CLI")
            continue
        _, _, e = parse_command(root_command, list(c.get("args") or []))
        errs += [f"template {name}: {x}" for x in e]
    return errs


def gppy_command():
    import typer

    from gppy_stage import cli

    return typer.main.get_command(cli.app)


def workflow_invocations(doc: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a workflow runs, per stage: (name, fan-out, options), read from the YAML's structure.

    The fan-out is what the structure does, not what the stage claims: a container reached through
    a ``withParam`` task runs per item (and its item option says which kind), anything else runs
    once per night. ``--outputs-dir`` is left out: it is how Argo collects the planner's lists,
    where the local runner reads plan.json.
    """
    from gppy_stage import graph

    templates = {t["name"]: t for t in _spec_of(doc).get("templates") or []}
    out: list[tuple[str, str, tuple[str, ...]]] = []

    def walk(name: str, fanned: bool, path: tuple[str, ...]) -> None:
        t = templates.get(name)
        if t is None or name in path:
            return
        if t.get("container"):
            args = list(t["container"].get("args") or [])
            opts = tuple(a for a in args if a.startswith("--") and a != "--outputs-dir")
            items = [o[2:] for o in opts if o[2:] in graph.PLAN_LISTS]
            if fanned:
                fanout = items[0] if len(items) == 1 else f"per-item without one item option {items}"
            else:
                fanout = "night" if not items else f"once per night yet given {items}"
            out.append((args[1] if len(args) > 1 else name, fanout, opts))
        tasks = list((t.get("dag") or {}).get("tasks") or []) + [x for g in t.get("steps") or [] for x in g]
        for task in tasks:
            many = bool(task.get("withParam") or task.get("withItems") or task.get("withSequence"))
            walk(task.get("template"), fanned or many, path + (name,))

    spec = _spec_of(doc)
    walk(spec.get("entrypoint"), False, ())
    if spec.get("onExit"):
        walk(spec["onExit"], False, ())
    return out


# --- plain Kubernetes manifests -------------------------------------------------------------


def kustomize_build(path: str | Path) -> list[dict]:
    """The resources ``kubectl apply -k PATH`` would apply (via ``kubectl kustomize``)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl is not installed: cannot render the kustomization")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def skip_reason(doc: dict) -> str | None:
    group = doc.get("apiVersion", "").rpartition("/")[0]
    if group == "argoproj.io":
        return "Argo custom resource: checked against Argo's CRD schemas instead"
    if "." in group and not group.endswith(".k8s.io"):
        return f"custom resource of {group}: kubernetes-validate has no schema for it"
    return None


def k8s_errors(docs: list[dict], version: str = KUBERNETES_VERSION) -> tuple[list[str], list[str]]:
    """(errors, skipped) for plain Kubernetes resources validated strictly."""
    import kubernetes_validate

    errs, skipped = [], []
    for d in docs:
        what = f"{d.get('kind')} {d.get('metadata', {}).get('name')}"
        reason = skip_reason(d)
        if reason:
            skipped.append(f"{what}: {reason}")
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errs.append(f"{what}: {path or '<root>'}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errs.append(f"{what}: no Kubernetes schema ({exc}); a misspelt kind or apiVersion?")
    return errs, skipped


# --- everything ---------------------------------------------------------------------------


def check_all(repo: Path = REPO, with_commands: bool = True) -> tuple[list[str], list[str]]:
    errs: list[str] = []
    docs = []
    for p in sorted((repo / "workflows").glob("*.yaml")):
        for d in load_yaml_docs(p):
            if d.get("kind") in ARGO_KINDS:
                docs.append((p.name, d))
    library = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "WorkflowTemplate"}
    root = gppy_command() if with_commands else None
    for name, d in docs:
        errs += [f"{name}: {e}" for e in argo_schema_errors(d)]
        errs += [f"{name}: {e}" for e in reference_errors(d, library)]
        if root is not None:
            errs += [f"{name}: {e}" for e in command_errors(d, root)]
    k8s = kustomize_build(repo / "k8s")
    e, skipped = k8s_errors(k8s)
    errs += [f"k8s: {x}" for x in e]
    for d in k8s:
        if d.get("kind") in ARGO_KINDS:
            errs += [f"k8s: {x}" for x in argo_schema_errors(d)]
    return errs, skipped


def main() -> int:
    errs, skipped = check_all()
    for s in skipped:
        print(f"skipped {s}")
    for e in errs:
        print(f"ERROR {e}", file=sys.stderr)
    print(f"{len(errs)} error(s)")
    return 1 if errs else 0


if __name__ == "__main__":
    raise SystemExit(main())
