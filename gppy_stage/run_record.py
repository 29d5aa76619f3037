"""What a night's run did, from the stages' result records (``results/<stage>/<item>.json``):
each stage's count per status, the failures, the night's exit code and the time per stage; the
run part of the night report (``report.py``), in one place for curate and the local runner.
"""

from __future__ import annotations

from . import errors, graph
from .stages.base import STATUSES, utcnow


def this_run(records: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """The records of the night's latest run. Every run starts with its plan, so a stage's record
    that started before the plan's is left from an earlier run (a frame whose chain stopped sooner
    this time); a record that names no start, or not a stage of the graph (the watcher's), stays."""
    since = (records.get("plan", {}).get("night") or {}).get("started") or ""
    stages = {s.name for s in graph.STAGES}
    return {stage: {item: r for item, r in items.items()
                    if stage not in stages or (r.get("started") or since) >= since}
            for stage, items in records.items()}


def run_part(plan: dict, records: dict[str, dict[str, dict]]) -> dict:
    """What ran: each stage's count per status, the failures (the plan's quarantine first), the
    night's exit code, the time per stage and every record, in the graph's order (pure)."""
    order = {s.name: i for i, s in enumerate(graph.STAGES)}
    flat = sorted((r for items in records.values() for r in items.values()),
                  key=lambda r: (order.get(r.get("stage"), len(order)), r.get("stage") or "", r.get("item") or ""))
    stages: dict[str, dict[str, int]] = {}
    for r in flat:
        counts = stages.setdefault(r.get("stage"), dict.fromkeys(STATUSES, 0))
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    failures = [dict(q, status="quarantined") for q in plan.get("quarantine", [])]
    failures += [_failure(r) for r in flat if r.get("status") in ("quarantined", "failed")]
    return {"started": min((r["started"] for r in flat if r.get("started")), default=None), "finished": utcnow(),
            "exit_code": night_exit_code(failures), "stages": stages, "failures": failures,
            "timing": _timing(flat), "records": flat}


# when failures differ, the one an operator must act on first: a bug, then a configuration, then
# a tool; a night whose only failures were retriable is retriable as a whole
_SEVERITY = (errors.BUG, errors.CONFIG, errors.TOOL_FAILURE, errors.RETRIABLE)


def night_exit_code(failures: list[dict]) -> int:
    """0 when no stage run failed (a quarantine is not a failure), else the most severe exit code
    among the failed runs."""
    codes = {f["exit_code"] for f in failures if f.get("status") == "failed" and f.get("exit_code") is not None}
    for code in _SEVERITY:
        if code in codes:
            return code
    return max(codes) if codes else errors.OK


def _failure(record: dict) -> dict:
    err = record.get("error") or {}
    return {"stage": record.get("stage"), "item": record.get("item"), "status": record.get("status"),
            "kind": err.get("kind"), "exit_code": record.get("exit_code"), "reason": err.get("reason"),
            "file": err.get("file")}


def _timing(records: list[dict]) -> dict[str, dict]:
    secs: dict[str, list[float]] = {}
    for r in records:
        secs.setdefault(r.get("stage"), []).append(r.get("seconds") or 0.0)
    return {stage: {"count": len(v), "total_s": round(sum(v), 2), "max_s": round(max(v), 2)} for stage, v in secs.items()}
