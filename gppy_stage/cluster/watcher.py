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

import json
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta, timezone

from .. import log, storage
from ..errors import ConfigError, GppyError, RetriableError
from ..names import NightName, night_date_of
from . import submission
from .workflow_names import night_labels, workflow_name

STATE_KEY = "runs/_watcher/state.json"
MARKER_PREFIX = "runs/_watcher/submitted"
SLACK_ENV = "SLACK_WEBHOOK_URL"  # what gppy_stage.notify reads
_log = log.get("watcher")


# --- Kubernetes ---------------------------------------------------------------------------


def kube_api(kubeconfig: str | None = None):
    """CustomObjectsApi from the pod's service account, else from a kubeconfig (``$KUBECONFIG``)."""
    try:
        from kubernetes import client, config
    except ModuleNotFoundError as exc:
        # the client is the [cluster] extra, not a runtime dependency: say so, not "a bug"
        raise ConfigError(f"the Kubernetes client is not installed ({exc.name}): "
                          "pip install 'gppy-stage[cluster]'") from None

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
    action: str  # growing | settling | submitted | exists | skipped-test | would-submit | late-files
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


def _listing(root: str, unit: str, night: str) -> list[storage.ObjectInfo]:
    return storage.list_objects(storage.join(root, "obsdata", unit, night))


def observe(root: str, unit: str, night: str, now: float,
            listing: list[storage.ObjectInfo] | None = None) -> Observation:
    objs = _listing(root, unit, night) if listing is None else listing
    return Observation(
        count=len(objs),
        bytes=sum(o.size for o in objs),
        newest=max((o.mtime for o in objs), default=0.0),
        polled=now,
    )


def _write_marker(root: str, unit: str, night: str, marker: dict) -> None:
    storage.put_bytes(marker_url(root, unit, night), json.dumps(marker, indent=1).encode())


def read_marker(root: str, unit: str, night: str) -> dict | None:
    try:
        return json.loads(storage.get_bytes(marker_url(root, unit, night)))
    except storage.NotFoundError:
        return None
    except ValueError:
        log.event(_log, "submission marker unreadable; treating the night as submitted", level=30,
                  unit=unit, night=night)
        return {}


# --- late files: what arrived after a night was submitted ----------------------------------------


def late_record_url(root: str, unit: str, night: str) -> str:
    """A stage-result record of the night, so the night report lists late files among its failures."""
    return storage.join(root, "runs", unit, night, "results", "watcher", "late-files.json")


def resubmit_command(unit: str, night: str) -> str:
    return f"gppy watch --resubmit {unit} {night}"


def check_late(root: str, unit: str, night: str, marker: dict, now: float) -> Decision | None:
    """A submitted night whose folder changed since: say so once per change (log, Slack and a
    record the night report shows), and how to resubmit. None when nothing changed."""
    objs = _listing(root, unit, night)
    cur = observe(root, unit, night, now, objs)
    if "count" not in marker or (cur.count, cur.bytes) == (marker["count"], marker.get("bytes")):
        return None
    known = set(marker.get("files") or [])
    new = sorted(o.key for o in objs if o.key not in known) if known else []
    late = {"count": cur.count, "bytes": cur.bytes, "files": new}
    d = Decision(unit, night, "late-files", workflow=marker.get("workflow"), count=cur.count, bytes=cur.bytes)
    if marker.get("late") and {k: marker["late"].get(k) for k in late} == late:
        return d  # already reported, the operator has not resubmitted yet
    what = f"{len(new)} new file(s)" if known else f"{cur.count - marker['count']:+d} file(s)"
    reason = (f"{what} arrived after the night was submitted ({marker['count']} files then, {cur.count} now"
              f"{': ' + ', '.join(new[:5]) if new else ''}{' ...' if len(new) > 5 else ''}); "
              f"they are not processed until it is resubmitted: {resubmit_command(unit, night)}")
    log.event(_log, "late files", level=30, unit=unit, night=night, workflow=d.workflow, submitted_files=marker["count"],
              files=cur.count, new=new[:20])
    storage.put_bytes(late_record_url(root, unit, night), json.dumps({
        "stage": "watcher", "item": "late-files", "status": "failed", "exit_code": None,
        "error": {"kind": "late_files", "reason": reason, "file": None},
        "files": new, "submitted": {k: marker.get(k) for k in ("workflow", "count", "bytes", "at")},
        "now": {"count": cur.count, "bytes": cur.bytes}, "detected": now,
        "resubmit": resubmit_command(unit, night)}, indent=1).encode())
    _write_marker(root, unit, night, {**marker, "late": {**late, "detected": now}})
    notify(f":warning: late files: {unit} {night}: {reason}")
    return d


def poll(root: str, units: list[str], api, *, namespace: str = submission.NAMESPACE, quiet_s: float = 1800,
         lookback_days: int = 7, include_test: bool = False, dry_run: bool = False,
         now: float | None = None, min_gap_s: float = 0.0) -> list[Decision]:
    """One poll: observe recent nights of each unit, submit those that stopped growing.

    "Stopped growing" means the same size as an observation at least ``min_gap_s`` old: the
    state keeps when the current size was first seen, so a second watcher polling a moment
    after the first (whose observation it reads back) does not count as a later poll and take
    a night that grew since the last round for a finished one."""
    if not units:
        raise ConfigError("no units to watch (set --units or GPPY_UNITS)")
    now = time.time() if now is None else now
    since = datetime.fromtimestamp(now, timezone.utc).date() - timedelta(days=lookback_days)
    state = load_state(root)
    seen: dict[str, dict] = {}
    decisions: list[Decision] = []
    for unit in units:
        for night in candidate_nights(root, unit, since=since):
            d = _poll_night(root, unit, night, api, state["nights"], seen, namespace=namespace, quiet_s=quiet_s,
                            include_test=include_test, dry_run=dry_run, now=now, min_gap_s=min_gap_s)
            if d is not None:
                decisions.append(d)
    if not dry_run:
        # only nights still being watched are kept, so the state stays small
        state = {"version": 1, "nights": seen, "updated": now}
        save_state(root, state)
    return decisions


def _poll_night(root: str, unit: str, night: NightName, api, previous: dict, seen: dict, *, namespace: str,
                quiet_s: float, include_test: bool, dry_run: bool, now: float, min_gap_s: float) -> Decision | None:
    """One night folder in a poll: skipped, checked for late files once submitted, else its size
    recorded in ``seen`` and the night submitted once quiet. None: submitted before, nothing new."""
    key = f"{unit}/{night.folder}"
    if night.test and not include_test:
        return Decision(unit, night.folder, "skipped-test")
    marker = read_marker(root, unit, night.folder)
    if marker is not None:
        return check_late(root, unit, night.folder, marker, now) if not dry_run else None
    if not night.too and night.date >= night_date_of(datetime.fromtimestamp(now, timezone.utc).replace(tzinfo=None)):
        # a quiet folder mid-night is clouds, not the end: regular nights wait for the night to
        # be over (noon UTC after it); ToO nights go as soon as they stop growing
        return Decision(unit, night.folder, "in-progress")
    objs = _listing(root, unit, night.folder)
    cur = observe(root, unit, night.folder, now, objs)
    prev = previous.get(key)
    unchanged = prev is not None and cur.same_size(Observation(**prev))
    # an unchanged size keeps the time it was first seen: that is what the gap is measured from
    seen[key] = dict(asdict(cur), polled=prev["polled"]) if unchanged else asdict(cur)
    d = Decision(unit, night.folder, "growing", count=cur.count, bytes=cur.bytes)
    if cur.count == 0 or not unchanged or now - prev["polled"] < min_gap_s:
        return d
    if now - cur.newest < quiet_s:
        d.action = "settling"
        return d
    d.workflow = workflow_name(unit, night.folder)
    if dry_run:
        d.action = "would-submit"
        log.event(_log, "would submit", unit=unit, night=night.folder, workflow=d.workflow)
        return d
    _submit_quiet_night(root, unit, night, d, cur, objs, api, namespace, now)
    return d


def _submit_quiet_night(root: str, unit: str, night: NightName, d: Decision, cur: Observation,
                        objs: list[storage.ObjectInfo], api, namespace: str, now: float) -> None:
    d.action = _submit_night(api, namespace, root, unit, night.folder, night, d.workflow, "watcher", too=night.too)
    # the file list lets a later poll name the files that arrive after this
    _write_marker(root, unit, night.folder, {
        "workflow": d.workflow, "namespace": namespace, "at": now, "result": d.action,
        "count": cur.count, "bytes": cur.bytes, "files": sorted(o.key for o in objs)})
    log.event(_log, d.action, unit=unit, night=night.folder, workflow=d.workflow,
              files=cur.count, bytes=cur.bytes)
    if d.action == "submitted":
        kind = " (ToO)" if night.too else ""
        notify(f"new night detected: {unit} {night.folder}{kind}, {cur.count} files, "
               f"{cur.bytes / 1e9:.1f} GB; workflow {namespace}/{d.workflow} submitted")


def _submit_night(api, namespace: str, root: str, unit: str, folder: str, night: NightName, workflow: str,
                  kind: str, **options) -> str:
    """Create the night's Workflow: ``"submitted"``, or ``"exists"`` when that name already ran."""
    body = submission.night_workflow(unit, folder, name=workflow, root=root, labels=night_labels(unit, night, kind),
                                     **options)
    return "submitted" if submit(api, namespace, body) == "created" else "exists"


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


def resubmit(root: str, unit: str, night: str, api, *, namespace: str = submission.NAMESPACE,
             dry_run: bool = False, now: float | None = None) -> Decision:
    """Submit a night again (after late files, or to redo it): a new workflow named
    ``<name>-r<n>``; the stages skip what is already made from the same inputs, so only what the
    new files change is redone. The marker then records the folder as it is now."""
    from .. import config
    from ..errors import BadInputError
    from ..names import parse_night

    now = time.time() if now is None else now
    config.instrument(unit)  # an operator's typo is a clear error, not an empty listing
    try:
        name = parse_night(night, config.site(unit).night_folder)
    except BadInputError as exc:
        raise ConfigError(f"--resubmit {unit} {night}: {exc.reason}") from None
    objs = _listing(root, unit, night)
    if not objs:
        raise ConfigError(f"{storage.join(root, 'obsdata', unit, night)} holds no files: nothing to resubmit")
    marker = read_marker(root, unit, night) or {}
    attempt = len(marker.get("resubmissions", [])) + 1 if marker else 0
    cur = observe(root, unit, night, now, objs)
    d = Decision(unit, night, "would-submit", workflow=workflow_name(unit, night, attempt), count=cur.count,
                 bytes=cur.bytes)
    if dry_run:
        return d
    d.action = _submit_night(api, namespace, root, unit, night, name, d.workflow, "resubmit", too=name.too)
    history = marker.get("resubmissions", []) + [{"workflow": d.workflow, "at": now, "result": d.action,
                                                   "count": cur.count, "late": marker.get("late")}]
    _write_marker(root, unit, night, {
        "workflow": d.workflow, "namespace": namespace, "at": now, "result": d.action, "count": cur.count,
        "bytes": cur.bytes, "files": sorted(o.key for o in objs), "resubmissions": history,
        "first": marker.get("first") or {k: marker.get(k) for k in ("workflow", "at", "count")}})
    late_url = late_record_url(root, unit, night)
    if storage.exists(late_url):
        # no longer a failure of the night: the report shows it as resubmitted
        record = json.loads(storage.get_bytes(late_url))
        record.update(status="done", resubmitted={"workflow": d.workflow, "at": now})
        storage.put_bytes(late_url, json.dumps(record, indent=1).encode())
    log.event(_log, "resubmitted", unit=unit, night=night, workflow=d.workflow, result=d.action, files=cur.count)
    if d.action == "submitted":
        notify(f"night resubmitted: {unit} {night}, {cur.count} files; workflow {namespace}/{d.workflow}")
    return d


# --- backlog ---------------------------------------------------------------------------------


def backlog(root: str, obs: str, date_from: date, date_to: date, api, *, namespace: str = submission.NAMESPACE,
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
            d.action = _submit_night(api, namespace, root, obs, night.folder, night, name, "backlog", backlog=True)
            log.event(_log, d.action, unit=obs, night=night.folder, workflow=name, priority="backlog")
        out.append(d)
    return out
