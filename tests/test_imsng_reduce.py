"""Calibration of IMSNG/GECKO nights: overscan and TRIMSEC, binning, defringe, empty frames.

A small LOAO night is written here, MaxIm-style, with a CCD's overscan strip and a trim section,
a known per-frame overscan level (an offset and a ramp along the rows), a bias pattern, a flat
field, and z-band science frames with stars, sky and a fringe pattern of known shape and scale.
Plan, masters and reduce run on it through the runner; the products are compared with that truth.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gppy_stage import library, runner
from gppy_stage.science import fringe, overscan

OBS, NIGHT = "LOAO", "2024_0229"
NY, NX = 300, 336  # raw readout: 320 image columns, then 16 of overscan
BIASSEC, TRIMSEC = "[323:334,1:300]", "[3:318,2:299]"
TRIM = (slice(1, 299), slice(2, 318))
GAIN, RDNOISE_ADU = 2.68, 1.8
START = datetime(2024, 3, 1, 2, 0, 0)
Y, X = np.mgrid[0:NY, 0:NX].astype(np.float32)
FRINGE = (np.sin(X / 9.0 + 2 * np.sin(Y / 23.0)) * np.cos(Y / 13.0 - X / 41.0)).astype(np.float32)
BIAS_PATTERN = np.random.default_rng(0).normal(0, 3, (NY, NX)).astype(np.float32)
FLAT = (1 + 0.08 * (X - NX / 2) / NX - 0.05 * (Y - NY / 2) / NY).astype(np.float32)
NORM = float(np.median(FLAT[TRIM]))  # what the master flat is divided by
SKY = 800.0
SCALES = (40.0, 55.0, 70.0, 85.0)  # ADU of fringe in each science frame


def _stars(rng, n: int = 25) -> np.ndarray:
    im = np.zeros((NY, NX), np.float32)
    for _ in range(n):
        cx, cy, flux = rng.uniform(10, 310), rng.uniform(10, NY - 10), rng.uniform(3e3, 5e4)
        im += flux / (2 * np.pi * 1.8 ** 2) * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * 1.8 ** 2))
    return im


def _write(path: Path, signal: np.ndarray, imagetyp: str, exptime: float, when: datetime, rng, *,
           filt: str | None = None, obj: str | None = None, level: tuple[float, float] = (300.0, 0.02),
           dtype=np.uint16, sections: bool = True) -> None:
    """A raw frame: ``signal`` (ADU, image area) plus the bias pattern, read noise and an overscan
    level ``offset + slope x row`` over the whole readout (the strip holds only that and noise)."""
    offset, slope = level
    raw = offset + slope * Y + rng.normal(0, RDNOISE_ADU, (NY, NX)).astype(np.float32)
    raw[:, :320] += BIAS_PATTERN[:, :320] + signal[:, :320]
    h = fits.Header()
    h["IMAGETYP"], h["EXPTIME"], h["DATE-OBS"] = imagetyp, exptime, when.strftime("%Y-%m-%dT%H:%M:%S")
    h["XBINNING"] = h["YBINNING"] = 1
    h["EGAIN"], h["TELESCOP"], h["INSTRUME"] = GAIN, "LOAO 1m telescope", "E2V"
    if sections:
        h["BIASSEC"], h["TRIMSEC"] = BIASSEC, TRIMSEC
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRPIX1"], h["CRPIX2"], h["CRVAL1"], h["CRVAL2"] = 160.0, 150.0, 210.8, 54.35
    h["CD1_1"], h["CD2_2"], h["CD1_2"], h["CD2_1"] = -2.2e-4, 2.2e-4, 0.0, 0.0
    if filt:
        h["FILTER"] = filt
    if obj:
        h["OBJECT"] = obj
    data = np.clip(np.round(raw), 0, 65535).astype(np.uint16) if dtype == np.uint16 else raw.astype(dtype)
    fits.PrimaryHDU(data, h).writeto(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The night planned, its masters made and its frames reduced (once for the module)."""
    root = tmp_path_factory.mktemp("imsng") / "root"
    night = root / "obsdata" / OBS / NIGHT
    night.mkdir(parents=True)
    rng = np.random.default_rng(1)
    zero = np.zeros((NY, NX), np.float32)
    for i in range(5):
        lv = (300 + rng.uniform(-20, 20), rng.uniform(0.0, 0.05))
        _write(night / f"bias.{i:03d}.fits", zero, "Bias Frame", 0.0, START + timedelta(minutes=i), rng, level=lv)
        _write(night / f"dark.{i:03d}.fits", zero + 60 * 0.02, "Dark Frame", 60.0, START + timedelta(minutes=10 + i),
               rng, level=lv)
        _write(night / f"skyflat_z.{i:03d}.fits", 20000 * FLAT * (1 + 0.05 * i), "Flat Field", 5.0,
               START + timedelta(minutes=20 + i), rng, filt="z", obj="skyflat", level=lv)
    truth = {}
    for i, s in enumerate(SCALES):
        stars = _stars(rng)
        truth[f"M101_z.{i:03d}.fits"] = (SKY + stars, s)
        signal = FLAT * (SKY + stars + s * FRINGE) + 60 * 0.02
        signal = rng.poisson(np.clip(signal * GAIN, 0, None)).astype(np.float32) / GAIN
        _write(night / f"M101_z.{i:03d}.fits", signal, "Light Frame", 60.0, START + timedelta(hours=1, minutes=2 * i),
               rng, filt="z", obj="M101", level=(300 + rng.uniform(-20, 20), rng.uniform(0.0, 0.05)))
    # read out with nothing in it: NaN everywhere (float, as some software writes a failed readout)
    _write(night / "M101_z.empty.fits", np.full((NY, NX), np.nan, np.float32), "Light Frame", 60.0,
           START + timedelta(hours=2), rng, filt="z", obj="M101", dtype=np.float32)
    assert runner.execute("plan", str(root), OBS, NIGHT)["status"] == "done"
    plan = json.loads((root / "runs" / OBS / NIGHT / "plan.json").read_text())
    masters = [runner.execute("masters", str(root), OBS, NIGHT, item=cs["id"]) for cs in plan["calsets"]]
    # by raw file name: frame ids are the names made safe
    reduced = {Path(f["raw"]).name: runner.execute("reduce", str(root), OBS, NIGHT, item=f["id"]) for f in plan["frames"]}
    return root, plan, masters, reduced, truth


def _entry(plan: dict, raw_name: str) -> dict:
    return next(f for f in plan["frames"] if Path(f["raw"]).name == raw_name)


def _product(root: Path, plan: dict, raw_name: str):
    entry = _entry(plan, raw_name)
    with fits.open(root / entry["output"]) as hdul:
        return hdul[0].header.copy(), hdul[0].data.astype(np.float64), hdul["MASK"].data.copy()


def test_overscan_level_and_trim_on_a_synthetic_frame():
    """A known level per row (offset + ramp) comes off exactly; the frame is cut to TRIMSEC."""
    rng = np.random.default_rng(2)
    level = 412.0 + 0.03 * Y
    image = rng.normal(1000, 5, (NY, NX)).astype(np.float32)
    raw = np.where(X < 320, image + level, level).astype(np.float32)

    class Frame:
        url, shape, header = "mem://frame", raw.shape, fits.Header({"BIASSEC": BIASSEC, "TRIMSEC": TRIMSEC})

        def rows(self, a, b):
            return raw[a:b].copy()

    view = overscan.prepare(Frame(), Frame.header, fit_order=1)
    out = view.all()
    assert out.shape == (298, 316)
    np.testing.assert_allclose(out, image[TRIM], atol=1e-3)
    assert view.mean_level == pytest.approx(float(np.mean(level[TRIM[0], 0])), abs=1e-3)
    h = fits.Header({"CRPIX1": 160.0, "CRPIX2": 150.0})
    overscan.shift_wcs(h, view.layout)
    assert (h["CRPIX1"], h["CRPIX2"]) == (158.0, 149.0)  # TRIMSEC starts at column 3, row 2 (1-based)
    Frame.header = fits.Header()
    assert overscan.prepare(Frame(), Frame.header, fit_order=1) is not None
    assert isinstance(overscan.prepare(Frame(), fits.Header(), 1), Frame)  # no sections: the frame itself


def test_saao_overscan_rows_match_ccdproc(real_dir):
    """Per-row medians without a fit (fit_order null) against ccdproc's model=None."""
    import ccdproc
    from astropy.nddata import CCDData

    from gppy_stage.fitsio import open_raw

    path = real_dir / "saao1m_ste3_raw_object_a8280271.fits"
    with open_raw(str(path)) as raw:
        out = overscan.prepare(raw, raw.header, fit_order=None).all()
    h = fits.getheader(path)
    ref = ccdproc.subtract_overscan(CCDData.read(path, unit="adu"), fits_section=h["BIASSEC"].replace(" ", ""),
                                    median=True, overscan_axis=1, model=None)
    ref = ccdproc.trim_image(ref, fits_section=h["TRIMSEC"].replace(" ", "")).data
    assert out.shape == ref.shape == (520, 512)
    np.testing.assert_allclose(out, ref, atol=1e-3)


def test_bad_section_is_named():
    from gppy_stage.errors import BadInputError

    with pytest.raises(BadInputError, match="TRIMSEC.*outside"):
        overscan.layout(fits.Header({"TRIMSEC": "[1:400,1:10]"}), (300, 336), "x.fits")
    with pytest.raises(BadInputError, match="BIASSEC.*not a FITS section"):
        overscan.layout(fits.Header({"BIASSEC": "left"}), (300, 336), "x.fits")


def test_night_masters_and_frames_trimmed_and_calibrated(made):
    root, plan, masters, reduced, truth = made
    assert all(m["status"] == "done" for m in masters), masters
    for kind in ("zero", "dark", "flat"):
        (path,) = (root / "master_frame" / OBS / kind).glob("*.fits")
        h, data = fits.getheader(path), fits.getdata(path)
        assert data.shape == (298, 316) and h["TRIMSEC"] == TRIMSEC and "OVSCMETH" in h
    # the master bias is the bias pattern alone: each frame's own overscan level came off
    bias = fits.getdata(next((root / "master_frame" / OBS / "zero").glob("*.fits")))
    assert np.std(bias - BIAS_PATTERN[TRIM]) < 1.5 * RDNOISE_ADU / np.sqrt(5) + 0.1
    assert abs(np.median(bias - BIAS_PATTERN[TRIM])) < 0.3
    for fid, (clean, s) in truth.items():
        assert reduced[fid]["status"] == "done", reduced[fid]
        h, data, mask = _product(root, plan, fid)
        assert data.shape == (298, 316)
        assert (h["CRPIX1"], h["CRPIX2"]) == (158.0, 149.0)
        assert 280 < h["OVERSCAN"] < 330
        good = (mask == 0) & (clean[TRIM] < SKY + 50)  # sky pixels: the stars' own shot noise aside
        # the master flat is divided by its median, which scales the frame by it; defringing takes
        # the pattern off about its median, so that much of the fringe stays in the sky
        resid = data - NORM * (clean[TRIM] + s * np.median(FRINGE[TRIM]))
        assert abs(np.median(resid[good])) < 1.0  # overscan, bias, dark and flat right to 1 ADU of 800


def test_fringe_master_made_and_subtracted_to_under_a_tenth(made):
    root, plan, masters, reduced, truth = made
    (master_path,) = (root / "master_frame" / OBS / "fringe").glob("*.fits")
    meta = json.loads(Path(str(master_path) + ".json").read_text())
    assert meta["kind"] == "fringe" and meta["filter"] == "z" and len(meta["inputs"]) == 4
    assert any("empty" in r["file"] for r in meta["rejected"])
    found = library.find(str(root), OBS, library.FRINGE, mjd=plan["frames"][0]["mjd"], binning=1, gain=None,
                         filt="z", validity_days=1)
    assert found is not None and found.key.endswith(master_path.name)
    f = FRINGE[TRIM] - FRINGE[TRIM].mean()
    for fid, (clean, s) in truth.items():
        h, data, mask = _product(root, plan, fid)
        assert h["MASTFRNG"] == master_path.name and h["FRINGSCL"] > 0
        good = (mask == 0) & (clean[TRIM] < SKY + 50)
        resid = data / NORM - clean[TRIM]
        left = np.sum((resid - np.median(resid[good]))[good] * f[good]) / np.sum(f[good] ** 2)
        assert abs(left) < 0.1 * s, (fid, left, s)  # residual fringe amplitude under 10 % of the input's


def test_fringe_kernel_against_truth():
    """The kernel alone: master from four frames, each frame's scale and residual against truth."""
    rng = np.random.default_rng(4)
    frames = []
    for s in SCALES:
        clean = SKY + _stars(rng)
        frames.append((rng.normal(clean + s * FRINGE, 15).astype(np.float32), clean, s))
    master = fringe.build_master([fringe.relative_sky(im)[0] for im, _, _ in frames])
    pairs = fringe.choose_pairs(master)
    f = FRINGE - FRINGE.mean()
    for im, clean, s in frames:
        out = im - fringe.scale(im, master, pairs) * master
        left = np.sum((out - clean - np.median(out - clean)) * f) / np.sum(f * f)
        assert abs(left) < 0.1 * s
        assert abs(fringe.amplitude(out, pairs)) < 0.1 * abs(fringe.amplitude(im, pairs))


def test_empty_science_frame_named_at_reduce(made):
    root, plan, masters, reduced, truth = made
    rec = reduced["M101_z.empty.fits"]
    assert rec["status"] == "quarantined" and rec["exit_code"] == 65
    assert "no finite pixel" in rec["error"]["reason"] and "empty" in rec["error"]["file"]


def test_master_of_another_binning_not_used(made, tmp_path):
    root, plan, masters, reduced, truth = made
    cands = [library.Master("m2", "zero", OBS, 1.0, 2, None, None, None, "good")]
    assert library.choose(cands, kind="zero", mjd=1.0, binning=1, gain=None, validity_days=5) is None
    # a master whose header says 2x2 (a library copy gone wrong) is refused by reduce, with the reason
    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    (bias,) = (copy / "master_frame" / OBS / "zero").glob("*.fits")
    with fits.open(bias, mode="update") as hdul:
        hdul[0].header["XBINNING"] = hdul[0].header["YBINNING"] = 2
    fid = _entry(plan, next(iter(truth)))["id"]
    rec = runner.execute("reduce", str(copy), OBS, NIGHT, item=fid, force=True)
    assert rec["status"] == "quarantined" and "2x2 binned" in rec["error"]["reason"], rec


def test_site_rule_names_the_overscan(tmp_path, monkeypatch):
    """A camera whose software writes no BIASSEC/TRIMSEC: a header rule of its site supplies them."""
    import yaml

    from gppy_stage.stages.reduce import reduce_file

    folder = tmp_path / "config"
    shutil.copytree(Path(__file__).resolve().parents[1] / "config", folder)
    rules = yaml.safe_load((folder / "header_rules.yaml").read_text())
    rules["sites"] = {OBS: {"set": {"BIASSEC": BIASSEC, "TRIMSEC": TRIMSEC}}}
    (folder / "header_rules.yaml").write_text(yaml.safe_dump(rules))
    monkeypatch.setenv("GPPY_CONFIG", str(folder))
    rng = np.random.default_rng(5)
    path = tmp_path / "bare.fits"
    _write(path, np.full((NY, NX), 500.0, np.float32), "Light Frame", 60.0, START, rng, filt="z", obj="M101",
           level=(350.0, 0.0), sections=False)
    assert "BIASSEC" not in fits.getheader(path)
    reduce_file(str(path), str(tmp_path / "out.fits"), obs=OBS, cosmic_rays=False)
    h, data = fits.getheader(tmp_path / "out.fits"), fits.getdata(tmp_path / "out.fits")
    assert data.shape == (298, 316) and h["OVERSCAN"] == pytest.approx(350.0, abs=0.5)
    assert np.median(data - BIAS_PATTERN[TRIM]) == pytest.approx(500.0, abs=0.5)


def test_empty_readouts_have_a_reason():
    from gppy_stage.science.reduce import empty_reason

    assert "every pixel at 0 ADU" in empty_reason(np.zeros((64, 80), np.uint16))
    assert "no finite pixel" in empty_reason(np.full((64, 80), np.inf, np.float32))
    assert empty_reason(np.random.default_rng(0).normal(100, 3, (64, 80))) is None
