"""The notify stage: a Slack message when a night finishes or fails (the workflow's exit handler).

``run(ctx, status)`` gets Argo's ``{{workflow.status}}`` (Succeeded, Failed, Error) or, locally,
None (then the report decides: failures make it "Completed with failures"). It reads the night
report the curate stage wrote, or builds one when curate did not get that far, and posts counts,
depth, seeing, the best candidates and where the products are. ``notify_start(ctx, plan_summary)``
is the message the plan stage sends when a night starts. Without Slack settings both only log.
"""

from __future__ import annotations

import json

from .. import log, report, storage
from ..config import settings
from ..errors import GppyError
from ..notify import Slack
from .base import Night

_log = log.get("notify")
OK_STATUSES = ("succeeded", "success", "done")


def _load_report(ctx: Night) -> tuple[dict | None, str | None]:
    url = ctx.url(ctx.run_prefix, report.REPORT_JSON)
    if storage.exists(url):
        try:
            return json.loads(storage.get_bytes(url)), None
        except ValueError:
            pass
    try:
        return report.build(report.collect(ctx.root, ctx.unit, ctx.night)), None
    except (GppyError, KeyError, ValueError) as exc:
        return None, getattr(exc, "reason", str(exc))


def _fmt(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def finish_message(ctx: Night, rep: dict | None, status: str | None, why_no_report: str | None = None,
                   top: int = 5) -> str:
    """The text of the finish/failure message (pure: the report and status in, text out)."""
    failures = rep["counts"]["failures"] if rep else None
    if status is None:
        status = "Completed" if rep and not failures else "Completed with failures" if rep else "Unknown"
    good = status.lower() in OK_STATUSES or status == "Completed"
    icon = ":x:" if not good else ":warning:" if failures else ":white_check_mark:"
    lines = [f"{icon} *{ctx.unit} {ctx.night}*: night {status}"]
    if rep is None:
        lines.append(f"no night report: {why_no_report or 'the night was not planned'}")
        lines.append(f"logs and results: {ctx.url(ctx.run_prefix)}")
        return "\n".join(lines)
    c = rep["counts"]
    lines.append(f"frames {c['science_done']}/{c['science_planned']} ({c['raw_frames']} raw), "
                 f"stacks {c['stacks_done']}/{c['stacks_planned']}, failures {c['failures']}, flagged {c['flagged']}")
    lines.append(f"depth (5 sigma): frames median {_fmt(rep['depth']['frame_median'])}, best stack "
                 f"{_fmt(rep['depth']['stack_best'])}; seeing median {_fmt(rep['seeing_median'])}\"")
    lines.append(f"candidates: {c['candidates_pass']} passing of {c['candidates']}")
    for cand in rep.get("candidates", [])[:top]:
        lines.append(f"  - {cand['stack']} #{cand['id']}: RA {_fmt(cand['ra'], 5)} Dec {_fmt(cand['dec'], 5)} "
                     f"mag {_fmt(cand['mag'])} S/N {_fmt(cand['snr'], 1)} score {_fmt(cand['score'])}"
                     f" real/bogus {_fmt(cand.get('rb_score'))}"
                     + (f" host {_fmt(cand['host_sep'], 1)}\" ({_fmt(cand.get('host_dlr'))} light radii, mag "
                        f"{_fmt(cand.get('host_mag'))})" if cand.get("host_sep") is not None else " no host")
                     + (f" stamp {ctx.url(cand['stamp'])}" if cand.get("stamp") else ""))
    for f in rep.get("failures", [])[:top]:
        lines.append(f"  ! {f.get('stage')} {f.get('item') or f.get('file') or ''}: {f.get('reason')}")
    if len(rep.get("failures", [])) > top:
        lines.append(f"  ! ... and {len(rep['failures']) - top} more")
    folders = sorted({s["output"].rsplit("/", 1)[0] for s in rep.get("stacks", [])} |
                     {f["output"].rsplit("/", 1)[0] for f in rep.get("frames", [])})
    lines.append("products: " + ", ".join(ctx.url(f) for f in folders) if folders else "products: none")
    lines.append(f"report: {ctx.url(ctx.run_prefix, report.REPORT_MD)}")
    return "\n".join(lines)


def run(ctx: Night, status: str | None = None) -> dict:
    cfg = settings("notify")
    rep, why = _load_report(ctx)
    text = finish_message(ctx, rep, status, why, top=int(cfg["top_candidates"]))
    sent = Slack.from_env(timeout=float(cfg["timeout_s"])).send(text)
    return {"status": status, "sent": sent["sent"], "mode": sent["mode"], "chars": len(text)}


def start_message(ctx: Night, plan_summary: dict) -> str:
    keys = ("raw_frames", "calsets", "frames", "stacks", "quarantined")
    parts = [f"{k.replace('_', ' ')} {plan_summary[k]}" for k in keys if k in plan_summary]
    return f":telescope: *{ctx.unit} {ctx.night}*: night started ({', '.join(parts) or 'planned'})"


def notify_start(ctx: Night, plan_summary: dict) -> dict:
    """Announce a night (called by the plan stage with its summary). Never fails the plan: a
    Slack outage is logged, not raised."""
    text = start_message(ctx, plan_summary)
    try:
        sent = Slack.from_env(timeout=float(settings("notify")["timeout_s"])).send(text)
    except GppyError as exc:
        log.event(_log, "start message not sent", level=30, reason=exc.reason)
        return {"sent": False, "error": exc.reason}
    return {"sent": sent["sent"], "mode": sent["mode"]}
