"""Submit a night's workflow once its raw folder has stopped growing; submit backlogs.

A night ``obsdata/<unit>/<night>/`` is ready when its object count and total bytes are the same as
at the previous poll and its newest object is older than the quiet period. Observations live in
the bucket (``runs/_watcher/state.json``), so the watcher CronJob keeps nothing between runs.

Exactly once: the Workflow's name is derived from unit and night, so the Kubernetes API itself
refuses a second one (409 AlreadyExists), whichever watcher (or backlog) comes second. A marker
object (``runs/_watcher/submitted/<unit>/<night>.json``) then stops the watcher looking at that
night again. Slack hears about a night only from the submission that created it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone

from .. import log, storage
from ..errors import ConfigError, GppyError, RetriableError
from ..names import NightName, night_date_of
from . import workflow

STATE_KEY = "runs/_watcher/state.json"
MARKER_PREFIX = "runs/_watcher/submitted"
SLACK_ENV = "SLACK_WEBHOOK_URL"  # what gppy_stage.notify reads
_log = log.get("watcher")


# --- names ----------------------------------------------------------------------------------


def workflow_name(unit: str, night: str) -> str:
    """A DNS-safe name fixed by unit and night: ``gppy-7dt03-2025-01-01-gain2750-3f9a1c``.

    The readable part is lowercased (Kubernetes names must be), so the short hash of the exact
    folder name keeps ``..._ToO`` and ``..._too`` (or ``_ToO_gain`` vs ``_gain_ToO``) apart.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", f"{unit}-{night}".lower()).strip("-")
    digest = hashlib.sha256(f"{unit}/{night}".encode()).hexdigest()[:6]
    # 63 keeps pod names derived from it within Kubernetes' label-length limits
    return f"gppy-{readable[: 63 - 5 - 7]}-{digest}".replace("--", "-")


def _label(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63]
    return value.strip("-._")


def night_labels(unit: str, night: NightName, kind: str) -> dict[str, str]:
    return {
        "gppy.io/obs": _label(unit),
        "gppy.io/night": _label(night.folder),
        "gppy.io/submitted-by": kind,
        "gppy.io/too": "true" if night.too else "false",
    }


# --- Kubernetes ---------------------------------------------------------------------------


def kube_api(kubeconfig: str | None = None):
    """CustomObjectsApi from the pod's service account, else from a kubeconfig (``$KUBECONFIG``)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig:
            raise config.ConfigException("kubeconfig given")
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except (config.ConfigException, FileNotFoundError, TypeError) as exc:
            raise ConfigError(f"no Kubernetes API: not in a cluster and no usable kubeconfig ({exc})") from exc
    return client.CustomObjectsApi(client.ApiClient(cfg))


def submit(api, namespace: str, body: dict) -> str:
    """Create the Workflow: ``"created"``, or ``"exists"`` when one of that name is already there."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        api.create_namespaced_custom_object("argoproj.io", "v1alpha1", namespace, "workflows", body)
        return "created"
    except ApiException as exc:
        if exc.status == 409:
            return "exists"
        if exc.status in (401, 403):
            raise ConfigError(f"the Kubernetes API refused to create workflows in {namespace} ({exc.status})") from None
        if exc.status == 429 or exc.status >= 500:
            raise RetriableError(f"Kubernetes API answered {exc.status}: try again") from None
        raise ConfigError(f"Kubernetes API rejected the workflow ({exc.status}): {exc.body}") from None
    except HTTPError as exc:
        raise RetriableError(f"cannot reach the Kubernetes API ({type(exc).__name__})") from None


# --- Slack ----------------------------------------------------------------------------------


def notify(text: str) -> bool:
    """Tell Slack through the one Slack client (``SLACK_WEBHOOK_URL``, or a bot token); without
    settings it logs what it would send. A Slack outage never stops the watcher."""
    from ..notify import Slack

    try:
        return Slack.from_env().send(text)["sent"]
    except GppyError as exc:  # the message names no secret (notify.Slack redacts them)
        log.event(_log, "slack message not sent", level=30, reason=exc.reason)
        return False


# --- the watcher ------------------------------------------------------------------------------


@dataclass
class Observation:
    count: int
    bytes: int
    newest: float  # mtime of the newest object, seconds since the epoch
    polled: float

    def same_size(self, other: "Observation") -> bool:
        return (self.count, self.bytes) == (other.count, other.bytes)


@dataclass
class Decision:
    unit: str
    night: str
    action: str  # growing | settling | submitted | exists | skipped-test | would-submit
    workflow: str | None = None
    count: int = 0
    bytes: int = 0


def load_state(root: str) -> dict:
    url = storage.join(root, STATE_KEY)
    try:
        state = json.loads(storage.get_bytes(url))
    except storage.NotFoundError:
        return {"version": 1, "nights": {}}
    except ValueError:
        # a damaged state only costs one extra poll of settling; never block submissions on it
        log.event(_log, "state unreadable; starting afresh", level=30, url=url)
        return {"version": 1, "nights": {}}
    state.setdefault("nights", {})
    return state


def save_state(root: str, state: dict) -> None:
    storage.put_bytes(storage.join(root, STATE_KEY), json.dumps(state, indent=1, sort_keys=True).encode())


def marker_url(root: str, unit: str, night: str) -> str:
    return storage.join(root, MARKER_PREFIX, unit, f"{night}.json")


def candidate_nights(root: str, unit: str, since: date | None = None,
                     until: date | None = None) -> list[NightName]:
    """Night folders of a unit (regular, ToO, test...) with dates in [since, until], oldest first."""
    from ..stages.plan import night_folders

    return [n for n in night_folders(root, unit) if not ((since and n.day < since) or (until and n.day > until))]


def observe(root: str, unit: str, night: str, now: float) -> Observation:
    objs = storage.list_objects(storage.join(root, "obsdata", unit, night))
    return Observation(
        count=len(objs),
        bytes=sum(o.size for o in objs),
        newest=max((o.mtime for o in objs), default=0.0),
        polled=now,
    )


def poll(root: str, units: list[str], api, *, namespace: str = workflow.NAMESPACE, quiet_s: float = 1800,
         lookback_days: int = 7, include_test: bool = False, dry_run: bool = False,
         now: float | None = None) -> list[Decision]:
    """One poll: observe recent nights of each unit, submit those that stopped growing."""
    if not units:
        raise ConfigError("no units to watch (set --units or GPPY_UNITS)")
    now = time.time() if now is None else now
    since = datetime.fromtimestamp(now, timezone.utc).date() - timedelta(days=lookback_days)
    state = load_state(root)
    seen: dict[str, dict] = {}
    decisions: list[Decision] = []
    for unit in units:
        for night in candidate_nights(root, unit, since=since):
            key = f"{unit}/{night.folder}"
            if night.test and not include_test:
                decisions.append(Decision(unit, night.folder, "skipped-test"))
                continue
            if storage.exists(marker_url(root, unit, night.folder)):
                continue
            if not night.too and night.date >= night_date_of(datetime.fromtimestamp(now, timezone.utc).replace(tzinfo=None)):
                # a quiet folder mid-night is clouds, not the end: regular nights wait for the night to
                # be over (noon UTC after it); ToO nights go as soon as they stop growing
                decisions.append(Decision(unit, night.folder, "in-progress"))
                continue
            cur = observe(root, unit, night.folder, now)
            seen[key] = asdict(cur)
            prev = state["nights"].get(key)
            d = Decision(unit, night.folder, "growing", count=cur.count, bytes=cur.bytes)
            decisions.append(d)
            if cur.count == 0 or prev is None or not cur.same_size(Observation(**prev)):
                continue
            if now - cur.newest < quiet_s:
                d.action = "settling"
                continue
            d.workflow = workflow_name(unit, night.folder)
            if dry_run:
                d.action = "would-submit"
                log.event(_log, "would submit", unit=unit, night=night.folder, workflow=d.workflow)
                continue
            body = workflow.night_workflow(unit, night.folder, too=night.too, name=d.workflow, root=root,
                                           labels=night_labels(unit, night, "watcher"))
            d.action = "submitted" if submit(api, namespace, body) == "created" else "exists"
            storage.put_bytes(marker_url(root, unit, night.folder), json.dumps(
                {"workflow": d.workflow, "namespace": namespace, "at": now, "result": d.action,
                 "count": cur.count, "bytes": cur.bytes}).encode())
            log.event(_log, d.action, unit=unit, night=night.folder, workflow=d.workflow,
                      files=cur.count, bytes=cur.bytes)
            if d.action == "submitted":
                kind = " (ToO)" if night.too else ""
                notify(f"new night detected: {unit} {night.folder}{kind}, {cur.count} files, "
                       f"{cur.bytes / 1e9:.1f} GB; workflow {namespace}/{d.workflow} submitted")
    if not dry_run:
        # only nights still being watched are kept, so the state stays small
        state = {"version": 1, "nights": seen, "updated": now}
        save_state(root, state)
    return decisions


def watch(root: str, units: list[str], api, *, interval_s: float = 300, once: bool = False, **kwargs) -> None:
    while True:
        try:
            poll(root, units, api, **kwargs)
        except RetriableError as exc:
            if once:
                raise
            log.event(_log, "poll failed; will try again", level=30, error=str(exc))
        if once:
            return
        time.sleep(interval_s)


# --- backlog ---------------------------------------------------------------------------------


def backlog(root: str, obs: str, date_from: date, date_to: date, api, *, namespace: str = workflow.NAMESPACE,
            include_test: bool = False, dry_run: bool = False) -> list[Decision]:
    """One low-priority workflow per night of ``obs`` in [date_from, date_to], oldest first."""
    if date_to < date_from:
        raise ConfigError(f"--to {date_to} is before --from {date_from}")
    out = []
    for night in candidate_nights(root, obs, since=date_from, until=date_to):
        if night.test and not include_test:
            out.append(Decision(obs, night.folder, "skipped-test"))
            continue
        name = workflow_name(obs, night.folder)
        d = Decision(obs, night.folder, "would-submit", workflow=name)
        if not dry_run:
            body = workflow.night_workflow(obs, night.folder, backlog=True, name=name, root=root,
                                           labels=night_labels(obs, night, "backlog"))
            d.action = "submitted" if submit(api, namespace, body) == "created" else "exists"
            log.event(_log, d.action, unit=obs, night=night.folder, workflow=name, priority="backlog")
        out.append(d)
    return out
