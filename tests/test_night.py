"""A simulated 7DT night calibrated end to end, judged against the simulator's truth."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy_stage import graph, storage
from gppy_stage.runner import run_night
from gppy_stage.science.reduce import COSMIC_RAY
from gppy_stage.sim import simulate_night

UNIT, DATE = "7DT01", "2025-01-01"
NIGHT = f"{DATE}_gain2750"
FILTER = "m425"


def _sim(root: Path, night: str = DATE, seed: int = 3, calib=("bias", "dark", "flat"), n_science: int = 2) -> Path:
    simulate_night(root, unit=UNIT, night=night, filters=(FILTER,), seed=seed, calib=calib, n_science=n_science,
                   reference=False)
    return root


def _raw_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "obsdata").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """One simulated night, run once through the local runner; (root, report, raw hashes before)."""
    root = _sim(tmp_path_factory.mktemp("night") / "root")
    before = _raw_hashes(root)
    report = run_night(str(root), UNIT, NIGHT, workers=2, progress=False)
    return root, report, before


def _truth(root: Path, night: str = NIGHT) -> Path:
    return root / "truth" / UNIT / night


def test_night_completes_and_raw_is_untouched(night):
    root, report, before = night
    assert report["counts"]["science_done"] == report["counts"]["science_planned"] == 2
    assert report["counts"]["raw_frames"] == 9 + 9 + 5 + 2
    assert report["failures"] == [] and report["exit_code"] == 0
    # one report: what curate made of the products and what every stage did, the exit handler's too
    assert set(report["timing"]) == set(report["stages"]) == {s.name for s in graph.STAGES}
    assert all(n["done"] == sum(n.values()) for n in report["stages"].values()), report["stages"]
    assert report["stages"]["reduce"]["done"] == 2 and report["stages"]["notify"]["done"] == 1
    assert [s["status"] for s in report["stacks"]] == ["done"]
    assert _raw_hashes(root) == before
    saved = json.loads((root / "runs" / UNIT / NIGHT / "night_report.json").read_text())
    assert saved["records"] == report["records"] and not (root / "runs" / UNIT / NIGHT / "report.json").exists()


def test_master_bias_matches_truth(night):
    root, _, _ = night
    master = fits.getdata(root / "master_frame" / UNIT / "zero" / f"zero_{UNIT}_20250101_1x1_gain2750.fits")
    truth = json.loads((_truth(root) / "truth.json").read_text())
    diff = master - fits.getdata(_truth(root) / "bias.fits")
    read_noise_adu = np.hypot(truth["rdnoise_e"] / truth["gain_e_per_adu"], np.sqrt(1 / 12))  # with quantisation
    expected = read_noise_adu / np.sqrt(9)
    assert abs(diff.mean()) < 0.1
    assert diff.std() <= 1.3 * expected, (diff.std(), expected)


def test_master_flat_matches_truth(night):
    root, _, _ = night
    master = fits.getdata(root / "master_frame" / UNIT / "flat" / f"flat_{UNIT}_20250101_{FILTER}_1x1_gain2750.fits")
    true_flat = fits.getdata(_truth(root) / f"flat_{FILTER}.fits")
    gain = json.loads((_truth(root) / "truth.json").read_text())["gain_e_per_adu"]
    levels = [f["level"] for f in json.loads((_truth(root) / "frames.json").read_text())
              if f["imagetyp"] == "FLAT" and f["filter"] == FILTER]
    # relative photon + read noise of the mean of the input flats, pixel by pixel
    var = sum((lv * true_flat / gain + (3.0 / gain) ** 2) / (lv * true_flat) ** 2 for lv in levels) / len(levels) ** 2
    ratio = master / true_flat - 1
    assert abs(ratio.mean()) < 1e-3
    assert ratio.std() <= 1.3 * np.sqrt(var.mean()), (ratio.std(), np.sqrt(var.mean()))


def test_master_qa_keys_and_library_index(night):
    root, _, _ = night
    path = root / "master_frame" / UNIT / "zero" / f"zero_{UNIT}_20250101_1x1_gain2750.fits"
    h = fits.getheader(path)
    assert h["NCOMBINE"] == 9 and h["QAVERDCT"] == "good" and 505 < h["CLIPMED"] < 520
    assert h["INPUT001"].endswith(".fits") and "PIPEVER" in h
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert meta["kind"] == "zero" and meta["qa"]["verdict"] == "good" and len(meta["inputs"]) == 9


def test_cosmic_rays_found_and_few_false(night):
    import sep
    from scipy.ndimage import binary_dilation

    root, report, _ = night
    for frame in report["frames"]:
        with fits.open(root / frame["output"]) as hdul:
            data, mask = hdul[0].data.astype(np.float64), hdul["MASK"].data
            stem = Path(hdul[0].header["RAWFILE"]).stem
        hits = json.loads((_truth(root) / "crhits" / f"{stem}.json").read_text())
        found = sum(bool(mask[h["y"], h["x"]] & COSMIC_RAY) for h in hits)
        assert found >= 0.95 * len(hits), (found, len(hits))
        # "away from hits and stars": outside the true hits and outside detected sources, both dilated
        bkg = sep.Background(data)
        _, segmap = sep.extract(data - bkg.back(), 3.0, err=bkg.globalrms, segmentation_map=True)
        true_cr = fits.getdata(_truth(root) / "crmask" / f"{stem}.fits") > 0
        away = ~binary_dilation(true_cr | (segmap > 0), iterations=3)
        false = (mask & COSMIC_RAY).astype(bool) & away
        assert false.sum() <= 0.001 * away.sum(), (false.sum(), away.sum())


def test_calibrated_product_layout_and_provenance(night):
    root, report, _ = night
    frame = report["frames"][0]
    out = frame["output"]
    assert out.startswith(f"processed/T10779/{UNIT}/{FILTER}/calib_{UNIT}_T10779_2025010")
    assert out.endswith(f"_{FILTER}_100.fits")
    with fits.open(root / out) as hdul:
        assert hdul[0].data.dtype == np.dtype(">f4")
        assert hdul["MASK"].data.dtype == np.uint8 and hdul["VARIANCE"].data.shape == hdul[0].data.shape
        h = hdul[0].header
        for key in ("MASTBIAS", "MASTDARK", "MASTFLAT", "PIPEVER", "GPHASH", "EGAIN", "RDNOISE", "NCRPIX"):
            assert key in h, key
        assert h["IMAGETYP"] == "LIGHT"
        assert h["ASTROMTD"] == "SCAMP" and "CTYPE1" in h and "ZP_APER_1" in h  # astrometry and photometry ran
        # the variance is honest: in a star-free corner, data scatter matches sqrt(variance)
        corner = (slice(20, 220), slice(20, 220))
        d, v = hdul[0].data[corner], hdul["VARIANCE"].data[corner]
        good = hdul["MASK"].data[corner] == 0
        clipped = d[good][np.abs(d[good] - np.median(d[good])) < 5 * np.sqrt(np.median(v))]
        assert 0.85 < clipped.std() / np.sqrt(np.median(v)) < 1.15


def test_rerun_skips_and_force_redoes(night):
    root, report, _ = night
    frame = report["frames"][0]
    mtime = (root / frame["output"]).stat().st_mtime_ns
    again = run_night(str(root), UNIT, NIGHT, workers=1, progress=False)
    statuses = {r["stage"]: r["status"] for r in again["records"] if r["stage"] in ("masters", "reduce", "astrometry", "photometry")}
    assert statuses == {"masters": "done", "reduce": "skipped", "astrometry": "skipped", "photometry": "skipped"}
    masters = [r for r in again["records"] if r["stage"] == "masters"][0]["result"]["masters"]
    assert all(m.get("skipped") for m in masters)
    assert (root / frame["output"]).stat().st_mtime_ns == mtime
    forced = run_night(str(root), UNIT, NIGHT, workers=1, progress=False, force=True)
    assert {r["status"] for r in forced["records"] if r["stage"] == "reduce"} == {"done"}
    assert (root / frame["output"]).stat().st_mtime_ns != mtime


@pytest.mark.slow
def test_bad_frames_are_quarantined_and_the_night_completes(tmp_path):
    root = _sim(tmp_path / "root", seed=5, n_science=3)
    raw = root / "obsdata" / UNIT / NIGHT
    science = sorted(raw.glob(f"*_T10779_{FILTER}_*.fits"))
    truncated, no_exptime = science[0], science[1]
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    with fits.open(no_exptime, mode="update") as hdul:
        del hdul[0].header["EXPTIME"]
        del hdul[0].header["EXPOSURE"]
        head = hdul[0].header.tostring(sep="\n")
    no_exptime.with_suffix(".head").write_text(head)
    # a frame of the wrong shape too: a cutout of a good frame
    odd = raw / science[2].name.replace("_0003.fits", "_0009.fits")
    with fits.open(science[2]) as hdul:
        fits.PrimaryHDU(hdul[0].data[:512, :512], hdul[0].header).writeto(odd)

    report = run_night(str(root), UNIT, NIGHT, workers=1, progress=False)
    reasons = {Path(q["file"]).name: q["reason"] for q in report["failures"] if q["status"] == "quarantined"}
    assert set(reasons) == {truncated.name, no_exptime.name, odd.name}
    assert "truncated" in reasons[truncated.name]
    assert "EXPTIME" in reasons[no_exptime.name]
    assert "512x512" in reasons[odd.name]
    assert report["counts"]["science_done"] == 1  # the remaining good science frame
    assert report["exit_code"] == 0 and len(report["failures"]) == 3


@pytest.mark.slow
def test_night_without_flats_borrows_the_nearest_earlier_flats(tmp_path):
    root = tmp_path / "root"
    _sim(root, night="2025-01-01", seed=11, n_science=1)
    _sim(root, night="2025-01-03", seed=11, calib=("bias", "dark"), n_science=1)
    run_night(str(root), UNIT, "2025-01-01_gain2750", workers=1, progress=False)
    report = run_night(str(root), UNIT, "2025-01-03_gain2750", workers=1, progress=False)
    assert report["counts"]["science_done"] == 1, report["failures"]
    plan = json.loads((root / "runs" / UNIT / "2025-01-03_gain2750" / "plan.json").read_text())
    masters = plan["frames"][0]["masters"]
    assert "20250101" in masters["flat"]  # borrowed from the earlier night
    assert "20250103" in masters["zero"] and "20250103" in masters["dark"]  # tonight's own
    out = fits.getheader(root / plan["frames"][0]["output"])
    assert out["MASTFLAT"] == Path(masters["flat"]).name


@pytest.mark.slow
def test_night_run_on_s3_gives_the_same_products(tmp_path, night, s3_root):
    local_root, local_report, _ = night
    # what a night's bucket holds: the raw frames and the field's reference catalogue
    storage.copy_tree(str(local_root / "obsdata"), storage.join(s3_root, "obsdata"), allow_raw=True)
    storage.copy_tree(str(local_root / "ref_cat"), storage.join(s3_root, "ref_cat"))
    # the real command line, as a user runs it, against the moto endpoint
    proc = subprocess.run([sys.executable, "-m", "gppy_stage.cli", "night", "run", "--root", s3_root, "--obs", UNIT,
                           "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "science out: 2" in proc.stdout, proc.stdout[-3000:]
    for frame in local_report["frames"]:
        with fits.open(local_root / frame["output"]) as a, storage.local_copy(storage.join(s3_root, frame["output"])) as p:
            with fits.open(p) as b:
                np.testing.assert_array_equal(a[0].data, b[0].data)
                np.testing.assert_array_equal(a["MASK"].data, b["MASK"].data)
                for key in ("CRVAL1", "CRVAL2", "ZP_APER_1"):  # astrometry and photometry agree too
                    assert a[0].header[key] == pytest.approx(b[0].header[key], abs=1e-6)
    assert storage.exists(storage.join(s3_root, "runs", UNIT, NIGHT, "night_report.json"))


def test_latest_night_is_the_newest_finished_one(tmp_path):
    from datetime import datetime

    from gppy_stage.stages.plan import latest_night

    for name in ("2025-01-01_gain2750", "2025-01-03_ToO_gain2750", "2025-01-02_gain2750", "notes",
                 "2025-01-04_gain2750_test"):
        (tmp_path / "obsdata" / UNIT / name).mkdir(parents=True)
    assert latest_night(str(tmp_path), UNIT, now=datetime(2025, 1, 10)) == "2025-01-03_ToO_gain2750"
    (tmp_path / "obsdata" / UNIT / "2025-01-03_gain2750").mkdir()
    assert latest_night(str(tmp_path), UNIT, now=datetime(2025, 1, 10)) == "2025-01-03_gain2750"  # not the ToO
    # at 2025-01-04 05:00 UTC the night of 2025-01-03 is still in progress
    assert latest_night(str(tmp_path), UNIT, now=datetime(2025, 1, 4, 5)) == "2025-01-02_gain2750"
