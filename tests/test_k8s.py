"""k8s/: what `kubectl apply -k k8s/` installs is valid for Kubernetes (strictly), least-privilege,
free of secrets, and agrees with the names the night workflow uses."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import manifest_checks as checks
import pytest
import typer
import yaml

from gppy_stage.cluster import workflow
from gppy_stage.cluster.cli import register

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KARPENTER = K8S / "gpu-pool" / "karpenter"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) not installed")


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return checks.kustomize_build(K8S)


def _find(docs, kind, name=None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def test_manifests_validate_strictly(docs):
    errs, skipped = checks.k8s_errors(docs)
    assert errs == []
    # only custom resources are skipped, each with its reason
    assert skipped == [f"WorkflowTemplate {workflow.TEMPLATE_NAME}: Argo custom resource: checked against Argo's CRD schemas instead"]
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob", "PriorityClass"} <= {
        d["kind"] for d in docs}


def test_karpenter_pool_is_skipped_with_a_reason_and_has_the_gpu_taint_and_limit():
    docs = checks.kustomize_build(KARPENTER)
    errs, skipped = checks.k8s_errors(docs)
    assert errs == [] and len(skipped) == 2 and all("no schema" in s for s in skipped)
    pool = _find(docs, "NodePool")[0]["spec"]
    assert {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"} in pool["template"]["spec"]["taints"]
    gpu_pool_default = {p["name"]: p.get("value") for p in
                        workflow.template_dict()["spec"]["arguments"]["parameters"]}["gpu-pool"]
    assert pool["template"]["metadata"]["labels"][workflow.POOL_LABEL] == gpu_pool_default
    assert int(pool["limits"]["nvidia.com/gpu"]) > 0


def test_a_broken_manifest_fails(tmp_path, docs):
    docs = copy.deepcopy(docs)
    (tmp_path / "kustomization.yaml").write_text("resources: [broken.yaml]\n")
    cron = _find(docs, "CronJob", "gppy-watcher")[0]
    cron["spec"]["concurencyPolicy"] = cron["spec"].pop("concurrencyPolicy")  # misspelt
    role = _find(docs, "Role", "gppy-watcher")[0]
    role["rules"][0]["verbs"] = "create"  # a string, not a list
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump_all([cron, role]))
    errs, _ = checks.k8s_errors(checks.kustomize_build(tmp_path))
    assert any("CronJob gppy-watcher" in e and "concurencyPolicy" in e for e in errs), errs
    assert any("Role gppy-watcher" in e for e in errs), errs


def test_a_kustomization_naming_a_missing_file_fails(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [nothing-here.yaml]\n")
    with pytest.raises(RuntimeError, match="kustomize"):
        checks.kustomize_build(tmp_path)


def test_rbac_is_least_privilege(docs):
    assert not _find(docs, "ClusterRole") and not _find(docs, "ClusterRoleBinding")
    rules = {r["metadata"]["name"]: r["rules"] for r in _find(docs, "Role")}
    assert rules == {
        "gppy-watcher": [{"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["create", "get", "list"]}],
        "gppy-workflow-executor": [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                                    "verbs": ["create", "patch"]}],
    }
    sas = {d["metadata"]["name"] for d in _find(docs, "ServiceAccount")}
    for b in _find(docs, "RoleBinding"):
        assert b["roleRef"]["name"] in rules
        assert all(s["kind"] == "ServiceAccount" and s["name"] in sas for s in b["subjects"])
    cron = _find(docs, "CronJob", "gppy-watcher")[0]
    assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"] == "gppy-watcher"
    assert workflow.SERVICE_ACCOUNT in sas


def _period_s(schedule: str) -> int:
    m = re.fullmatch(r"\*/(\d+) \* \* \* \*", schedule)
    assert m, f"schedule {schedule!r}: this test reads only */N minutes"
    return int(m.group(1)) * 60


def test_watcher_cronjob_never_overlaps_and_runs_a_real_command(docs):
    cron = _find(docs, "CronJob", "gppy-watcher")[0]["spec"]
    job = cron["jobTemplate"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] > 0
    assert job["backoffLimit"] == 0
    assert 0 < job["activeDeadlineSeconds"] < _period_s(cron["schedule"])
    pod = job["template"]["spec"]
    (c,) = pod["containers"]
    app = typer.Typer()
    app.command("version")(lambda: None)
    register(app)
    _, cmd, errs = checks.parse_command(typer.main.get_command(app), c["args"])
    assert c["command"] == ["gppy"] and errs == []
    # required options come from the environment the CronJob gives the pod
    env_names = {e["name"] for e in c.get("env", [])}
    for ref in c["envFrom"]:
        if "configMapRef" in ref:
            env_names |= set(_find(docs, "ConfigMap", ref["configMapRef"]["name"])[0]["data"])
    for p in cmd.params:
        if p.required:
            assert p.envvar in env_names, f"{p.opts[0]} has no value in the CronJob"


def test_no_literal_secrets(docs):
    assert not _find(docs, "Secret"), "secrets are created by the operator (docs/deploy.md), never committed"
    secretish = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|WEBHOOK)", re.I)

    def envs(node):
        if isinstance(node, dict):
            if isinstance(node.get("env"), list):
                yield from node["env"]
            for v in node.values():
                yield from envs(v)
        elif isinstance(node, list):
            for v in node:
                yield from envs(v)

    checked = 0
    for d in docs + [workflow.template_dict()]:
        for e in envs(d):
            if secretish.search(e["name"]):
                checked += 1
                assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), e
        for cm in [d] if d["kind"] == "ConfigMap" else []:
            for k, v in (cm.get("data") or {}).items():
                assert not (secretish.search(k) and v), f"ConfigMap {cm['metadata']['name']} holds {k}"
    assert checked >= 1  # the Slack webhook of the watcher


def test_names_the_workflow_uses_exist(docs):
    t = workflow.template_dict()
    cms = {d["metadata"]["name"]: d for d in _find(docs, "ConfigMap")}
    sem = cms[workflow.SEMAPHORE_CONFIGMAP]["data"]
    for key in (workflow.SEM_NIGHTS, workflow.SEM_BACKLOG, workflow.SEM_GPU):
        assert int(sem[key]) > 0
    # the GPU semaphore should not admit more GPU pods than the pool can hold
    pool = _find(checks.kustomize_build(KARPENTER), "NodePool")[0]
    assert int(sem[workflow.SEM_GPU]) == int(pool["spec"]["limits"]["nvidia.com/gpu"])
    prios = {d["metadata"]["name"]: d for d in _find(docs, "PriorityClass")}
    assert prios[workflow.PRIORITY_LIVE]["value"] > prios[workflow.PRIORITY_BACKLOG]["value"]
    assert prios[workflow.PRIORITY_BACKLOG]["preemptionPolicy"] == "Never"
    repo_cm, key = workflow.ARTIFACT_REPOSITORY
    repo = yaml.safe_load(cms[repo_cm]["data"][key])
    assert repo["archiveLogs"] is True and repo["s3"]["bucket"]
    assert repo["s3"]["accessKeySecret"]["name"] == "gppy-s3"
    for v in t["spec"]["volumes"]:
        assert "configMap" not in v or v["configMap"]["name"] in cms
    assert workflow.CONFIG_FILE in cms["gppy-config"]["data"]
    for tpl in t["spec"]["templates"]:
        for ref in (tpl.get("container") or {}).get("envFrom", []):
            if "configMapRef" in ref:
                assert ref["configMapRef"]["name"] in cms
    assert {d["metadata"]["namespace"] for d in docs if "namespace" in d["metadata"]} == {workflow.NAMESPACE}


# --- Pod Security "restricted" -----------------------------------------------------------------
# The rules of https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline and
# restricted), written out here from the standard, plus the read-only root filesystem this
# project asks of every container. Applied to every pod that can run in the namespace: the
# watcher's CronJob and each pod of the night workflow (its container template plus the init and
# wait containers Argo adds, as the template's podSpecPatch sets them).

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(pod: dict) -> list[str]:
    out = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"pod: {key}")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    containers = (pod.get("initContainers") or []) + (pod.get("containers") or [])
    if not containers:
        out.append("pod: no containers")
    for c in containers:
        sc, name = c.get("securityContext") or {}, c.get("name")
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation not false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities not dropped")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities added")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runs as uid 0")
        profile = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccomp profile {profile}")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: root filesystem writable")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
    return out


def _workflow_pods(template: dict) -> dict[str, dict]:
    """Each container template's pod as Argo makes it: the template's pod settings, the main
    container, and Argo's init and wait containers merged with the podSpecPatch."""
    import json

    spec = template["spec"]
    patch = json.loads(spec.get("podSpecPatch") or "{}")
    argo = {"initContainers": [{"name": "init"}], "containers": [{"name": "wait"}]}
    for field, extra in argo.items():
        for c in extra:
            c.update(next((p for p in patch.get(field, []) if p["name"] == c["name"]), {}))
    pods = {}
    for t in spec["templates"]:
        if "container" not in t:
            continue
        main = dict(t["container"], name="main")
        pods[t["name"]] = {"securityContext": spec.get("securityContext"), "volumes": spec.get("volumes"),
                           "initContainers": argo["initContainers"], "containers": [main] + argo["containers"]}
    return pods


def test_every_pod_passes_pod_security_restricted(docs):
    ns = _find(docs, "Namespace", workflow.NAMESPACE)[0]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = {f"cronjob {d['metadata']['name']}": d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            for d in _find(docs, "CronJob")}
    template = _find(docs, "WorkflowTemplate", workflow.TEMPLATE_NAME)[0]
    pods.update({f"workflow {k}": v for k, v in _workflow_pods(template).items()})
    assert len(pods) > 5
    bad = {name: v for name, pod in pods.items() if (v := restricted_violations(pod))}
    assert bad == {}
    # the read-only root leaves the stages /tmp and the scratch root, and says where it is
    for name, pod in _workflow_pods(template).items():
        main = pod["containers"][0]
        assert {v["mountPath"] for v in main["volumeMounts"]} >= {"/tmp", "/scratch"}, name
        assert {"name": "GPPY_SCRATCH", "value": "/scratch"} in main["env"], name


def test_the_restricted_check_catches_what_it_should(docs):
    template = _find(docs, "WorkflowTemplate", workflow.TEMPLATE_NAME)[0]
    pod = copy.deepcopy(next(iter(_workflow_pods(template).values())))
    assert restricted_violations(pod) == []
    pod["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
    pod["containers"][1]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["initContainers"][0].pop("securityContext")
    found = restricted_violations(pod)
    assert "main: root filesystem writable" in found and "wait: allowPrivilegeEscalation not false" in found
    assert "volume host: ['hostPath']" in found and "init: capabilities not dropped" in found
