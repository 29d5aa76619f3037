"""plan.json against its schema (gppy_stage/plan_types.py): what the planner writes of a simulated
night, damaged frames included, is what the schema describes, and the schema refuses a plan a
stage could not read (a key missing or renamed, a wrong type, another schema)."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from gppy_stage.plan_types import PLAN_JSON_SCHEMA
from gppy_stage.sim import simulate_night
from gppy_stage.stages import plan as plan_stage
from gppy_stage.stages.base import Night

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_schema") / "root"
    simulate_night(root, unit=UNIT, night="2025-01-01", filters=("m425",), size="tiny", seed=3, n_science=2)
    night = root / "obsdata" / UNIT / NIGHT
    (night / "7DT01_20250102_010000_T10779_m425_1x1_100.0s_0009.fits").write_bytes(b"not a FITS file" * 200)
    plan_stage.run(Night(root=str(root), unit=UNIT, night=NIGHT))
    return json.loads((root / "runs" / UNIT / NIGHT / "plan.json").read_text())


def _errors(plan: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(PLAN_JSON_SCHEMA)
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(plan)]


def test_the_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(PLAN_JSON_SCHEMA)


def test_a_planned_night_matches_the_schema(planned):
    assert planned["calsets"] and planned["frames"] and planned["stacks"]
    assert all("stack" in f for f in planned["frames"])
    assert planned["quarantine"] or planned["skipped"], "the damaged frame was neither quarantined nor skipped"
    assert _errors(planned) == []


@pytest.mark.parametrize("damage, where", [
    (lambda p: p["frames"][0].pop("output"), "frames/0"),
    (lambda p: p["calsets"][0].update(darks=[{**p["calsets"][0]["darks"][0], "exposure": 1.0}]), "calsets/0/darks/0"),
    (lambda p: p["stacks"][0].update(frames="one"), "stacks/0/frames"),
    (lambda p: p["frames"][1]["masters"].update(zero=3), "frames/1/masters/zero"),
    (lambda p: p.update(schema="gppy-stage/plan/0"), "schema"),
])
def test_a_plan_a_stage_could_not_read_is_refused_where_it_is_wrong(planned, damage, where):
    broken = copy.deepcopy(planned)
    damage(broken)
    errors = _errors(broken)
    assert errors and all(e.startswith(where) for e in errors), errors
