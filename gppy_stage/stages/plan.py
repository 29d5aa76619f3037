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
Keys are relative to the root. Frame ids are the raw file stems; they are unique in a night. Every
name is built from header values through ``names.safe_name``; a frame whose OBJECT is not a safe
name gets the safe one as its field, with a warning.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

from astropy.io import fits

from .. import __version__, config, library, log, storage
from ..errors import BadInputError, ConfigError, GppyError, RetriableError
from ..headers import BLOCK, FrameInfo, frame_info, header_from_bytes
from ..names import (
    FITS_SUFFIXES,
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
from .base import PLAN_SCHEMA, Night, utcnow

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


# what a TCSpy .head sidecar and its FITS header must agree on: the keys the plan is made from
HEAD_KEYS = ("IMAGETYP", "OBJECT", "FILTER", "EXPTIME", "DATE-OBS", "NAXIS1", "NAXIS2", "TELESCOP", "XBINNING", "GAIN")


def _fits_header(obj: storage.ObjectInfo) -> tuple[fits.Header, list[str]]:
    """The primary header, read up to its END card (a raw header is a few blocks), so an S3
    night is planned without downloading any pixels."""
    end = b"END" + b" " * 77
    nbytes = BLOCK * 4
    while True:
        blob = storage.get_head(obj.url, nbytes)
        for at in range(0, len(blob) - 79, 80):
            if blob[at:at + 80] == end:
                return header_from_bytes(blob[: at + 80], obj.url)
        if len(blob) < nbytes or nbytes >= BLOCK * 64:
            raise BadInputError("cannot read a FITS header (no END card)", path=obj.url)
        nbytes *= 4


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip() == str(b).strip()


def _read_header(obj: storage.ObjectInfo, by_key: dict[str, storage.ObjectInfo]) -> tuple[fits.Header, list[str]]:
    """The header the plan is made from, and warnings about it.

    The FITS file's own header wins over its ``.head`` sidecar: it is the header the later stages
    read with the pixels, so planning from anything else would plan one frame and reduce another.
    A sidecar that disagrees is reported (a warning on the frame in plan.json). A tile-compressed
    file's primary header is not the image's, so there the sidecar is the header."""
    stem = strip_fits_suffix(obj.key)
    head = by_key.get(f"{stem}.head")
    if head is not None and obj.key.lower().endswith(".fz"):
        return header_from_bytes(storage.get_bytes(head.url), head.url)
    header, notes = _fits_header(obj)
    if head is None:
        return header, notes
    try:
        side, side_notes = header_from_bytes(storage.get_bytes(head.url), head.url)
    except BadInputError as exc:
        return header, notes + [f"{storage.basename(head.url)} is unreadable ({exc.reason}); the FITS header is used"]
    notes += side_notes
    for key in HEAD_KEYS:
        if (key in side or key in header) and not _same(side.get(key), header.get(key)):
            notes.append(f"{storage.basename(head.url)} says {key}={side.get(key)!r} but the FITS header says "
                         f"{header.get(key)!r}; the FITS header is used")
    return header, notes


def check_root(root: str, unit: str) -> None:
    """A root without ``obsdata/<unit>/`` is a wrong ``--root`` (a typo, a disk not mounted): said
    before anything is written, so a mistyped root is not filled with empty run folders."""
    units = storage.list_prefixes(storage.join(root, "obsdata"))
    if not any(u.upper() == unit.upper() for u in units):
        raise ConfigError(f"the root {root} has no obsdata/{unit}/ (is --root right?)")


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


def _warn(warnings: list[str], frame_notes: list[str], file: str, note: str) -> None:
    """A warning on a frame: on the frame's plan entry, in the plan's list and in the log."""
    frame_notes.append(note)
    warnings.append(f"{storage.basename(file)}: {note}")
    log.event(_log, "frame warning", level=30, file=file, warning=note)


def _skip(skipped: list[dict], warnings: list[str], file: str, reason: str) -> None:
    """A file of the night folder that is not planned: listed, and said in the night report."""
    skipped.append({"file": file, "reason": reason})
    warnings.append(f"{storage.basename(file)}: skipped: {reason}")
    log.event(_log, "skipped", level=30, file=file, reason=reason)


def _drop_duplicates(frames: list[FrameInfo], relative: dict[str, str], raw_prefix: str,
                     quarantine: list[dict]) -> list[FrameInfo]:
    """Byte-identical copies of a frame under other names are quarantined as duplicates of the
    first: combined or stacked twice, one exposure would count as two. Only frames that share
    type, unit and DATE-OBS are compared, so a night is not read whole to find them."""
    groups: dict[tuple, list[FrameInfo]] = defaultdict(list)
    for info in frames:
        groups[(info.imagetyp, info.unit, info.date_obs, info.size)].append(info)
    dropped = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        seen: dict[str, FrameInfo] = {}
        for info in sorted(members, key=lambda i: i.name):
            digest = hashlib.sha256(storage.get_bytes(info.url)).hexdigest()
            if digest in seen:
                reason = f"a byte-identical duplicate of {seen[digest].name}"
                quarantine.append({"file": f"{raw_prefix}/{relative[info.url]}", "kind": "bad_input",
                                   "exit_code": BadInputError.exit_code, "reason": reason, "stage": "plan"})
                log.event(_log, "quarantined", file=info.name, reason=reason)
                dropped.add(info.url)
            else:
                seen[digest] = info
    return [f for f in frames if f.url not in dropped]


def _same_name_copies(lights: list[FrameInfo], unit: str) -> dict[str, int]:
    """Different exposures started in the same second (another file name, other pixels) would share
    a calib name: each gets its own (0 for the first by DATE-OBS then file name, 1, 2... for the
    others), so a re-plan names every frame as before and none overwrites another's product."""
    groups: dict[str, list[FrameInfo]] = defaultdict(list)
    for info in lights:
        groups[calib_name(unit, safe_name(info.object), info.when, info.filter, info.exptime)].append(info)
    return {info.url: i for members in groups.values()
            for i, info in enumerate(sorted(members, key=lambda m: (m.date_obs, m.name)))}


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
    min_frames = int(cfg_masters["min_frames"])
    night_info = parse_night(night, site.night_folder)
    raw_prefix = f"obsdata/{unit}/{night}"
    objects = storage.list_objects(storage.join(root, raw_prefix))
    by_key = {o.key: o for o in objects}
    frames: list[FrameInfo] = []
    quarantine, skipped, warnings = [], [], []
    relative: dict[str, str] = {}
    frame_notes: dict[str, list[str]] = {}
    for obj in objects:
        if strip_fits_suffix(obj.key) is None:
            if obj.key.endswith(".head") and not any(f"{obj.key[:-5]}{sfx}" in by_key for sfx in FITS_SUFFIXES):
                _skip(skipped, warnings, f"{raw_prefix}/{obj.key}", "a .head sidecar with no FITS file beside it")
            continue
        try:
            try:
                hdr, notes = _read_header(obj, by_key)
                info = frame_info(hdr, obj.url, obj.size, site=site)
            except (ValueError, TypeError, KeyError) as exc:  # a header value that cannot be what it says
                raise BadInputError(f"unreadable header ({type(exc).__name__}: {exc})", path=obj.url) from exc
        except RetriableError:
            raise  # the store hiccuped: the plan is retried, the frame is not lost
        except GppyError as exc:
            record = {**exc.as_record(), "file": f"{raw_prefix}/{obj.key}", "stage": "plan"}
            quarantine.append(record)
            log.event(_log, "quarantined", file=record["file"], reason=exc.reason)
            continue
        if info.unit and info.unit.upper() != unit.upper():
            _skip(skipped, warnings, f"{raw_prefix}/{obj.key}", f"TELESCOP is {info.unit}, not {unit}")
            continue
        if int(hdr.get("BITPIX", 16)) < 0:
            notes.append(f"floating-point raw frame (BITPIX {hdr['BITPIX']}): reduced as it is")
        frame_notes[info.url] = []
        for note in notes:
            _warn(warnings, frame_notes[info.url], f"{raw_prefix}/{obj.key}", note)
        frames.append(info)
        relative[info.url] = obj.key

    frames = _drop_duplicates(frames, relative, raw_prefix, quarantine)
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
    copies = _same_name_copies(lights, unit)
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
        field = safe_name(info.object)
        stem = strip_fits_suffix(info.name)
        entry = {
            # other sites' file names are anything their software wrote (spaces, brackets)
            "id": stem if site.header_dialect == "tcspy" else safe_name(stem), "raw": raw, "object": field, "filter": info.filter,
            "exptime": info.exptime, "date_obs": info.date_obs, "mjd": info.mjd, "binning": info.binning,
            "gain": info.gain, "camera": info.camera, "masters": masters,
        }
        if info.egain is not None:
            entry.update(egain=info.egain, rdnoise=info.rdnoise)
        if field != info.object:
            _warn(warnings, frame_notes[info.url], raw, f"OBJECT {info.object!r} is not a safe name: the field is {field!r}")
        name_args = (unit, field, info.when, info.filter, info.exptime)
        copy = copies[info.url]
        if copy:
            _warn(warnings, frame_notes[info.url], raw,
                  f"another frame of {field} {info.filter} started in the same second: named apart with _{copy + 1}")
        entry["output"] = f"{processed_dir(field, unit, info.filter)}/{calib_name(*name_args, copy=copy)}"
        if frame_notes[info.url]:
            entry["warnings"] = frame_notes[info.url]
        plan_frames.append(entry)

    raw_count = sum(1 for o in objects if strip_fits_suffix(o.key) is not None)
    if not raw_count:
        warnings.append(f"{raw_prefix} holds no FITS frames")
        log.event(_log, "empty night", level=30, warning=warnings[-1])
    stacks = _stack_groups(plan_frames, unit, float(cfg_plan["stack_gap_minutes"]), int(cfg_plan["min_stack_frames"]))
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
            sid = stack_id(field, filt, unit, i)
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
