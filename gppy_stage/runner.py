"""The local runner: a night through every stage of the graph on one machine.

Stages run in the order of ``graph.STAGES``; consecutive stages of the same fan-out form a chain
that runs per item in one worker (reduce -> astrometry -> photometry for a frame), on a process
pool, with a progress bar. A chain stops at its first failure; other items go on. The night
report (``runs/<unit>/<night>/report.json``) lists what was done, skipped and quarantined, with
reasons, and the time each stage took.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from . import errors, graph, log, scratch
from .stages.base import Night, utcnow

_log = log.get("runner")


def execute(stage_name: str, root: str, unit: str, night: str, item: str | None = None, force: bool = False,
            **extra) -> dict:
    """Run one stage invocation and describe the outcome; never raises for a typed error.

    This is what a ``gppy stage`` command and each local worker do, so the two cannot differ.
    """
    stage = graph.stage(stage_name)
    ctx = Night(root=root, unit=unit, night=night, force=force)
    t0 = time.perf_counter()
    record = {"stage": stage_name, "item": item, "unit": unit, "night": night, "started": utcnow()}
    try:
        # every temporary file of the stage (the tools' folders, downloads) lands in a folder of
        # this invocation's own, which the next invocation removes if this one is killed
        with scratch.invocation(stage_name):
            result = stage.function()(ctx, item, **extra) if item is not None else stage.function()(ctx, **extra)
        record.update(status="skipped" if result.get("skipped") else "done", exit_code=errors.OK, result=result)
    except Exception as exc:  # typed errors become statuses; anything else is a bug, still reported
        code = errors.exit_code_for(exc)
        status = "quarantined" if code == errors.BAD_INPUT else "failed"
        reason = exc.reason if isinstance(exc, errors.GppyError) else f"{type(exc).__name__}: {exc}"
        record.update(status=status, exit_code=code, error={"kind": getattr(exc, "kind", "bug"), "reason": reason,
                                                            "file": getattr(exc, "path", None)})
        level = 30 if status == "quarantined" else 40
        log.event(_log, f"{stage_name} {status}", level=level, item=item, reason=reason, exit_code=code)
        if code == errors.BUG:
            import traceback

            record["error"]["traceback"] = traceback.format_exc()
    record["seconds"] = round(time.perf_counter() - t0, 3)
    try:
        ctx.write_result(stage_name, item, record)
    except Exception as exc:  # a result that cannot be written must not hide the stage's own outcome
        log.event(_log, "could not write the stage result", level=40, stage=stage_name, item=item, reason=str(exc))
    return record


def _chain(stage_names: list[str], root: str, unit: str, night: str, item: str, force: bool) -> list[dict]:
    records = []
    for name in stage_names:
        record = execute(name, root, unit, night, item, force)
        records.append(record)
        if record["status"] not in ("done", "skipped"):
            break
    return records


def chains() -> list[tuple[str, list[graph.Stage]]]:
    """The graph as the runner executes it: (fanout, consecutive stages) after plan, exit handlers last."""
    out: list[tuple[str, list[graph.Stage]]] = []
    for s in graph.ordered():
        if s.name == "plan" or s.exit_handler:
            continue
        if out and out[-1][0] == s.fanout and s.fanout != "night":
            out[-1][1].append(s)
        else:
            out.append((s.fanout, [s]))
    return out


def stage_invocations() -> list[dict]:
    """Every stage the runner invokes, with its fan-out and the command-line arguments it passes
    (the workflow tests compare this with the Argo templates)."""
    listed = [graph.stage("plan")] + [s for _, group in chains() for s in group] + \
        [s for s in graph.STAGES if s.exit_handler]
    return [{"name": s.name, "fanout": s.fanout, "args": list(s.args)} for s in listed]


@dataclass
class NightReport:
    unit: str
    night: str
    root: str
    started: str = field(default_factory=utcnow)
    records: list[dict] = field(default_factory=list)
    plan_summary: dict = field(default_factory=dict)

    def to_dict(self, plan: dict) -> dict:
        frames = {f["id"]: {"raw": f["raw"], "output": f["output"], "status": "done"} for f in plan["frames"]}
        quarantined = [dict(q) for q in plan["quarantine"]]
        failed = []
        timing: dict[str, list[float]] = {}
        for r in self.records:
            timing.setdefault(r["stage"], []).append(r["seconds"])
            if r["status"] in ("quarantined", "failed"):
                entry = {"stage": r["stage"], "item": r["item"], "exit_code": r["exit_code"], **r["error"]}
                entry.pop("traceback", None)
                (quarantined if r["status"] == "quarantined" else failed).append(entry)
                if r["item"] in frames:
                    frames[r["item"]]["status"] = f"{r['stage']} {r['status']}"
        done = [f for f in frames.values() if f["status"] == "done"]
        return {
            "unit": self.unit, "night": self.night, "root": self.root, "started": self.started, "finished": utcnow(),
            "frames_in": plan["raw_frames"],
            "science_frames_planned": len(plan["frames"]),
            "frames_out": len(done),
            "calsets": len(plan["calsets"]), "stacks": len(plan["stacks"]),
            "quarantined": quarantined, "failed": failed, "skipped": plan.get("skipped", []), "warnings": plan["warnings"],
            "exit_code": night_exit_code(failed),
            "frames": frames,
            "timing": {k: {"count": len(v), "total_s": round(sum(v), 2), "max_s": round(max(v), 2)} for k, v in timing.items()},
            "records": self.records,
        }


# when failures differ, the one an operator must act on first: a bug, then a configuration, then
# a tool; a night whose only failures were retriable is retriable as a whole
_SEVERITY = (errors.BUG, errors.CONFIG, errors.TOOL_FAILURE, errors.RETRIABLE)


def night_exit_code(failed: list[dict]) -> int:
    """The exit code of a night run: 0 when nothing failed (a clean quarantine is not a failure),
    else the most severe code among the failed stage runs."""
    codes = {f["exit_code"] for f in failed}
    for code in _SEVERITY:
        if code in codes:
            return code
    return max(codes) if codes else errors.OK


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not sys.stderr.isatty() and total == 0)
    except ImportError:  # tqdm is a dependency; this keeps a broken install usable
        return None


def run_night(root: str, unit: str, night: str | None = None, *, force: bool = False, workers: int | None = None,
              progress: bool = True) -> dict:
    """Plan a night and run every stage on it; returns (and writes) the night report."""
    from . import storage
    from .stages.plan import latest_night

    log.setup()
    night = night or latest_night(root, unit)
    workers = workers or default_workers()
    report = NightReport(unit=unit, night=night, root=root)
    plan_record = execute("plan", root, unit, night, None, force)
    report.records.append(plan_record)
    if plan_record["status"] != "done":
        _exit_handlers(report, root, unit, night, force, "Failed")
        error = plan_record["error"]
        cause = f"{error['file']}: {error['reason']}" if error.get("file") else error["reason"]
        failure = errors.GppyError(f"planning {unit} {night} failed: {cause}")
        failure.exit_code = plan_record["exit_code"]  # a retriable plan stays retriable for cron or Argo
        raise failure
    ctx = Night(root=root, unit=unit, night=night)
    plan = ctx.plan()
    pool = _pool(workers) if workers > 1 else None
    try:
        for fanout, group in chains():
            names = [s.name for s in group]
            items = [None] if fanout == "night" else [entry["id"] for entry in plan[graph.PLAN_LISTS[fanout]]]
            bar = _progress(len(items), "+".join(names)) if progress else None
            pool = _run_items(pool, workers, names, items, (root, unit, night, force), report, bar)
            if bar:
                bar.close()
        failed = any(r["status"] == "failed" for r in report.records)
        _exit_handlers(report, root, unit, night, force, "Failed" if failed else "Succeeded")
    finally:
        if pool:
            pool.shutdown()
    result = report.to_dict(plan)
    curated = ctx.url(ctx.run_prefix, "night_report.json")
    if storage.exists(curated):  # the curate stage's report: candidates, depth, the Markdown report
        night_report = json.loads(storage.get_bytes(curated))
        result["candidates"] = night_report.get("candidates", [])
        result["moving"] = night_report.get("moving", [])
        result["stack_quality"] = [{k: st.get(k) for k in ("id", "filter", "status", "depth", "cmpl50", "cmpl90")}
                                   for st in night_report.get("stacks", [])]
        result["report_md"] = ctx.url(ctx.run_prefix, "report.md")
    storage.put_bytes(ctx.url(ctx.run_prefix, "report.json"), json.dumps(result, indent=1, default=str).encode())
    return result


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run_items(pool: ProcessPoolExecutor | None, workers: int, names: list[str], items: list, night_args: tuple,
               report: NightReport, bar) -> ProcessPoolExecutor | None:
    """One chain of stages over its items, on the pool when there is more than one; returns the pool
    to go on with (a fresh one when a worker died)."""
    root, unit, night, force = night_args
    if pool is None or len(items) == 1:
        for item in items:
            report.records += _run_group(names, root, unit, night, item, force)
            if bar:
                bar.update(1)
        return pool
    futures = {pool.submit(_run_group, names, root, unit, night, item, force): item for item in items}
    broken = False
    for fut in as_completed(futures):
        try:
            report.records += fut.result()
        except BrokenProcessPool as exc:
            # a worker was killed (out of memory, most likely): the items it took down fail
            # as retriable, the night goes on with a fresh pool
            report.records.append(_lost(names[0], unit, night, futures[fut], exc))
            broken = True
        if bar:
            bar.update(1)
    if broken:
        pool.shutdown()
        return _pool(workers)
    return pool


def default_workers(gib_per_worker: float = 6.0) -> int:
    """One worker per core, but no more than memory allows: a full-size 7DT frame's reduction
    peaks near 5 GB, and a worker killed for memory costs its items."""
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = 8.0
    return max(1, min(os.cpu_count() or 1, 8, int(memory_gib // gib_per_worker)))


def _lost(stage: str, unit: str, night: str, item: str, exc: BaseException) -> dict:
    return {"stage": stage, "item": item, "unit": unit, "night": night, "started": utcnow(), "status": "failed",
            "exit_code": errors.RETRIABLE, "seconds": 0.0,
            "error": {"kind": "retriable", "file": None,
                      "reason": f"the worker running it died ({type(exc).__name__}); out of memory? try --workers 1"}}


def _exit_handlers(report: NightReport, root: str, unit: str, night: str, force: bool, status: str) -> None:
    """Stages that run however the night went (notify), as Argo's onExit does."""
    for s in graph.STAGES:
        if s.exit_handler:
            extra = {"status": status} if "--status" in s.extra_args else {}
            report.records.append(execute(s.name, root, unit, night, None, force, **extra))


def _run_group(names: list[str], root: str, unit: str, night: str, item: str | None, force: bool) -> list[dict]:
    log.setup()
    if item is None:
        return [execute(n, root, unit, night, None, force) for n in names]
    return _chain(names, root, unit, night, item, force)


def summary_text(report: dict) -> str:
    """The night summary printed at the end of a run."""
    lines = [
        f"night {report['unit']} {report['night']} under {report['root']}",
        f"  frames in: {report['frames_in']}   science planned: {report['science_frames_planned']}   "
        f"science out: {report['frames_out']}   calibration sets: {report['calsets']}   stacks: {report['stacks']}",
        f"  quarantined: {len(report['quarantined'])}   failed: {len(report['failed'])}"
        + (f"   skipped: {len(report['skipped'])}" if report.get("skipped") else ""),
    ]
    for q in report["quarantined"]:
        lines.append(f"    - {q.get('file') or q.get('item')}: {q['reason']} ({q.get('stage')})")
    for f in report["failed"]:
        lines.append(f"    ! {f.get('item')}: {f['reason']} ({f.get('stage')}, exit {f.get('exit_code')})")
    for s in report.get("skipped", []):
        lines.append(f"    ~ {s['file']}: {s['reason']} (not planned)")
    if report.get("stack_quality"):  # how deep each stack is, and how far down its search finds stars
        lines.append("  stacks: 5-sigma depth and the magnitudes where half and 90 % of artificial stars are found")
        lines.append(f"    {'stack':<24}{'filter':>7}{'depth5s':>9}{'CMPL50':>8}{'CMPL90':>8}")
        for st in report["stack_quality"]:
            lines.append(f"    {st['id']:<24}{st['filter']:>7}{_num(st['depth'], 9, 2)}{_num(st['cmpl50'], 8, 2)}"
                         f"{_num(st['cmpl90'], 8, 2)}")
    if "candidates" in report:
        lines.append(f"  transient candidates that pass: {len(report['candidates'])}")
        if report["candidates"]:
            lines.append(f"    {'stack':<24}{'id':>4}{'RA':>12}{'Dec':>12}{'mag':>8}{'err':>7}{'S/N':>7}{'rb_score':>9}  stamp")
        for c in report["candidates"]:
            lines.append(f"    {c['stack']:<24}{c['id']:>4}{c['ra']:>12.6f}{c['dec']:>12.6f}{_num(c['mag'], 8, 2)}"
                         f"{_num(c['magerr'], 7, 3)}{_num(c['snr'], 7, 1)}{_num(c.get('rb_score'), 9, 2)}  "
                         f"{c.get('stamp', '-')}" + (f"  light curve {c['light_curve']}" if c.get("light_curve") else ""))
        if report.get("moving"):  # one row per object, linked across the night's stacks
            lines.append(f"  moving objects: {len(report['moving'])}")
            for m in report["moving"]:
                lines.append(f"    {m['name'] or '-':<14}{m['rate_arcsec_h']:>8.1f}\"/h  PA {m['pa_deg']:>5.1f}  "
                             f"{len(m['detections'])} detection(s) in {', '.join(m['stacks'])}")
        lines.append(f"  night report: {report['report_md']}")
    if report["failed"]:
        lines.append(f"  {len(report['failed'])} stage run(s) failed: exit {report['exit_code']}"
                     + (" (retriable: run the night again)" if report["exit_code"] == errors.RETRIABLE else ""))
    lines.append("  time per stage:")
    lines.append(f"    {'stage':<14}{'runs':>6}{'total s':>10}{'max s':>9}")
    for name, t in report["timing"].items():
        lines.append(f"    {name:<14}{t['count']:>6}{t['total_s']:>10.2f}{t['max_s']:>9.2f}")
    return "\n".join(lines)


def _num(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
