"""The plan stage: what a night holds and what is to be made of it, as plan.json.

plan.json (schema ``gppy-stage/plan/1``) is the contract between the planner and every later
stage, locally and on Argo; its three lists are what the fan-outs iterate over:

```
{
  "schema": "gppy-stage/plan/1", "unit": "7DT01", "night": "2025-01-01_gain2750",
  "root": "...", "made": "...", "pipeline_version": "...", "settings_hash": "...", "raw_frames": 34,
  "calsets": [{"id", "unit", "night", "binning", "gain", "camera", "mjd",
               "zero": {"frames": [key...], "output": key} | null,
               "darks": [{"exptime", "frames", "output"}], "flats": [{"filter", "frames", "output"}]}],
  "frames":  [{"id", "raw", "object", "filter", "exptime", "date_obs", "mjd", "binning", "gain",
               "camera", "masters": {"zero": key, "dark": key, "flat": key}, "output": key, "stack": id,
               "warnings": [str] (only when there are some)}],
  "stacks":  [{"id", "field", "filter", "unit", "block", "frames": [frame id...], "start", "end", "output"}],
  "quarantine": [{"file", "kind", "exit_code", "reason", "stage"}],
  "skipped": [{"file", "reason"}], "warnings": [str]
}
```
The JSON schema of this contract is ``gppy_stage/plan_types.py`` (tests/test_plan_schema.py
validates a planned night against it). Keys are relative to the root. Frame ids are the raw file stems; they are unique in a night. Every
name is built from header values through ``names.safe_name``; a frame whose OBJECT is not a safe
name gets the safe one as its field, with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .. import __version__, config, library, log, storage
from ..errors import BadInputError, ConfigError
from ..headers import FrameInfo
from ..names import (
    NightName,
    calib_name,
    master_name,
    night_date_of,
    parse_night,
    processed_dir,
    safe_name,
    stack_id,
    stack_name,
    strip_fits_suffix,
)
from ..plan_types import Calset, Frame, Stack
from .base import PLAN_SCHEMA, Night, utcnow
from .raw_frames import Tally, drop_duplicates, drop_odd_shapes, read_frames, same_name_copies, warn

_log = log.get("plan")


def night_folders(root: str, unit: str) -> list[NightName]:
    """Every night folder of a unit (regular, ToO, test), oldest first; on one date a ToO folder
    sorts before the regular night. Folders that are not night names are ignored."""
    pattern = config.site(unit).night_folder
    nights = []
    for name in storage.list_prefixes(storage.join(root, "obsdata", unit)):
        try:
            nights.append(parse_night(name, pattern))
        except BadInputError:
            log.event(_log, "not a night folder; ignored", unit=unit, folder=name)
    return sorted(nights, key=lambda n: (n.date, 0 if n.too else 1, n.folder))


def list_nights(root: str, unit: str, include_test: bool = False) -> list[str]:
    """Night folder names of a unit, oldest first (test folders only when asked for)."""
    return [n.folder for n in night_folders(root, unit) if include_test or not n.test]


def latest_night(root: str, unit: str, now: datetime | None = None) -> str:
    """The unit's latest complete night: the newest folder whose night is over.

    The night in progress (the date of now - 12 h) is still being written, so it is not taken.
    """
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    current = night_date_of(now)
    pattern = config.site(unit).night_folder
    done = [n for n in list_nights(root, unit) if parse_night(n, pattern).date < current]
    if not done:
        raise ConfigError(f"no complete night for {unit} under {storage.join(root, 'obsdata', unit)}")
    return done[-1]


def check_root(root: str, unit: str) -> None:
    """A root without ``obsdata/<unit>/`` is a wrong ``--root`` (a typo, a disk not mounted): said
    before anything is written, so a mistyped root is not filled with empty run folders."""
    units = storage.list_prefixes(storage.join(root, "obsdata"))
    if not any(u.upper() == unit.upper() for u in units):
        raise ConfigError(f"the root {root} has no obsdata/{unit}/ (is --root right?)")


def _calset_id(unit: str, night_date: str, binning: int, gain: int | None, camera: str) -> str:
    cam = "".join(c for c in camera if c.isalnum()) or "cam"
    return f"{unit}_{night_date.replace('-', '')}_{binning}x{binning}_gain{gain}_{cam}"


def make_plan(root: str, unit: str, night: str) -> dict:
    """Build the plan of a night. Pure of writes: reads headers and the master library."""
    site = config.site(unit)  # an unknown unit is a configuration error, said before any work
    check_root(root, unit)
    if night not in storage.list_prefixes(storage.join(root, "obsdata", unit)):
        raise ConfigError(f"the root {root} has no night folder obsdata/{unit}/{night}/")
    cfg_masters = config.settings("masters")
    cfg_plan = config.settings("plan")
    night_info = parse_night(night, site.night_folder)
    tally = Tally(unit, night, f"obsdata/{unit}/{night}")
    objects = storage.list_objects(storage.join(root, tally.raw_prefix))
    frames = read_frames(objects, site, tally)
    frames = drop_duplicates(frames, tally.relative, tally.raw_prefix, tally.quarantine)
    # The night's frames share one readout shape per binning (the full 9576x6388 detector, or a
    # region of interest); a frame of another shape cannot be combined or calibrated with them.
    frames = drop_odd_shapes(frames, tally.relative, tally.raw_prefix, tally.quarantine)
    calsets = _calsets(frames, night_info, int(cfg_masters["min_frames"]), tally)
    plan_frames = _science_frames(root, frames, calsets, site, tally)
    raw_count = sum(1 for o in objects if strip_fits_suffix(o.key) is not None)
    if not raw_count:
        tally.warnings.append(f"{tally.raw_prefix} holds no FITS frames")
        log.event(_log, "empty night", level=30, warning=tally.warnings[-1])
    stacks = _stack_groups(plan_frames, unit, float(cfg_plan["stack_gap_minutes"]), int(cfg_plan["min_stack_frames"]))
    stack_of = {fid: st.id for st in stacks for fid in st.frames}
    plan_frames = [dataclasses.replace(f, stack=stack_of[f.id]) if f.id in stack_of else f for f in plan_frames]
    return {
        "schema": PLAN_SCHEMA,
        "unit": unit,
        "night": night,
        "root": root,
        "made": utcnow(),
        "pipeline_version": __version__,
        "settings_hash": config.settings_hash(config.settings()),
        "raw_frames": raw_count,
        "calsets": calsets,
        "frames": [f.to_json() for f in plan_frames],
        "stacks": [st.to_json() for st in stacks],
        "quarantine": tally.quarantine,
        "skipped": tally.skipped,
        "warnings": tally.warnings,
    }


def _calsets(frames: list[FrameInfo], night_info, min_frames: int, tally: Tally) -> list[dict]:
    """Calibration sets: night + unit + binning + gain + camera; darks by exposure, flats by filter."""
    groups: dict[tuple, list[FrameInfo]] = defaultdict(list)
    for info in frames:
        if info.imagetyp in ("BIAS", "DARK", "FLAT"):
            groups[(info.binning, info.gain, info.camera)].append(info)
    calsets = []
    for (binning, gain, camera), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        cid = _calset_id(tally.unit, night_info.date + ("_ToO" if night_info.too else ""), binning, gain, camera)
        mjd = sum(m.mjd for m in members) / len(members)
        calset = {"zero": None, "darks": [], "flats": []}
        name = functools.partial(master_name, unit=tally.unit, night_date=night_info.date, binning=binning, gain=gain,
                                 too=night_info.too)
        biases = sorted((m for m in members if m.imagetyp == "BIAS"), key=lambda m: m.mjd)
        if len(biases) >= min_frames:
            calset["zero"] = {"frames": [tally.key_of(m) for m in biases], "output": name("zero")}
        elif biases:
            tally.warnings.append(f"{len(biases)} bias frames (< {min_frames}): no master bias tonight")
        for exptime, ds in _by(members, "DARK", "exptime", order=lambda kv: kv[0]):
            if len(ds) >= min_frames:
                calset["darks"].append({"exptime": exptime, "frames": [tally.key_of(m) for m in ds],
                                        "output": name("dark", exptime=exptime)})
            else:
                tally.warnings.append(f"{len(ds)} darks of {exptime:g} s (< {min_frames}): no master dark for it tonight")
        for filt, fs in _by(members, "FLAT", "filter", order=lambda kv: str(kv[0])):
            if len(fs) >= min_frames:
                calset["flats"].append({"filter": filt, "frames": [tally.key_of(m) for m in fs],
                                        "output": name("flat", filt=filt)})
            else:
                tally.warnings.append(f"{len(fs)} flats in {filt} (< {min_frames}): no master flat for it tonight")
        if calset["zero"] or calset["darks"] or calset["flats"]:
            calsets.append(Calset(cid, tally.unit, tally.night, binning, gain, camera, mjd, calset["zero"],
                                  tuple(calset["darks"]), tuple(calset["flats"])).to_json())
    return calsets


def _by(members: list[FrameInfo], imagetyp: str, attr: str, order) -> list[tuple[object, list[FrameInfo]]]:
    """The frames of one type grouped by an attribute (exposure, filter), the groups sorted by
    ``order`` of (value, frames), each group in time order."""
    groups = defaultdict(list)
    for m in members:
        if m.imagetyp == imagetyp:
            groups[getattr(m, attr)].append(m)
    return [(k, sorted(v, key=lambda m: m.mjd)) for k, v in sorted(groups.items(), key=order)]


def _planned_masters(calsets: list[dict], unit: str) -> list[library.Master]:
    """Tonight's masters as library entries, so that science frames choose among them first."""
    planned = []
    for cs in calsets:
        base = dict(binning=cs["binning"], gain=cs["gain"], mjd=cs["mjd"])
        if cs["zero"]:
            planned.append(library.Master(cs["zero"]["output"], "zero", unit, verdict="planned", exptime=None, filter=None, **base))
        for d in cs["darks"]:
            planned.append(library.Master(d["output"], "dark", unit, verdict="planned", exptime=d["exptime"], filter=None, **base))
        for f in cs["flats"]:
            planned.append(library.Master(f["output"], "flat", unit, verdict="planned", exptime=None, filter=f["filter"], **base))
    return planned


def _science_frames(root: str, frames: list[FrameInfo], calsets: list[dict], site: config.Site,
                    tally: Tally) -> list[Frame]:
    """The plan's science frames, in time order, each with its masters (tonight's when planned,
    else the library's nearest good one); a frame with none is quarantined."""
    library_index = {kind: library.index(root, tally.unit, kind) for kind in library.KINDS}
    planned = _planned_masters(calsets, tally.unit)
    plan_frames = []
    lights = sorted((f for f in frames if f.imagetyp == "LIGHT"), key=lambda f: f.mjd)
    copies = same_name_copies(lights, tally.unit)
    for info in lights:
        masters, missing = {}, []
        for kind in library.KINDS:
            query = dict(kind=kind, mjd=info.mjd, binning=info.binning, gain=info.gain,
                         exptime=info.exptime, filt=info.filter)
            # Tonight's masters win; the library fills in what tonight lacks.
            choice = library.choose(planned, validity_days=1.0, **query) or library.choose(library_index[kind], **query)
            if choice is None:
                missing.append(kind)
            else:
                masters[kind] = choice.key
        raw = tally.key_of(info)
        if missing:
            reason = f"no master {', '.join(missing)} for filter {info.filter} within the validity window"
            tally.quarantined(raw, reason, {"file": raw, "kind": "bad_input", "exit_code": BadInputError.exit_code,
                                            "stage": "plan", "reason": reason})
            continue
        plan_frames.append(_frame_entry(info, raw, masters, copies[info.url], site, tally))
    return plan_frames


def _frame_entry(info: FrameInfo, raw: str, masters: dict, copy: int, site: config.Site, tally: Tally) -> Frame:
    field_name = safe_name(info.object)
    stem = strip_fits_suffix(info.name)
    notes = tally.frame_notes[info.url]
    if field_name != info.object:
        warn(tally.warnings, notes, raw, f"OBJECT {info.object!r} is not a safe name: the field is {field_name!r}")
    if copy:
        warn(tally.warnings, notes, raw,
              f"another frame of {field_name} {info.filter} started in the same second: named apart with _{copy + 1}")
    name_args = (tally.unit, field_name, info.when, info.filter, info.exptime)
    return Frame(
        # other sites' file names are anything their software wrote (spaces, brackets)
        id=stem if site.header_dialect == "tcspy" else safe_name(stem), raw=raw, object=field_name,
        filter=info.filter, exptime=info.exptime, date_obs=info.date_obs, mjd=info.mjd, binning=info.binning,
        gain=info.gain, camera=info.camera, masters=masters,
        output=f"{processed_dir(field_name, tally.unit, info.filter)}/{calib_name(*name_args, copy=copy)}",
        egain=info.egain, rdnoise=info.rdnoise if info.egain is not None else None, warnings=tuple(notes))


def _stack_groups(frames: list[Frame], unit: str, gap_minutes: float, min_frames: int) -> list[Stack]:
    """Stack groups: field, filter, unit, and a time block (a new block after a long gap)."""
    by_group = defaultdict(list)
    for f in frames:
        by_group[(f.object, f.filter)].append(f)
    stacks = []
    for (field, filt), members in sorted(by_group.items()):
        members.sort(key=lambda f: f.mjd)
        blocks, current = [], [members[0]]
        for prev, f in zip(members, members[1:]):
            if (f.mjd - prev.mjd) * 1440.0 > gap_minutes:
                blocks.append(current)
                current = []
            current.append(f)
        blocks.append(current)
        for i, block in enumerate(blocks):
            if len(block) < min_frames:
                continue
            sid = stack_id(field, filt, unit, i)
            start = datetime.fromisoformat(block[0].date_obs)
            end = datetime.fromisoformat(block[-1].date_obs) + timedelta(seconds=block[-1].exptime)
            total = sum(f.exptime for f in block)
            stacks.append(Stack(
                id=sid, field=field, filter=filt, unit=unit, block=i, frames=tuple(f.id for f in block),
                start=start.isoformat(), end=end.isoformat(),
                output=f"{processed_dir(field, unit, filt)}/{stack_name(unit, field, start + (end - start) / 2, filt, total)}",
            ))
    return stacks


def run(ctx: Night, outputs_dir: str | None = None) -> dict:
    """Plan the night, write plan.json (and the fan-out lists for Argo when asked)."""
    plan = make_plan(ctx.root, ctx.unit, ctx.night)
    key = f"{ctx.run_prefix}/plan.json"
    storage.put_bytes(ctx.url(key), json.dumps(plan, indent=1).encode())
    ctx._plan = plan
    if outputs_dir:
        write_outputs(plan, Path(outputs_dir))
    summary = {
        "plan": key,
        "calsets": len(plan["calsets"]),
        "frames": len(plan["frames"]),
        "stacks": len(plan["stacks"]),
        "quarantined": len(plan["quarantine"]),
        "warnings": plan["warnings"],
    }
    log.event(_log, "planned", unit=ctx.unit, night=ctx.night, **{k: v for k, v in summary.items() if k != "warnings"})
    from .notify import notify_start  # never raises: a Slack outage must not stop a night

    notify_start(ctx, summary)
    return summary


def write_outputs(plan: dict, folder: Path) -> None:
    """The lists Argo's ``withParam`` consumes, one JSON file each, plus the night chosen."""
    from ..graph import PLAN_LISTS

    folder.mkdir(parents=True, exist_ok=True)
    for fanout, key in PLAN_LISTS.items():
        (folder / f"{key}.json").write_text(json.dumps([item["id"] for item in plan[key]]))
    (folder / "night").write_text(plan["night"])
