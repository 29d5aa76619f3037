"""The contract of plan.json (``gppy-stage/plan/1``) as a JSON schema, so that a change to what
the planner writes, or to what a stage expects of it, fails a test instead of a night.

The planner is ``stages/plan.py``; a stage reads its entry through ``Night.item``. The schema is
strict (no key it does not name) because every later stage, local or on Argo, reads these keys
by name: a key renamed on one side only must not pass.
"""

from __future__ import annotations

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
