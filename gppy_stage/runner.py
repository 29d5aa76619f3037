"""The local runner: a night through every stage of the graph on one machine.

Stages run in the order of ``graph.STAGES``; consecutive stages of the same fan-out form a chain
that runs per item in one worker (reduce -> astrometry -> photometry for a frame), on a process
pool, with a progress bar. A chain stops at its first failure; other items go on. Each
invocation's ``StageResult`` is saved where the curate stage reads it; once the exit handler has
run, the night report (``runs/<unit>/<night>/night_report.json``, see ``report.finish``) lists
what was done, skipped, quarantined and failed, with reasons, and the time each stage took.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from . import errors, graph, log, report, scratch, storage
from .stages.base import Night, StageResult, utcnow

_log = log.get("runner")


def invoke(stage_name: str, root: str, unit: str, night: str, item: str | None = None, force: bool = False,
           **extra) -> StageResult:
    """Run one stage invocation and record its outcome; never raises for a typed error.

    This is what a ``gppy stage`` command and each local worker do, so the two cannot differ.
    """
    stage = graph.stage(stage_name)
    ctx = Night(root=root, unit=unit, night=night, force=force)
    t0 = time.perf_counter()
    where = {"stage": stage_name, "item": item, "unit": unit, "night": night, "started": utcnow()}
    try:
        # every temporary file of the stage (the tools' folders, downloads) lands in a folder of
        # this invocation's own, which the next invocation removes if this one is killed
        with scratch.invocation(stage_name):
            result = stage.function()(ctx, item, **extra) if item is not None else stage.function()(ctx, **extra)
        record = StageResult.finished(result, time.perf_counter() - t0, **where)
    except Exception as exc:  # typed errors become statuses; anything else is a bug, still reported
        record = StageResult.failed(exc, time.perf_counter() - t0, traceback.format_exc(), **where)
        log.event(_log, f"{stage_name} {record.status}", level=30 if record.status == "quarantined" else 40,
                  item=item, reason=record.error.reason, exit_code=record.exit_code)
    _save(ctx, record)
    return record


def execute(stage_name: str, root: str, unit: str, night: str, item: str | None = None, force: bool = False,
            **extra) -> dict:
    """``invoke``'s record as the dict its results file holds."""
    return invoke(stage_name, root, unit, night, item, force, **extra).to_dict()


def _save(ctx: Night, record: StageResult) -> None:
    try:
        ctx.write_result(record)
    except Exception as exc:  # a result that cannot be written must not hide the stage's own outcome
        log.event(_log, "could not write the stage result", level=40, stage=record.stage, item=record.item,
                  reason=str(exc))


def _chain(stage_names: list[str], root: str, unit: str, night: str, item: str, force: bool) -> list[StageResult]:
    records = []
    for name in stage_names:
        record = invoke(name, root, unit, night, item, force)
        records.append(record)
        if not record.ok:
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


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, disable=not sys.stderr.isatty() and total == 0)
    except ImportError:  # tqdm is a dependency; this keeps a broken install usable
        return None


def run_night(root: str, unit: str, night: str | None = None, *, force: bool = False, workers: int | None = None,
              progress: bool = True) -> dict:
    """Plan a night and run every stage on it; returns the night report (``report.finish``)."""
    from .stages.plan import latest_night

    log.setup()
    night = night or latest_night(root, unit)
    workers = workers or default_workers()
    plan_record = invoke("plan", root, unit, night, None, force)
    if not plan_record.ok:
        _exit_handlers(root, unit, night, force, "Failed")
        error = plan_record.error
        cause = f"{error.file}: {error.reason}" if error.file else error.reason
        failure = errors.GppyError(f"planning {unit} {night} failed: {cause}")
        failure.exit_code = plan_record.exit_code  # a retriable plan stays retriable for cron or Argo
        raise failure
    plan = Night(root=root, unit=unit, night=night).plan()
    records: list[StageResult] = []
    pool = _pool(workers) if workers > 1 else None
    try:
        for fanout, group in chains():
            names = [s.name for s in group]
            items = [None] if fanout == "night" else [entry["id"] for entry in plan[graph.PLAN_LISTS[fanout]]]
            bar = _progress(len(items), "+".join(names)) if progress else None
            pool = _run_items(pool, workers, names, items, (root, unit, night, force), records, bar)
            if bar:
                bar.close()
        failed = any(r.status == "failed" for r in records)
        _exit_handlers(root, unit, night, force, "Failed" if failed else "Succeeded")
    finally:
        if pool:
            pool.shutdown()
    return report.finish(root, unit, night)


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _run_items(pool: ProcessPoolExecutor | None, workers: int, names: list[str], items: list, night_args: tuple,
               records: list[StageResult], bar) -> ProcessPoolExecutor | None:
    """One chain of stages over its items, on the pool when there is more than one; returns the pool
    to go on with (a fresh one when a worker died)."""
    root, unit, night, force = night_args
    if pool is None or len(items) == 1:
        for item in items:
            records += _run_group(names, root, unit, night, item, force)
            if bar:
                bar.update(1)
        return pool
    futures = {pool.submit(_run_group, names, root, unit, night, item, force): item for item in items}
    broken = False
    for fut in as_completed(futures):
        try:
            records += fut.result()
        except BrokenProcessPool as exc:
            # a worker was killed (out of memory, most likely): the items it took down fail
            # as retriable, the night goes on with a fresh pool
            records.append(_lost(names[0], Night(root=root, unit=unit, night=night), futures[fut], exc))
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


def _lost(stage: str, ctx: Night, item: str, exc: BaseException) -> StageResult:
    """The record of an item whose worker died, saved as a stage's own would be, so the report counts it."""
    died = errors.RetriableError(f"the worker running it died ({type(exc).__name__}); out of memory? "
                                 f"try --workers 1")
    record = StageResult.failed(died, 0.0, stage=stage, item=item, unit=ctx.unit, night=ctx.night, started=utcnow())
    _save(ctx, record)
    return record


def _exit_handlers(root: str, unit: str, night: str, force: bool, status: str) -> None:
    """Stages that run however the night went (notify), as Argo's onExit does."""
    for s in graph.STAGES:
        if s.exit_handler:
            extra = {"status": status} if "--status" in s.extra_args else {}
            invoke(s.name, root, unit, night, None, force, **extra)


def _run_group(names: list[str], root: str, unit: str, night: str, item: str | None,
               force: bool) -> list[StageResult]:
    log.setup()
    if item is None:
        return [invoke(n, root, unit, night, None, force) for n in names]
    return _chain(names, root, unit, night, item, force)


def summary_text(rep: dict) -> str:
    """The night summary printed at the end of a run, from the night report."""
    c = rep["counts"]
    quarantined = [f for f in rep["failures"] if f["status"] == "quarantined"]
    failed = [f for f in rep["failures"] if f["status"] == "failed"]
    lines = [
        f"night {rep['unit']} {rep['night']} under {rep['root']}",
        f"  frames in: {c['raw_frames']}   science planned: {c['science_planned']}   "
        f"science out: {c['science_done']}   calibration sets: {c['calsets']}   stacks: {c['stacks_planned']}",
        f"  quarantined: {len(quarantined)}   failed: {len(failed)}"
        + (f"   skipped: {len(rep['skipped'])}" if rep.get("skipped") else ""),
    ]
    for q in quarantined:
        lines.append(f"    - {q.get('file') or q.get('item')}: {q['reason']} ({q.get('stage')})")
    for f in failed:
        lines.append(f"    ! {f.get('item')}: {f['reason']} ({f.get('stage')}, exit {f.get('exit_code')})")
    for s in rep.get("skipped", []):
        lines.append(f"    ~ {s['file']}: {s['reason']} (not planned)")
    lines += _stacks_text(rep["stacks"]) + _candidates_text(rep)
    lines.append(f"  night report: {storage.join(rep['root'], rep['report_md'])}")
    if failed:
        lines.append(f"  {len(failed)} stage run(s) failed: exit {rep['exit_code']}"
                     + (" (retriable: run the night again)" if rep["exit_code"] == errors.RETRIABLE else ""))
    return "\n".join(lines + _stages_text(rep))


def _stacks_text(stacks: list[dict]) -> list[str]:
    """How deep each stack is, and how far down its search finds stars."""
    if not stacks:
        return []
    lines = ["  stacks: 5-sigma depth and the magnitudes where half and 90 % of artificial stars are found",
             f"    {'stack':<24}{'filter':>7}{'depth5s':>9}{'CMPL50':>8}{'CMPL90':>8}"]
    for st in stacks:
        lines.append(f"    {st['id']:<24}{st['filter']:>7}{_num(st['depth'], 9, 2)}{_num(st['cmpl50'], 8, 2)}"
                     f"{_num(st['cmpl90'], 8, 2)}")
    return lines


def _candidates_text(rep: dict) -> list[str]:
    lines = [f"  transient candidates that pass: {len(rep['candidates'])}"]
    if rep["candidates"]:
        lines.append(f"    {'stack':<24}{'id':>4}{'RA':>12}{'Dec':>12}{'mag':>8}{'err':>7}{'S/N':>7}{'rb_score':>9}  stamp")
    for c in rep["candidates"]:
        lines.append(f"    {c['stack']:<24}{c['id']:>4}{c['ra']:>12.6f}{c['dec']:>12.6f}{_num(c['mag'], 8, 2)}"
                     f"{_num(c['magerr'], 7, 3)}{_num(c['snr'], 7, 1)}{_num(c.get('rb_score'), 9, 2)}  "
                     f"{c.get('stamp', '-')}" + (f"  light curve {c['light_curve']}" if c.get("light_curve") else ""))
    if rep.get("moving"):  # one row per object, linked across the night's stacks
        lines.append(f"  moving objects: {len(rep['moving'])}")
        for m in rep["moving"]:
            lines.append(f"    {m['name'] or '-':<14}{m['rate_arcsec_h']:>8.1f}\"/h  PA {m['pa_deg']:>5.1f}  "
                         f"{len(m['detections'])} detection(s) in {', '.join(m['stacks'])}")
    return lines


def _stages_text(rep: dict) -> list[str]:
    """Each stage's runs by outcome, and the time they took."""
    lines = ["  stages: runs by outcome and time",
             f"    {'stage':<14}{'runs':>6}{'done':>6}{'skip':>6}{'quar':>6}{'fail':>6}{'total s':>10}{'max s':>9}"]
    for name, t in rep["timing"].items():
        n = rep["stages"].get(name, {})
        lines.append(f"    {name:<14}{t['count']:>6}{n.get('done', 0):>6}{n.get('skipped', 0):>6}"
                     f"{n.get('quarantined', 0):>6}{n.get('failed', 0):>6}{t['total_s']:>10.2f}{t['max_s']:>9.2f}")
    return lines


def _num(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
