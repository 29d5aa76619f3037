"""The night report, the one record of a night: what it made, how good it is, what ran, was
skipped, quarantined or failed in each stage and how long each took, as JSON and Markdown.

``collect(root, unit, night)`` reads the plan, every stage's result record
(``runs/<unit>/<night>/results/<stage>/<item>.json``, written by each stage invocation locally and
on Argo) and the headers of the products; ``build(...)`` turns them into the report dict (pure);
``markdown(report)`` renders it; ``save`` writes both under ``runs/<unit>/<night>/``. The curate
stage writes it; the local runner brings its run part (``run_record.run_part``) up to date once the exit
handler has run, as curate cannot see its own record or notify's.
"""

from __future__ import annotations

import json
import math
from typing import Any

from astropy.io import fits

from . import __version__, storage
from .run_record import run_part, this_run

BLOCK = 2880
REPORT_JSON = "night_report.json"
REPORT_MD = "report.md"
ZP_KEYS = ("ZP_APER_1", "ZP_AUTO", "ZP_APER", "ZP")  # 7DT reads the seeing-scaled aperture first


def save(root: str, report: dict) -> None:
    """The report as JSON and Markdown, under its night's run folder."""
    run_prefix = f"runs/{report['unit']}/{report['night']}"
    storage.put_bytes(storage.join(root, run_prefix, REPORT_JSON), json.dumps(report, indent=1, default=str).encode())
    storage.put_bytes(storage.join(root, run_prefix, REPORT_MD), markdown(report).encode())


def read_header(url: str) -> fits.Header | None:
    """The primary header of a FITS object, read block by block (not the whole 245 MB frame)."""
    nbytes = BLOCK * 8
    end = b"END" + b" " * 77
    while True:
        try:
            blob = storage.get_head(url, nbytes)
        except storage.NotFoundError:
            return None
        for i in range(0, len(blob) - 79, 80):
            if blob[i:i + 80] == end:
                return fits.Header.fromstring(blob[: i + 80].decode("ascii", "replace"))
        if len(blob) < nbytes or nbytes > BLOCK * 256:
            return None
        nbytes *= 4


def _num(value, nd: int = 4):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, nd) if math.isfinite(v) else None


def quality(header: fits.Header | None) -> dict:
    """Zero point, its error, 5-sigma depth and seeing from a product header (None where absent).

    The photometry stage writes ``ZP_<AP>``, ``EZP_<AP>``, ``UL5_<AP>`` and ``SEEING``; the first
    aperture of ``ZP_KEYS`` found is the one reported.
    """
    out = {"zp": None, "ezp": None, "depth": None, "seeing": None, "aperture": None}
    if header is None:
        return out
    for key in ZP_KEYS:
        if _num(header.get(key)) is not None:
            ap = key[3:] if key.startswith("ZP_") else ""
            out |= {"zp": _num(header[key]), "aperture": ap or None,
                    "ezp": _num(header.get(f"EZP_{ap}" if ap else "EZP")),
                    "depth": _num(header.get(f"UL5_{ap}" if ap else "UL5"), 3)}
            break
    if out["depth"] is None:
        depths = [_num(v, 3) for k, v in header.items() if k.startswith("UL5_")]
        depths = [d for d in depths if d is not None]
        out["depth"] = max(depths) if depths else None
    out["seeing"] = _num(header.get("SEEING") or header.get("SEEINGIN") or header.get("FWHM_AS"), 3)
    return out


def collect(root: str, unit: str, night: str) -> dict:
    """Everything the report needs, read from storage: plan, result records, product headers."""
    run_prefix = f"runs/{unit}/{night}"
    plan = json.loads(storage.get_bytes(storage.join(root, run_prefix, "plan.json")))
    headers = {}
    for f in plan["frames"]:
        headers[f["output"]] = read_header(storage.join(root, f["output"]))
    for s in plan["stacks"]:
        headers[s["output"]] = read_header(storage.join(root, s["output"]))
    return {"plan": plan, "records": _records(root, run_prefix), "headers": headers, "root": root}


def _records(root: str, run_prefix: str) -> dict[str, dict[str, dict]]:
    """This run's result records, {stage: {item: record}} (``run_record.this_run``)."""
    records: dict[str, dict[str, dict]] = {}
    for obj in storage.list_objects(storage.join(root, run_prefix, "results")):
        parts = obj.key.split("/")
        if len(parts) != 2 or not parts[1].endswith(".json"):
            continue
        try:
            records.setdefault(parts[0], {})[parts[1][:-5]] = json.loads(storage.get_bytes(obj.url))
        except ValueError:
            continue
    return this_run(records)


def finish(root: str, unit: str, night: str) -> dict:
    """The night report once the night's exit handler has run, saved and returned: curate's, with
    the run part brought up to date (curate could not see its own record or notify's), or, when
    curate did not finish in this run, one built from what storage holds."""
    run_prefix = f"runs/{unit}/{night}"
    records = _records(root, run_prefix)
    url = storage.join(root, run_prefix, REPORT_JSON)
    if (records.get("curate", {}).get("night") or {}).get("status") == "done" and storage.exists(url):
        rep = json.loads(storage.get_bytes(url))
        rep |= run_part(json.loads(storage.get_bytes(storage.join(root, run_prefix, "plan.json"))), records)
        rep["counts"]["failures"] = len(rep["failures"])
    else:
        rep = build(collect(root, unit, night))
    save(root, rep)
    return rep


def build(data: dict, *, top_candidates: int = 10, products: list[str] | None = None) -> dict:
    """The report dict from ``collect``'s data (pure)."""
    plan, records, headers = data["plan"], data["records"], data["headers"]
    frames = [_frame_row(f, records, headers) for f in plan["frames"]]
    stacks, candidates, flagged, movers = [], [], [], []
    for s in plan["stacks"]:
        entry, det_res = _stack_entry(s, records, headers.get(s["output"]))
        if entry["subtract"]["status"] == "no reference":
            flagged.append({"stack": s["id"], "flag": "no_reference", "reason": entry["subtract"]["reason"]})
        for c in det_res.get("top", []):
            candidates.append({"stack": s["id"], "filter": s["filter"], **c})
        for c in det_res.get("moving", []):
            movers.append({"stack": s["id"], "filter": s["filter"], **c})
        stacks.append(entry)
    candidates.sort(key=lambda c: -(c.get("rb_score", c.get("score")) or 0))
    done = [f for f in frames if f["status"] == "done"]
    depths = [f["depth"] for f in done if f["depth"] is not None]
    seeing = [f["seeing"] for f in done if f["seeing"] is not None]
    run = run_part(plan, records)
    return {
        "schema": "gppy-stage/night-report/1", "unit": plan["unit"], "night": plan["night"], "root": data["root"],
        "pipeline_version": __version__,
        "counts": {"raw_frames": plan.get("raw_frames"), "science_planned": len(plan["frames"]),
                   "science_done": len(done), "calsets": len(plan["calsets"]), "stacks_planned": len(plan["stacks"]),
                   "stacks_done": sum(1 for s in stacks if s["status"] in ("done", "skipped")),
                   "failures": len(run["failures"]), "flagged": len(flagged),
                   "candidates": sum((s["detect"]["n_candidates"] or 0) for s in stacks),
                   "candidates_pass": sum((s["detect"]["n_pass"] or 0) for s in stacks)},
        "depth": {"frame_median": _median(depths), "stack_best": max((s["depth"] for s in stacks if s["depth"]), default=None)},
        "seeing_median": _median(seeing),
        "frames": frames, "stacks": stacks, "flagged": flagged, "candidates": candidates[:top_candidates],
        "moving": link_movers(movers), "warnings": plan.get("warnings", []), "skipped": plan.get("skipped", []),
        "products": products or [], "report_md": f"runs/{plan['unit']}/{plan['night']}/{REPORT_MD}", **run,
    }


def _frame_row(f: dict, records: dict, headers: dict) -> dict:
    """A science frame's row: the first per-frame stage that failed it, else whether its product exists."""
    status, reason = "done", None
    for stage in ("reduce", "astrometry", "photometry"):
        rec = records.get(stage, {}).get(f["id"])
        if rec and rec.get("status") in ("quarantined", "failed"):
            status, reason = f"{stage} {rec['status']}", (rec.get("error") or {}).get("reason")
            break
    if status == "done" and headers.get(f["output"]) is None:
        status = "not made"
    return {"id": f["id"], "filter": f["filter"], "object": f.get("object"), "exptime": f["exptime"],
            "date_obs": f["date_obs"], "output": f["output"], "status": status, "reason": reason,
            **quality(headers.get(f["output"]))}


def _stack_entry(s: dict, records: dict, h) -> tuple[dict, dict]:
    """A stack's row (with its subtraction and detection) and the detect stage's result it came from."""
    st_rec = records.get("stack", {}).get(s["id"], {})
    sub = (records.get("subtract", {}).get(s["id"]) or {})
    det = (records.get("detect", {}).get(s["id"]) or {})
    res = st_rec.get("result") or {}
    entry = {"id": s["id"], "field": s["field"], "filter": s["filter"], "output": s["output"],
             "status": st_rec.get("status") or ("done" if h is not None else "not run"),
             "reason": (st_rec.get("error") or {}).get("reason"),
             "frames_planned": len(s["frames"]), "ncombine": int(h["NCOMBINE"]) if h is not None and "NCOMBINE" in h else 0,
             "left_out": res.get("left_out", []), "exptime": _num(h.get("EXPTIME"), 1) if h is not None else None,
             "zp_common": _num(h.get("ZPCOMMON")) if h is not None else None, **quality(h),
             # the completeness stage's 50 % / 90 % magnitudes of artificial stars, in the header
             "cmpl50": _num(h.get("CMPL50"), 3) if h is not None else None,
             "cmpl90": _num(h.get("CMPL90"), 3) if h is not None else None}
    sub_res = sub.get("result") or {}
    det_res = det.get("result") or {}
    entry["subtract"] = {"status": sub_res.get("status") or sub.get("status", "not run"),
                         "reason": sub_res.get("reason") or (sub.get("error") or {}).get("reason"),
                         "reference": sub_res.get("reference"), "engine": sub_res.get("engine"),
                         "flux_scale": sub_res.get("flux_scale")}
    entry["detect"] = {"status": det_res.get("status") or det.get("status", "not run"),
                       "n_candidates": det_res.get("n_candidates"), "n_pass": det_res.get("n_pass"),
                       "candidates": det_res.get("output")}
    return entry, det_res


# Two moving detections are one object when their rates agree within this fraction (plus the
# absolute slack, for slow movers whose rates are less certain), their angles within MOVE_PA_DEG,
# and one's track, carried to the other's time, passes within MOVE_POS_ARCSEC plus MOVE_POS_FRAC
# of the distance travelled plus the trail each stack spans.
MOVE_RATE_FRAC, MOVE_RATE_ABS, MOVE_PA_DEG, MOVE_POS_ARCSEC, MOVE_POS_FRAC = 0.3, 3.0, 30.0, 3.0, 0.2


def _same_mover(a: dict, b: dict) -> bool:
    ra_, rb = a["rate_arcsec_h"], b["rate_arcsec_h"]
    if abs(ra_ - rb) > MOVE_RATE_FRAC * max(ra_, rb) + MOVE_RATE_ABS:
        return False
    if abs((a["pa_deg"] - b["pa_deg"] + 180.0) % 360.0 - 180.0) > MOVE_PA_DEG:
        return False
    dt_h = (b["mjd"] - a["mjd"]) * 24.0
    pa = math.radians(a["pa_deg"])
    cosd = math.cos(math.radians(a["dec"]))
    pe = ra_ * dt_h * math.sin(pa)
    pn = ra_ * dt_h * math.cos(pa)
    de = ((b["ra"] - a["ra"] + 180.0) % 360.0 - 180.0) * cosd * 3600.0
    dn = (b["dec"] - a["dec"]) * 3600.0
    tol = (MOVE_POS_ARCSEC + MOVE_POS_FRAC * ra_ * abs(dt_h)
           + max(ra_, rb) * (a.get("half_span_h", 0.0) + b.get("half_span_h", 0.0)))
    return math.hypot(de - pe, dn - pn) <= tol


def link_movers(detections: list[dict]) -> list[dict]:
    """One row per moving object from the night's moving candidates (each: stack, filter, id,
    ra, dec, mjd, rate_arcsec_h, pa_deg, mag, sso_name, half_span_h): detections whose tracks
    agree (``_same_mover``) are linked, transitively, across and within stacks. A row: its
    detections in time order, first and last position and time, the median rate, the mean angle,
    the stacks and filters, and the known name where a detection has one."""
    dets = [d for d in detections if None not in (d.get("ra"), d.get("dec"), d.get("mjd"), d.get("rate_arcsec_h"),
                                                   d.get("pa_deg"))]
    parent = list(range(len(dets)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(dets)):
        for j in range(i + 1, len(dets)):
            if _same_mover(dets[i], dets[j]) or _same_mover(dets[j], dets[i]):
                parent[root(i)] = root(j)
    groups: dict[int, list[dict]] = {}
    for i, d in enumerate(dets):
        groups.setdefault(root(i), []).append(d)
    rows = []
    for members in groups.values():
        members.sort(key=lambda d: (d["mjd"], d["stack"], d["id"]))
        pas = [math.radians(d["pa_deg"]) for d in members]
        pa = math.degrees(math.atan2(sum(map(math.sin, pas)), sum(map(math.cos, pas)))) % 360.0
        names = sorted({d["sso_name"] for d in members if d.get("sso_name")})
        first, last = members[0], members[-1]
        rows.append({"name": names[0] if names else None, "known_names": names,
                     "rate_arcsec_h": _median([d["rate_arcsec_h"] for d in members]),
                     "pa_deg": round(pa, 1), "stacks": sorted({d["stack"] for d in members}),
                     "filters": sorted({d["filter"] for d in members}),
                     "first": {k: first[k] for k in ("mjd", "ra", "dec")}, "last": {k: last[k] for k in ("mjd", "ra", "dec")},
                     "mag": _median([d["mag"] for d in members if d.get("mag") is not None]),
                     "detections": [{k: d.get(k) for k in ("stack", "filter", "id", "mjd", "ra", "dec", "mag",
                                                           "rate_arcsec_h", "pa_deg")} for d in members]})
    rows.sort(key=lambda r: (r["first"]["mjd"], r["first"]["ra"]))
    return rows


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    return round(v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2]), 3)


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown(report: dict) -> str:
    """The report as Markdown (``report.md``)."""
    lines = (_md_summary(report) + _md_frames(report["frames"]) + _md_stacks(report["stacks"])
             + _md_candidates(report["candidates"]) + _md_moving(report.get("moving")) + _md_failures(report)
             + _md_timing(report["timing"]))
    return "\n".join(lines) + "\n"


def _md_summary(report: dict) -> list[str]:
    c = report["counts"]
    return [f"# Night report: {report['unit']} {report['night']}", "",
            f"Pipeline {report['pipeline_version']}, storage `{report['root']}`.", "",
            "## Summary", "",
            f"- science frames: {c['science_done']} of {c['science_planned']} done ({c['raw_frames']} raw files)",
            f"- stacks: {c['stacks_done']} of {c['stacks_planned']} made",
            f"- candidates: {c['candidates_pass']} passing of {c['candidates']} detected",
            f"- failures: {c['failures']}, flagged: {c['flagged']}",
            f"- median seeing: {_fmt(report['seeing_median'], 2)}\", median frame depth (5 sigma): "
            f"{_fmt(report['depth']['frame_median'], 2)}, best stack depth: {_fmt(report['depth']['stack_best'], 2)}", ""]


def _md_frames(frames: list[dict]) -> list[str]:
    lines = ["## Frames", "", "| frame | filter | status | ZP | depth | seeing |", "|---|---|---|---|---|---|"]
    for f in frames:
        status = f["status"] + (f": {f['reason']}" if f.get("reason") else "")
        lines.append(f"| {f['id']} | {f['filter']} | {status} | {_fmt(f['zp'])} | {_fmt(f['depth'], 2)} | {_fmt(f['seeing'], 2)} |")
    return lines


def _md_stacks(stacks: list[dict]) -> list[str]:
    lines = ["", "## Stacks", "", "| stack | frames | status | ZP | depth | CMPL50 | CMPL90 | seeing | subtraction "
             "| candidates |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stacks:
        status = s["status"] + (f": {s['reason']}" if s.get("reason") else "")
        sub = s["subtract"]["status"] + (f" ({s['subtract']['reference'].rsplit('/', 1)[-1]})"
                                         if s["subtract"].get("reference") else "")
        cand = "-" if s["detect"]["n_candidates"] is None else f"{s['detect']['n_pass']} / {s['detect']['n_candidates']}"
        lines.append(f"| {s['id']} | {s['ncombine']}/{s['frames_planned']} | {status} | {_fmt(s['zp'])} | "
                     f"{_fmt(s['depth'], 2)} | {_fmt(s.get('cmpl50'), 2)} | {_fmt(s.get('cmpl90'), 2)} | "
                     f"{_fmt(s['seeing'], 2)} | {sub} | {cand} |")
        for note in s["left_out"]:
            lines.append(f"|  left out: {note['frame']} | | {note['reason']} | | | | | | | |")
    return lines


def _md_candidates(candidates: list[dict]) -> list[str]:
    lines = ["", "## Candidates (passing, best first)", ""]
    if not candidates:
        return lines + ["none"]
    lines += ["| stack | id | RA | Dec | mag | S/N | score | real/bogus | host offset \" | host offset / light radius "
              "| host mag |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cand in candidates:
        lines.append(f"| {cand['stack']} | {cand['id']} | {_fmt(cand['ra'], 6)} | {_fmt(cand['dec'], 6)} | "
                     f"{_fmt(cand['mag'], 2)} | {_fmt(cand['snr'], 1)} | {_fmt(cand['score'], 2)} | "
                     f"{_fmt(cand.get('rb_score'), 2)} | {_fmt(cand.get('host_sep'), 2)} | "
                     f"{_fmt(cand.get('host_dlr'), 2)} | {_fmt(cand.get('host_mag'), 2)} |")
    return lines


def _md_moving(moving: list[dict] | None) -> list[str]:
    lines = ["", "## Moving objects (linked across the night's stacks)", ""]
    if not moving:
        return lines + ["none"]
    lines += ["| object | rate \"/h | PA deg | mag | first seen (MJD, RA, Dec) | last seen (MJD, RA, Dec) | stacks |",
              "|---|---|---|---|---|---|---|"]
    for k, mv in enumerate(moving, 1):
        f, la = mv["first"], mv["last"]
        lines.append(f"| {mv['name'] or f'unknown {k}'} | {_fmt(mv['rate_arcsec_h'], 1)} | {_fmt(mv['pa_deg'], 1)} | "
                     f"{_fmt(mv['mag'], 2)} | {f['mjd']:.5f} {f['ra']:.6f} {f['dec']:.6f} | "
                     f"{la['mjd']:.5f} {la['ra']:.6f} {la['dec']:.6f} | {', '.join(mv['stacks'])} |")
    return lines


def _md_failures(report: dict) -> list[str]:
    lines = ["", "## Failures and flags", ""]
    if not report["failures"] and not report["flagged"]:
        lines.append("none")
    for f in report["failures"]:
        lines.append(f"- **{f.get('status')}** {f.get('stage')} {f.get('item') or f.get('file') or ''}: {f.get('reason')}"
                     + (f" (exit {f['exit_code']})" if f.get("exit_code") is not None else ""))
    for f in report["flagged"]:
        lines.append(f"- **flagged** {f['stack']}: {f['flag']} ({f['reason']})")
    for w in report["warnings"]:
        lines.append(f"- warning: {w}")
    return lines


def _md_timing(timing: dict) -> list[str]:
    if not timing:
        return []
    lines = ["", "## Time per stage", "", "| stage | runs | total s | max s |", "|---|---|---|---|"]
    for name, t in sorted(timing.items()):
        lines.append(f"| {name} | {t['count']} | {t['total_s']:.2f} | {t['max_s']:.2f} |")
    return lines
