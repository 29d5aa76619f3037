"""The stage record (StageResult) and the one night report, with the summary a night run prints,
from hand-made plans and records."""

from __future__ import annotations

import json

import pytest

from gppy_stage import errors, report
from gppy_stage.run_record import this_run
from gppy_stage.runner import summary_text
from gppy_stage.stages.base import StageResult

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"
ORPHAN = {"file": f"obsdata/{UNIT}/{NIGHT}/x_0001.head", "reason": "a .head sidecar with no FITS file beside it"}
FRAME = {"id": "f1", "raw": f"obsdata/{UNIT}/{NIGHT}/f1.fits", "filter": "m425", "object": "T10779", "exptime": 100.0,
         "date_obs": "2025-01-02T00:40:00", "output": "processed/T10779/7DT01/m425/calib_f1.fits"}
PLAN = {"unit": UNIT, "night": NIGHT, "raw_frames": 1, "frames": [], "calsets": [], "stacks": [], "quarantine": [],
        "skipped": [ORPHAN], "warnings": ["x_0001.head: skipped: a .head sidecar with no FITS file beside it"]}
CANDIDATE = {"stack": "T10779_m425_7DT01_0", "id": 2, "ra": 11.4, "dec": -25.4, "mag": 17.5, "magerr": 0.05,
             "snr": 30.0, "score": 0.31, "rb_score": 0.97, "stamp": "cand_0002.png"}
WHERE = {"unit": UNIT, "night": NIGHT}


def _record(stage, item, started, outcome, seconds=1.0) -> dict:
    where = {"stage": stage, "item": item, "started": started, **WHERE}
    if isinstance(outcome, BaseException):
        return StageResult.failed(outcome, seconds, "Traceback ...", **where).to_dict()
    return StageResult.finished(outcome, seconds, **where).to_dict()


def _report(plan=PLAN, records=None, **extra) -> dict:
    return report.build({"plan": plan, "records": records or {}, "headers": {}, "root": "r"}) | extra


@pytest.mark.parametrize("outcome, status, code", [
    ({"output": "x.fits"}, "done", errors.OK),
    ({"output": "x.fits", "skipped": True}, "skipped", errors.OK),
    (errors.BadInputError("truncated", path="obsdata/x.fits"), "quarantined", errors.BAD_INPUT),
    (errors.ToolError("scamp exited 1"), "failed", errors.TOOL_FAILURE),
    (ValueError("a bug"), "failed", errors.BUG),
])
def test_a_stage_record_round_trips_through_its_json(outcome, status, code):
    record = StageResult.from_dict(json.loads(json.dumps(_record("reduce", "f1", "2025-01-02T10:00:00+00:00",
                                                                     outcome))))
    assert record.status == status and record.exit_code == code
    assert StageResult.from_dict(record.to_dict()) == record
    assert set(record.to_dict()) == {"stage", "item", "unit", "night", "started", "status", "exit_code", "seconds",
                                     "result", "error"}
    # a bug keeps its traceback for the operator; a typed error needs none
    assert (record.error is not None and record.error.traceback is not None) == (code == errors.BUG)
    line = json.loads(record.log_line())
    assert list(line) == ["stage", "item", "status", "exit_code", "seconds", "result", "error"]
    assert line["result"] == (None if record.error else outcome)


def test_report_lists_the_files_the_plan_skipped_and_the_summary_says_them():
    rep = _report()
    assert rep["skipped"] == [ORPHAN]
    text = summary_text(rep)
    assert "quarantined: 0   failed: 0   skipped: 1" in text
    assert f"{ORPHAN['file']}: {ORPHAN['reason']}" in text


def test_candidate_table_shows_the_classifier_score_that_decides_a_pass():
    text = summary_text(_report(candidates=[CANDIDATE]))
    header, row = [line for line in text.splitlines() if "stamp" in line or "cand_0002" in line]
    assert header.split()[-2:] == ["rb_score", "stamp"]
    assert row.split()[-2:] == ["0.97", "cand_0002.png"]


def test_the_report_counts_each_stage_by_outcome_from_this_run_only():
    plan = dict(PLAN, frames=[FRAME, dict(FRAME, id="f2", output="processed/x/calib_f2.fits")], skipped=[],
                quarantine=[{"file": "obsdata/bad.fits", "kind": "bad_input", "exit_code": 65, "reason": "truncated",
                             "stage": "plan"}])
    t0, t1 = "2025-01-02T10:00:00+00:00", "2025-01-02T10:05:00+00:00"
    records = {"plan": {"night": _record("plan", None, t0, {"frames": 2})},
               "reduce": {"f1": _record("reduce", "f1", t0, {"output": "a", "skipped": True}, 2.0),
                          "f2": _record("reduce", "f2", t1, errors.ToolError("crashed"), 3.0)},
               # f2's from an earlier run: this run's chain for f2 stopped at its reduce
               "astrometry": {"f1": _record("astrometry", "f1", t1, {"output": "a"}),
                              "f2": _record("astrometry", "f2", "2025-01-01T09:00:00+00:00", {"output": "b"})},
               "photometry": {"f1": _record("photometry", "f1", t1, errors.BadInputError("no stars"))}}
    rep = report.build({"plan": plan, "records": this_run(records), "headers": {}, "root": "r"})
    assert rep["stages"] == {"plan": {"done": 1, "skipped": 0, "quarantined": 0, "failed": 0},
                             "reduce": {"done": 0, "skipped": 1, "quarantined": 0, "failed": 1},
                             "astrometry": {"done": 1, "skipped": 0, "quarantined": 0, "failed": 0},
                             "photometry": {"done": 0, "skipped": 0, "quarantined": 1, "failed": 0}}
    assert rep["timing"]["reduce"] == {"count": 2, "total_s": 5.0, "max_s": 3.0}
    assert [(f["stage"], f["status"]) for f in rep["failures"]] == [("plan", "quarantined"), ("reduce", "failed"),
                                                                    ("photometry", "quarantined")]
    assert rep["exit_code"] == errors.TOOL_FAILURE and rep["counts"]["failures"] == 3
    assert [r["stage"] for r in rep["records"]] == ["plan", "reduce", "reduce", "astrometry", "photometry"]
    text = summary_text(rep)
    assert "quarantined: 2   failed: 1" in text and "f2: crashed (reduce, exit 69)" in text
    assert "1 stage run(s) failed: exit 69" in text
    assert [line.split() for line in text.splitlines() if line.startswith("    reduce ")] == \
        [["reduce", "2", "0", "1", "0", "1", "5.00", "3.00"]]
