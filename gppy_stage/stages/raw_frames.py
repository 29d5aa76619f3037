"""What planning a night reads from its folder: each raw frame's header (the FITS header itself,
a TCSpy ``.head`` sidecar checked against it), and the frames it drops on the way (unreadable,
another unit's, byte-identical duplicates, odd shapes), each with its reason, in a tally the
plan is made from (stages/plan.py)."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from astropy.io import fits

from .. import config, log, storage
from ..errors import BadInputError, GppyError, RetriableError
from ..headers import BLOCK, FrameInfo, frame_info, header_from_bytes
from ..names import FITS_SUFFIXES, calib_name, safe_name, strip_fits_suffix

_log = log.get("plan")  # the plan's log: these are its steps


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


def read_header(obj: storage.ObjectInfo, by_key: dict[str, storage.ObjectInfo]) -> tuple[fits.Header, list[str]]:
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


def drop_odd_shapes(frames: list[FrameInfo], relative: dict[str, str], raw_prefix: str,
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


def warn(warnings: list[str], frame_notes: list[str], file: str, note: str) -> None:
    """A warning on a frame: on the frame's plan entry, in the plan's list and in the log."""
    frame_notes.append(note)
    warnings.append(f"{storage.basename(file)}: {note}")
    log.event(_log, "frame warning", level=30, file=file, warning=note)


def skip(skipped: list[dict], warnings: list[str], file: str, reason: str) -> None:
    """A file of the night folder that is not planned: listed, and said in the night report."""
    skipped.append({"file": file, "reason": reason})
    warnings.append(f"{storage.basename(file)}: skipped: {reason}")
    log.event(_log, "skipped", level=30, file=file, reason=reason)


def drop_duplicates(frames: list[FrameInfo], relative: dict[str, str], raw_prefix: str,
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


def same_name_copies(lights: list[FrameInfo], unit: str) -> dict[str, int]:
    """Different exposures started in the same second (another file name, other pixels) would share
    a calib name: each gets its own (0 for the first by DATE-OBS then file name, 1, 2... for the
    others), so a re-plan names every frame as before and none overwrites another's product."""
    groups: dict[str, list[FrameInfo]] = defaultdict(list)
    for info in lights:
        groups[calib_name(unit, safe_name(info.object), info.when, info.filter, info.exptime)].append(info)
    return {info.url: i for members in groups.values()
            for i, info in enumerate(sorted(members, key=lambda m: (m.date_obs, m.name)))}


@dataclass
class Tally:
    """What planning a night gathers as it reads it: the frames' raw keys and notes, and what is
    quarantined, skipped and warned about (each with its reason)."""

    unit: str
    night: str
    raw_prefix: str
    relative: dict[str, str] = field(default_factory=dict)
    frame_notes: dict[str, list[str]] = field(default_factory=dict)
    quarantine: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def key_of(self, info: FrameInfo) -> str:
        return f"{self.raw_prefix}/{self.relative[info.url]}"

    def quarantined(self, raw: str, reason: str, record: dict) -> None:
        self.quarantine.append(record)
        log.event(_log, "quarantined", file=raw, reason=reason)


def read_frames(objects: list[storage.ObjectInfo], site: config.Site, tally: Tally) -> list[FrameInfo]:
    """Every FITS frame of the night folder read from its header; what cannot be read is
    quarantined, another unit's frames and orphan ``.head`` files are skipped."""
    by_key = {o.key: o for o in objects}
    frames: list[FrameInfo] = []
    for obj in objects:
        raw = f"{tally.raw_prefix}/{obj.key}"
        if strip_fits_suffix(obj.key) is None:
            if obj.key.endswith(".head") and not any(f"{obj.key[:-5]}{sfx}" in by_key for sfx in FITS_SUFFIXES):
                skip(tally.skipped, tally.warnings, raw, "a .head sidecar with no FITS file beside it")
            continue
        try:
            try:
                hdr, notes = read_header(obj, by_key)
                info = frame_info(hdr, obj.url, obj.size, site=site)
            except (ValueError, TypeError, KeyError) as exc:  # a header value that cannot be what it says
                raise BadInputError(f"unreadable header ({type(exc).__name__}: {exc})", path=obj.url) from exc
        except RetriableError:
            raise  # the store hiccuped: the plan is retried, the frame is not lost
        except GppyError as exc:
            tally.quarantined(raw, exc.reason, {**exc.as_record(), "file": raw, "stage": "plan"})
            continue
        if info.unit and info.unit.upper() != tally.unit.upper():
            skip(tally.skipped, tally.warnings, raw, f"TELESCOP is {info.unit}, not {tally.unit}")
            continue
        if int(hdr.get("BITPIX", 16)) < 0:
            notes.append(f"floating-point raw frame (BITPIX {hdr['BITPIX']}): reduced as it is")
        tally.frame_notes[info.url] = []
        for note in notes:
            warn(tally.warnings, tally.frame_notes[info.url], raw, note)
        frames.append(info)
        tally.relative[info.url] = obj.key
    return frames
