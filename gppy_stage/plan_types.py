"""The contract of plan.json (``gppy-stage/plan/1``): the planner's entries as frozen dataclasses
(Calset, Frame, Stack), and plan.json as a JSON schema, so that a change to what
the planner writes, or to what a stage expects of it, fails a test instead of a night.

The planner is ``stages/plan.py``; a stage reads its entry through ``Night.item``. The schema is
strict (no key it does not name) because every later stage, local or on Argo, reads these keys
by name: a key renamed on one side only must not pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stages.base import PLAN_SCHEMA

_KEY = {"type": "string", "minLength": 1}  # a key relative to the storage root
_KEYS = {"type": "array", "items": _KEY, "minItems": 1}
_NUMBER = {"type": "number"}
_TEXT_OR_NULL = {"type": ["string", "null"]}


def _entry(required: dict, optional: dict | None = None) -> dict:
    props = {**required, **(optional or {})}
    return {"type": "object", "properties": props, "required": sorted(required), "additionalProperties": False}


_MASTER_GROUP = {"frames": _KEYS, "output": _KEY}
CALSET = _entry({
    "id": _KEY, "unit": _KEY, "night": _KEY, "binning": {"type": "integer", "minimum": 1},
    "gain": {"type": ["integer", "null"]}, "camera": _TEXT_OR_NULL, "mjd": _NUMBER,
    "zero": {"oneOf": [{"type": "null"}, _entry(_MASTER_GROUP)]},
    "darks": {"type": "array", "items": _entry({"exptime": _NUMBER, **_MASTER_GROUP})},
    "flats": {"type": "array", "items": _entry({"filter": _TEXT_OR_NULL, **_MASTER_GROUP})},
})
FRAME = _entry({
    "id": _KEY, "raw": _KEY, "object": _KEY, "filter": _TEXT_OR_NULL, "exptime": _NUMBER,
    "date_obs": _KEY, "mjd": _NUMBER, "binning": {"type": "integer", "minimum": 1},
    "gain": {"type": ["integer", "null"]}, "camera": _TEXT_OR_NULL,
    "masters": _entry({"zero": _TEXT_OR_NULL, "dark": _TEXT_OR_NULL, "flat": _TEXT_OR_NULL}),
    "output": _KEY,
}, {"stack": _KEY, "egain": _NUMBER, "rdnoise": _NUMBER, "warnings": {"type": "array", "items": {"type": "string"}}})
STACK = _entry({
    "id": _KEY, "field": _KEY, "filter": _TEXT_OR_NULL, "unit": _KEY, "block": {"type": "integer", "minimum": 0},
    "frames": _KEYS, "start": _KEY, "end": _KEY, "output": _KEY,
})
QUARANTINED = _entry({"file": _KEY, "kind": _KEY, "exit_code": {"type": "integer"}, "reason": _KEY, "stage": _KEY})
SKIPPED = _entry({"file": _KEY, "reason": _KEY})

PLAN_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": PLAN_SCHEMA,
    **_entry({
        "schema": {"const": PLAN_SCHEMA}, "unit": _KEY, "night": _KEY, "root": _KEY, "made": _KEY,
        "pipeline_version": _KEY, "settings_hash": _KEY, "raw_frames": {"type": "integer", "minimum": 0},
        "calsets": {"type": "array", "items": CALSET}, "frames": {"type": "array", "items": FRAME},
        "stacks": {"type": "array", "items": STACK}, "quarantine": {"type": "array", "items": QUARANTINED},
        "skipped": {"type": "array", "items": SKIPPED}, "warnings": {"type": "array", "items": {"type": "string"}},
    }),
}


# ---- the entries the planner builds, frozen: a stage gets them as plan.json's dicts (to_json)

@dataclass(frozen=True)
class Calset:
    """Raw calibration frames of one night, unit, binning, gain and camera, and the masters to make."""

    id: str
    unit: str
    night: str
    binning: int
    gain: int | None
    camera: str | None
    mjd: float
    zero: dict | None  # {"frames", "output"}
    darks: tuple[dict, ...]  # {"exptime", "frames", "output"}
    flats: tuple[dict, ...]  # {"filter", "frames", "output"}

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in ("id", "unit", "night", "binning", "gain", "camera", "mjd", "zero")},
                "darks": list(self.darks), "flats": list(self.flats)}


@dataclass(frozen=True)
class Frame:
    """One science frame: its raw key, what it is, the masters it is reduced with, its product."""

    id: str
    raw: str
    object: str
    filter: str | None
    exptime: float
    date_obs: str
    mjd: float
    binning: int
    gain: int | None
    camera: str | None
    masters: dict  # {"zero", "dark", "flat"} -> key
    output: str
    egain: float | None = None  # IMSNG/GECKO headers give them; 7DT's come from the registry
    rdnoise: float | None = None
    warnings: tuple[str, ...] = ()
    stack: str | None = None

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in ("id", "raw", "object", "filter", "exptime", "date_obs", "mjd",
                                             "binning", "gain", "camera", "masters")}
        if self.egain is not None:
            out.update(egain=self.egain, rdnoise=self.rdnoise)
        out["output"] = self.output
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.stack is not None:
            out["stack"] = self.stack
        return out


@dataclass(frozen=True)
class Stack:
    """Frames of one field, filter and unit in one time block, and the stack they make."""

    id: str
    field: str
    filter: str | None
    unit: str
    block: int
    frames: tuple[str, ...]  # frame ids
    start: str
    end: str
    output: str

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in ("id", "field", "filter", "unit", "block")},
                "frames": list(self.frames), "start": self.start, "end": self.end, "output": self.output}
