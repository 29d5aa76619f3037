"""Subtract and detect stages on the stack of a simulated night, judged against its truth:
the new source beside its host galaxy, the moving object, the false candidates, no reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gppy_stage.names import phot_keys
from gppy_stage.stages.reference import find_reference
from test_stack import GOOD, NIGHT, STACK_FAILED, STACK_GOOD, UNIT, built_night, plan_of, truth_frames

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return built_night(str(tmp_path_factory.getbasetemp()))


def _transients(root: Path) -> dict:
    return json.loads((root / "truth" / UNIT / NIGHT / "transients.json").read_text())


def _sep_arcsec(ra1, dec1, ra2, dec2):
    return np.hypot((np.asarray(ra1) - ra2) * np.cos(np.radians(dec2)), np.asarray(dec1) - dec2) * 3600.0


def _candidates(root: Path, records) -> Table:
    return Table.read(root / records["detect"][STACK_GOOD]["result"]["output"], format="ascii.ecsv")


def _stack_frames(root: Path) -> list[str]:
    return next(s for s in plan_of(root)["stacks"] if s["id"] == STACK_GOOD)["frames"]


def test_difference_products_and_kernel_header(night):
    root, records = night
    rec = records["subtract"][STACK_GOOD]
    assert rec["status"] == "done", rec
    res = rec["result"]
    assert res["reference"] == f"ref_frame/{GOOD}/ref_7DT_T10779_{GOOD}_deep.fits" and res["engine"] == "native"
    for key in res["products"].values():
        assert (root / key).is_file(), key
    h = fits.getheader(root / res["products"]["diff"])
    print(f"kernel: engine {h['ENGINE']} convolved {h['CONVOLV']} flux ratio {h['FLXRATIO']:.4f} "
          f"stamps {h['KNSTAMP']} FWHM new/ref {h['FWHMNEW']:.2f}/{h['FWHMREF']:.2f} px, ZP {h['ZP']:.4f}")
    # the reference was put on the stack's zero point, so the kernel's flux ratio checks both ZPs
    assert abs(2.5 * np.log10(h["FLXRATIO"])) < 0.03
    assert h["KNSTAMP"] >= 8 and h["CONVOLV"] in ("ref", "new")
    # the difference image's zero point is right: in the reference's scale a source of the new
    # frames has flux F_new / FLXRATIO, so its true ZP is the frames' true ZP - 2.5 log10(FLXRATIO)
    truth = truth_frames(root)
    true_zp = float(np.median([truth[f]["zp"] for f in _stack_frames(root)])) - 2.5 * np.log10(h["FLXRATIO"])
    assert abs(h["ZP"] - true_zp) < 0.015, (h["ZP"], true_zp)
    assert fits.getdata(root / res["products"]["diff"], "KERNEL").ndim == 2


def test_new_source_found_at_true_position_and_magnitude(night):
    root, records = night
    t = _candidates(root, records)
    tr = _transients(root)["transient"]
    d = _sep_arcsec(t["ra"], t["dec"], tr["ra"], tr["dec"])
    i = int(np.argmin(d))
    row = t[i]
    print(f"transient: candidate #{row['id']} at {d[i]:.2f}\", mag {row['mag']:.3f} +- {row['magerr']:.3f} vs "
          f"{tr['mag'][GOOD]:.3f}, S/N {row['snr']:.1f}, flags {row['flags']}, score {row['score']:.2f}")
    assert d[i] < 1.0
    assert abs(row["mag"] - tr["mag"][GOOD]) < 0.1
    assert row["flags"] == 0 and row["pass"]


def test_moving_object_flagged(night):
    root, records = night
    t = _candidates(root, records)
    positions = [p for p in _transients(root)["asteroid"]["positions"].values() if p["filter"] == GOOD]
    mid = positions[len(positions) // 2]
    d = _sep_arcsec(t["ra"], t["dec"], mid["ra"], mid["dec"])
    near = t[d < 3.0]
    print(f"asteroid: {len(near)} candidate(s) within 3\" of its mid position; moving: {list(near['moving'])}")
    assert len(near) >= 1 and all(near["moving"]) and not any(near["pass"])
    # every frame of the field with a catalogue, the other filter's too
    with_catalogue = [f for f in plan_of(root)["frames"] if (root / phot_keys(f["output"])[0]).is_file()]
    assert records["detect"][STACK_GOOD]["result"]["moving_from"] == len(with_catalogue) >= 3


def test_few_false_candidates(night):
    root, records = night
    t = _candidates(root, records)
    tr = _transients(root)
    real = _sep_arcsec(t["ra"], t["dec"], tr["transient"]["ra"], tr["transient"]["dec"]) < 2.0
    for p in tr["asteroid"]["positions"].values():
        real |= _sep_arcsec(t["ra"], t["dec"], p["ra"], p["dec"]) < 3.0
    false_unflagged = t[~real & (np.asarray(t["flags"]) == 0)]
    print(f"{len(t)} candidates, {len(false_unflagged)} unflagged false ones")
    assert len(false_unflagged) <= 3


def test_regions_and_stamps(night):
    root, records = night
    res = records["detect"][STACK_GOOD]["result"]
    reg = (root / res["products"]["regions"]).read_text()
    t = _candidates(root, records)
    assert reg.startswith("# Region file format: DS9") and reg.count("circle(") == len(t)
    pngs = sorted((root / res["products"]["stamps"]).glob("cand_[0-9][0-9][0-9][0-9].png"))  # not the .lc.png panels
    assert len(pngs) == int(np.sum(t["pass"])) >= 1
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_field_without_reference_is_flagged_not_failed(night, tmp_path):
    root, _ = night
    from gppy_stage.runner import execute

    new = tmp_path / "root"
    entry = next(s for s in plan_of(root)["stacks"] if s["id"] == STACK_GOOD)
    (new / "runs" / UNIT / NIGHT).mkdir(parents=True)
    shutil.copy(root / "runs" / UNIT / NIGHT / "plan.json", new / "runs" / UNIT / NIGHT / "plan.json")
    for suffix in ("", ".json"):
        dst = new / (entry["output"] + suffix)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / (entry["output"] + suffix), dst)
    sub = execute("subtract", str(new), UNIT, NIGHT, STACK_GOOD)
    det = execute("detect", str(new), UNIT, NIGHT, STACK_GOOD)
    print(sub["result"]["reason"])
    assert sub["status"] == "done" and sub["result"]["status"] == "no reference"
    assert "T10779" in sub["result"]["reason"] and GOOD in sub["result"]["reason"]
    assert det["status"] == "done" and det["result"]["status"] == "no reference"
    cur = execute("curate", str(new), UNIT, NIGHT)
    rep = json.loads((new / cur["result"]["report"]).read_text())
    assert rep["flagged"] == [{"stack": STACK_GOOD, "flag": "no_reference", "reason": sub["result"]["reason"]}]
    assert "no_reference" in (new / cur["result"]["report_md"]).read_text()


def test_reference_lookup_prefers_7dt(tmp_path):
    d = tmp_path / "ref_frame" / "m425"
    d.mkdir(parents=True)
    (d / "ref_PS1_T00001_20200101_m425_0.fits").write_bytes(b"x")
    (d / "ref_PS1_T00002_20200101_m425_0.fits").write_bytes(b"x")
    (d / "ref_7DT_T00002_m425_deep.fits").write_bytes(b"x")
    assert find_reference(str(tmp_path), "T00001", "m425") == "ref_frame/m425/ref_PS1_T00001_20200101_m425_0.fits"
    assert find_reference(str(tmp_path), "T00002", "m425") == "ref_frame/m425/ref_7DT_T00002_m425_deep.fits"
    assert find_reference(str(tmp_path), "T00003", "m425") is None
    assert find_reference(str(tmp_path), "T00001", "m475") is None


def test_failed_stack_is_not_subtracted(night):
    root, records = night
    assert STACK_FAILED not in records["subtract"]
    from gppy_stage.runner import execute

    rec = execute("subtract", str(root), UNIT, NIGHT, STACK_FAILED)
    assert rec["status"] == "quarantined" and "was not made" in rec["error"]["reason"]
