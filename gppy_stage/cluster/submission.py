"""The Workflow object that runs the night template: what ``argo submit workflows/night.yaml``,
the watcher and the backlog submit. Plain dicts, no Hera: the watcher imports this every poll.
The template itself is built in ``workflow.py``, which re-exports these names."""

from __future__ import annotations

TEMPLATE_NAME = "gppy-night"
NAMESPACE = "gppy"
SEMAPHORE_CONFIGMAP = "gppy-semaphores"
# semaphore keys (in k8s/semaphores.yaml): concurrent live nights, concurrent backlog nights,
# concurrent GPU pods across all nights
SEM_NIGHTS, SEM_BACKLOG, SEM_GPU = "nights", "backlog", "gpu"
PRIORITY_LIVE, PRIORITY_BACKLOG = "gppy-live", "gppy-backlog"
# Argo's own ordering between workflows (queue order under one semaphore)
WORKFLOW_PRIORITY_TOO, WORKFLOW_PRIORITY_LIVE, WORKFLOW_PRIORITY_BACKLOG = 20, 10, 1


def night_workflow(obs: str | None = None, night: str | None = None, *, backlog: bool = False,
                   too: bool = False, name: str | None = None, labels: dict | None = None,
                   root: str | None = None) -> dict:
    """A Workflow that runs the night template: the committed ``night.yaml`` (no values) or one the
    watcher/backlog submit (obs and night filled, a deterministic name)."""
    params = []
    if obs is None:
        params.append({"name": "obs"})
    else:
        params.append({"name": "obs", "value": obs})
        params.append({"name": "night", "value": night or ""})
        if root:
            params.append({"name": "root", "value": root})
    meta: dict = {"namespace": NAMESPACE}
    if name:
        meta["name"] = name
    else:
        meta["generateName"] = "gppy-night-"
    meta["labels"] = {"app.kubernetes.io/name": "gppy-stage", "app.kubernetes.io/component": "night", **(labels or {})}
    spec: dict = {"workflowTemplateRef": {"name": TEMPLATE_NAME}, "arguments": {"parameters": params}}
    if backlog:
        params.append({"name": "priority-class", "value": PRIORITY_BACKLOG})
        # a separate semaphore: backlog nights never hold a slot a live night is waiting for
        spec["synchronization"] = {
            "semaphores": [{"configMapKeyRef": {"name": SEMAPHORE_CONFIGMAP, "key": SEM_BACKLOG}}]
        }
        spec["priority"] = WORKFLOW_PRIORITY_BACKLOG
    elif too:
        # a Target-of-Opportunity night jumps the queue of live nights waiting for a semaphore slot
        spec["priority"] = WORKFLOW_PRIORITY_TOO
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": meta, "spec": spec}
