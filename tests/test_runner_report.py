"""The local runner's night report (report.json) and the summary it prints, from hand-made plans."""

from __future__ import annotations

from gppy_stage.runner import NightReport, summary_text

ORPHAN = {"file": "obsdata/7DT01/2025-01-01_gain2750/x_0001.head", "reason": "a .head sidecar with no FITS file beside it"}
PLAN = {"raw_frames": 1, "frames": [], "calsets": [], "stacks": [], "quarantine": [], "skipped": [ORPHAN],
        "warnings": ["x_0001.head: skipped: a .head sidecar with no FITS file beside it"]}
CANDIDATE = {"stack": "T10779_m425_7DT01_0", "id": 2, "ra": 11.4, "dec": -25.4, "mag": 17.5, "magerr": 0.05,
             "snr": 30.0, "score": 0.31, "rb_score": 0.97, "stamp": "cand_0002.png"}


def _report(**extra) -> dict:
    return NightReport(unit="7DT01", night="2025-01-01_gain2750", root="r").to_dict(PLAN) | extra


def test_report_lists_the_files_the_plan_skipped_and_the_summary_says_them():
    report = _report()
    assert report["skipped"] == [ORPHAN]
    text = summary_text(report)
    assert "quarantined: 0   failed: 0   skipped: 1" in text
    assert f"{ORPHAN['file']}: {ORPHAN['reason']}" in text


def test_candidate_table_shows_the_classifier_score_that_decides_a_pass():
    text = summary_text(_report(candidates=[CANDIDATE], report_md="report.md"))
    header, row = [line for line in text.splitlines() if "stamp" in line or "cand_0002" in line]
    assert header.split()[-2:] == ["rb_score", "stamp"]
    assert row.split()[-2:] == ["0.97", "cand_0002.png"]
