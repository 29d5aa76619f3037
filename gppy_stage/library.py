"""The master library: masters under ``master_frame/<unit>/{zero,dark,flat,fringe}/`` and their index.

The index is the set of sidecars (``<master>.fits.json``) the masters stage writes beside each
master: one object per master, so masters of different calibration sets can be written at once
without a shared index file to race on. A query is banzai's: same unit, binning and gain (and
filter for flats), inside a validity window, not flagged bad, nearest in time; darks prefer the
same exposure time and otherwise the nearest one (the reduction scales it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import log, storage
from .config import settings
from .names import master_name

KINDS = ("zero", "dark", "flat")  # what every science frame needs (the planner asks for each)
FRINGE = "fringe"  # master fringe frames, per band, only for the bands a site defringes
_log = log.get("library")


@dataclass(frozen=True)
class Master:
    key: str  # relative to the root
    kind: str
    unit: str
    mjd: float
    binning: int
    gain: int | None
    exptime: float | None
    filter: str | None
    verdict: str

    @classmethod
    def from_sidecar(cls, key: str, meta: dict) -> "Master":
        return cls(
            key=key,
            kind=meta["kind"],
            unit=meta["unit"],
            mjd=float(meta["mjd"]),
            binning=int(meta.get("binning", 1)),
            gain=meta.get("gain"),
            exptime=meta.get("exptime"),
            filter=meta.get("filter"),
            verdict=meta.get("qa", {}).get("verdict", "good"),
        )


def index(root: str, unit: str, kind: str) -> list[Master]:
    """Every master of a kind for a unit, read from the sidecars."""
    prefix = storage.join(root, "master_frame", unit, kind)
    out = []
    for obj in storage.list_objects(prefix):
        if not obj.key.endswith(".fits.json"):
            continue
        key = f"master_frame/{unit}/{kind}/{obj.key[: -len('.json')]}"
        try:
            out.append(Master.from_sidecar(key, json.loads(storage.get_bytes(obj.url))))
        except (ValueError, KeyError, TypeError) as exc:  # one damaged entry must not hide the others
            log.event(_log, "master library entry unreadable; skipped", level=30, entry=obj.url, reason=str(exc))
    return out


def choose(candidates: list[Master], *, kind: str, mjd: float, binning: int, gain: int | None,
           exptime: float | None = None, filt: str | None = None, validity_days: float | None = None,
           exclude: tuple[str, ...] = ()) -> Master | None:
    """The best master for a frame taken at ``mjd``, or None. Pure: the query without the I/O."""
    window = validity_days if validity_days is not None else settings("masters")["validity_days"][kind]
    ok = [
        m for m in candidates
        if m.kind == kind and m.verdict != "bad" and m.key not in exclude and m.binning == binning
        and (gain is None or m.gain is None or m.gain == gain)
        and (kind not in ("flat", FRINGE) or m.filter == filt)
        and abs(m.mjd - mjd) <= window
    ]
    if not ok:
        return None

    def rank(m: Master):
        exposure_miss = abs((m.exptime or 0.0) - (exptime or 0.0)) if kind == "dark" else 0.0
        return (exposure_miss > 1e-3, exposure_miss, abs(m.mjd - mjd))

    return min(ok, key=rank)


def find(root: str, unit: str, kind: str, **query) -> Master | None:
    return choose(index(root, unit, kind), kind=kind, **query)


def fringe_name(unit: str, night_date: str, binning: int, gain: int | None, filt: str, too: bool = False) -> str:
    """``master_frame/<unit>/fringe/fringe_<unit>_<YYYYMMDD>_<filter>_<b>x<b>[_gain<g>].fits``: a
    flat's name in the fringe folder (one master fringe per night, band, binning and gain)."""
    flat = master_name("flat", unit, night_date, binning, gain, filt=filt, too=too)
    folder, name = flat.rsplit("/", 1)
    return f"{folder.rsplit('/', 1)[0]}/{FRINGE}/{FRINGE}{name[len('flat'):]}"
