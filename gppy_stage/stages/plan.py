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
               "camera", "masters": {"zero": key, "dark": key, "flat": key}, "output": key, "stack": id}],
  "stacks":  [{"id", "field", "filter", "unit", "block", "frames": [frame id...], "start", "end", "output"}],
  "quarantine": [{"file", "kind", "exit_code", "reason", "stage"}],
  "skipped": [{"file", "reason"}], "warnings": [str]
}
```
Keys are relative to the root. Frame ids are the raw file stems; they are unique in a night.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from astropy.io import fits

from .. import __version__, config, library, log, storage
from ..errors import BadInputError, ConfigError, GppyError, RetriableError
from ..headers import BLOCK, FrameInfo, frame_info, header_from_head_text
from ..names import (
    NightName,
    calib_name,
    master_name,
    night_date_of,
    parse_night,
    processed_dir,
    stack_name,
    strip_fits_suffix,
)
from .base import PLAN_SCHEMA, Night, utcnow

_log = log.get("plan")


def night_folders(root: str, unit: str) -> list[NightName]:
    """Every night folder of a unit (regular, ToO, test), oldest first; on one date a ToO folder
    sorts before the regular night. Folders that are not night names are ignored."""
    nights = []
    for name in storage.list_prefixes(storage.join(root, "obsdata", unit)):
        try:
            nights.append(parse_night(name))
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
    done = [n for n in list_nights(root, unit) if parse_night(n).date < current]
    if not done:
        raise ConfigError(f"no complete night for {unit} under {storage.join(root, 'obsdata', unit)}")
    return done[-1]


def _read_header(obj: storage.ObjectInfo, by_key: dict[str, storage.ObjectInfo]) -> fits.Header:
    stem = strip_fits_suffix(obj.key)
    head = by_key.get(f"{stem}.head")
    if head is not None:
        return header_from_head_text(storage.get_bytes(head.url).decode("ascii", "replace"))
    # No sidecar: read the first blocks until the END card (a raw header is a few blocks), so an
    # S3 night is planned without downloading any pixels.
    end = b"END" + b" " * 77
    nbytes = BLOCK * 4
    while True:
        blob = storage.get_head(obj.url, nbytes)
        for at in range(0, len(blob) - 79, 80):
            if blob[at:at + 80] == end:
                try:
                    return fits.Header.fromstring(blob[: at + 80].decode("ascii", "replace"))
                except ValueError as exc:
                    raise BadInputError(f"unreadable FITS header ({exc})", path=obj.url) from None
        if len(blob) < nbytes or nbytes >= BLOCK * 64:
            raise BadInputError("cannot read a FITS header (no END card)", path=obj.url)
        nbytes *= 4


def _drop_odd_shapes(frames: list[FrameInfo], relative: dict[str, str], raw_prefix: str,
                     quarantine: list[dict]) -> list[FrameInfo]:
    shapes: dict[int, Counter] = defaultdict(Counter)
    for info in frames:
        shapes[info.binning][info.shape] += 1
    kept = []
    for info in frames:
        usual = shapes[info.binning].most_common(1)[0][0]
        if info.shape == usual:
            kept.append(info)
            continue
        reason = (f"image is {info.shape[1]}x{info.shape[0]} but the night's {info.binning}x{info.binning} frames "
                  f"are {usual[1]}x{usual[0]}")
        quarantine.append({"file": f"{raw_prefix}/{relative[info.url]}", "kind": "bad_input",
                           "exit_code": BadInputError.exit_code, "reason": reason, "stage": "plan"})
        log.event(_log, "quarantined", file=info.name, reason=reason)
    return kept


def _calset_id(unit: str, night_date: str, binning: int, gain: int | None, camera: str) -> str:
    cam = "".join(c for c in camera if c.isalnum()) or "cam"
    return f"{unit}_{night_date.replace('-', '')}_{binning}x{binning}_gain{gain}_{cam}"


def make_plan(root: str, unit: str, night: str) -> dict:
    """Build the plan of a night. Pure of writes: reads headers and the master library."""
    config.instrument(unit)  # an unknown unit is a configuration error, said before any work
    cfg_masters = config.settings("masters")
    cfg_plan = config.settings("plan")
    min_frames = int(cfg_masters["min_frames"])
    night_info = parse_night(night)
    raw_prefix = f"obsdata/{unit}/{night}"
    objects = storage.list_objects(storage.join(root, raw_prefix))
    by_key = {o.key: o for o in objects}
    frames: list[FrameInfo] = []
    quarantine, skipped, warnings = [], [], []
    relative: dict[str, str] = {}
    for obj in objects:
        if strip_fits_suffix(obj.key) is None:
            continue
        try:
            try:
                hdr = _read_header(obj, by_key)
                info = frame_info(hdr, obj.url, obj.size)
            except (ValueError, TypeError, KeyError) as exc:  # a header value that cannot be what it says
                raise BadInputError(f"unreadable header ({type(exc).__name__}: {exc})", path=obj.url) from None
        except RetriableError:
            raise  # the store hiccuped: the plan is retried, the frame is not lost
        except GppyError as exc:
            record = {**exc.as_record(), "file": f"{raw_prefix}/{obj.key}", "stage": "plan"}
            quarantine.append(record)
            log.event(_log, "quarantined", file=record["file"], reason=exc.reason)
            continue
        if info.unit and info.unit.upper() != unit.upper():
            skipped.append({"file": f"{raw_prefix}/{obj.key}", "reason": f"TELESCOP is {info.unit}, not {unit}"})
            continue
        frames.append(info)
        relative[info.url] = obj.key

    # The night's frames share one readout shape per binning (the full 9576x6388 detector, or a
    # region of interest); a frame of another shape cannot be combined or calibrated with them.
    frames = _drop_odd_shapes(frames, relative, raw_prefix, quarantine)

    def key_of(info: FrameInfo) -> str:
        return f"{raw_prefix}/{relative[info.url]}"

    # Calibration sets: night + unit + binning + gain + camera; darks by exposure, flats by filter.
    groups: dict[tuple, list[FrameInfo]] = defaultdict(list)
    for info in frames:
        if info.imagetyp in ("BIAS", "DARK", "FLAT"):
            groups[(info.binning, info.gain, info.camera)].append(info)
    calsets = []
    for (binning, gain, camera), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        cid = _calset_id(unit, night_info.date + ("_ToO" if night_info.too else ""), binning, gain, camera)
        mjd = sum(m.mjd for m in members) / len(members)
        calset = {"id": cid, "unit": unit, "night": night, "binning": binning, "gain": gain, "camera": camera,
                  "mjd": mjd, "zero": None, "darks": [], "flats": []}
        biases = sorted((m for m in members if m.imagetyp == "BIAS"), key=lambda m: m.mjd)
        if len(biases) >= min_frames:
            calset["zero"] = {"frames": [key_of(m) for m in biases],
                              "output": master_name("zero", unit, night_info.date, binning, gain, too=night_info.too)}
        elif biases:
            warnings.append(f"{len(biases)} bias frames (< {min_frames}): no master bias tonight")
        darks = defaultdict(list)
        for m in members:
            if m.imagetyp == "DARK":
                darks[m.exptime].append(m)
        for exptime, ds in sorted(darks.items()):
            if len(ds) >= min_frames:
                calset["darks"].append({"exptime": exptime, "frames": [key_of(m) for m in sorted(ds, key=lambda m: m.mjd)],
                                        "output": master_name("dark", unit, night_info.date, binning, gain, exptime=exptime, too=night_info.too)})
            else:
                warnings.append(f"{len(ds)} darks of {exptime:g} s (< {min_frames}): no master dark for it tonight")
        flats = defaultdict(list)
        for m in members:
            if m.imagetyp == "FLAT":
                flats[m.filter].append(m)
        for filt, fs in sorted(flats.items(), key=lambda kv: str(kv[0])):
            if len(fs) >= min_frames:
                calset["flats"].append({"filter": filt, "frames": [key_of(m) for m in sorted(fs, key=lambda m: m.mjd)],
                                        "output": master_name("flat", unit, night_info.date, binning, gain, filt=filt, too=night_info.too)})
            else:
                warnings.append(f"{len(fs)} flats in {filt} (< {min_frames}): no master flat for it tonight")
        if calset["zero"] or calset["darks"] or calset["flats"]:
            calsets.append(calset)

    # Masters for science frames: tonight's when planned, else the library's nearest good one.
    library_index = {kind: library.index(root, unit, kind) for kind in library.KINDS}
    planned = []
    for cs in calsets:
        base = dict(binning=cs["binning"], gain=cs["gain"], mjd=cs["mjd"])
        if cs["zero"]:
            planned.append(library.Master(cs["zero"]["output"], "zero", unit, verdict="planned", exptime=None, filter=None, **base))
        for d in cs["darks"]:
            planned.append(library.Master(d["output"], "dark", unit, verdict="planned", exptime=d["exptime"], filter=None, **base))
        for f in cs["flats"]:
            planned.append(library.Master(f["output"], "flat", unit, verdict="planned", exptime=None, filter=f["filter"], **base))

    plan_frames = []
    lights = sorted((f for f in frames if f.imagetyp == "LIGHT"), key=lambda f: f.mjd)
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
        raw = key_of(info)
        if missing:
            record = {"file": raw, "kind": "bad_input", "exit_code": BadInputError.exit_code, "stage": "plan",
                      "reason": f"no master {', '.join(missing)} for filter {info.filter} within the validity window"}
            quarantine.append(record)
            log.event(_log, "quarantined", file=raw, reason=record["reason"])
            continue
        field = info.object or "UNKNOWN"
        plan_frames.append({
            "id": strip_fits_suffix(info.name), "raw": raw, "object": field, "filter": info.filter,
            "exptime": info.exptime, "date_obs": info.date_obs, "mjd": info.mjd, "binning": info.binning,
            "gain": info.gain, "camera": info.camera, "masters": masters,
            "output": f"{processed_dir(field, unit, info.filter)}/{calib_name(unit, field, info.when, info.filter, info.exptime)}",
        })

    stacks = _stack_groups(plan_frames, unit, float(cfg_plan["stack_gap_minutes"]), int(cfg_plan["min_stack_frames"]))
    return {
        "schema": PLAN_SCHEMA,
        "unit": unit,
        "night": night,
        "root": root,
        "made": utcnow(),
        "pipeline_version": __version__,
        "settings_hash": config.settings_hash(config.settings()),
        "raw_frames": sum(1 for o in objects if strip_fits_suffix(o.key) is not None),
        "calsets": calsets,
        "frames": plan_frames,
        "stacks": stacks,
        "quarantine": quarantine,
        "skipped": skipped,
        "warnings": warnings,
    }


def _stack_groups(frames: list[dict], unit: str, gap_minutes: float, min_frames: int) -> list[dict]:
    """Stack groups: field, filter, unit, and a time block (a new block after a long gap)."""
    by_group = defaultdict(list)
    for f in frames:
        by_group[(f["object"], f["filter"])].append(f)
    stacks = []
    for (field, filt), members in sorted(by_group.items()):
        members.sort(key=lambda f: f["mjd"])
        blocks, current = [], [members[0]]
        for prev, f in zip(members, members[1:]):
            if (f["mjd"] - prev["mjd"]) * 1440.0 > gap_minutes:
                blocks.append(current)
                current = []
            current.append(f)
        blocks.append(current)
        for i, block in enumerate(blocks):
            if len(block) < min_frames:
                continue
            sid = f"{field}_{filt}_{unit}_{i}"
            start = datetime.fromisoformat(block[0]["date_obs"])
            end = datetime.fromisoformat(block[-1]["date_obs"]) + timedelta(seconds=block[-1]["exptime"])
            total = sum(f["exptime"] for f in block)
            for f in block:
                f["stack"] = sid
            stacks.append({
                "id": sid, "field": field, "filter": filt, "unit": unit, "block": i,
                "frames": [f["id"] for f in block], "start": start.isoformat(), "end": end.isoformat(),
                "output": f"{processed_dir(field, unit, filt)}/{stack_name(unit, field, start + (end - start) / 2, filt, total)}",
            })
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
