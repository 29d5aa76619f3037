"""Real frames of real telescopes through `gppy reduce-file`: a product, or a clear one-line error."""

from __future__ import annotations

import subprocess
import sys

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits


def _reduce(path, out, *extra):
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", "reduce-file", str(path), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)


def test_saao_frame_with_overscan(real_dir, tmp_path):
    """Overscan and trim against ccdproc's own subtract_overscan and trim_image on the same frame."""
    import ccdproc
    from astropy.modeling.models import Polynomial1D
    from astropy.nddata import CCDData

    from gppy_stage import config

    path = real_dir / "saao1m_ste3_raw_object_a8280271.fits"
    out = tmp_path / "saao.fits"
    proc = _reduce(path, out)
    assert proc.returncode == 0, proc.stderr
    with fits.open(out) as hdul:
        h, data, mask = hdul[0].header, hdul[0].data, hdul["MASK"].data
        assert data.shape == (520, 512)  # TRIMSEC [17:528,1:520]
        assert h["IMAGETYP"] == "LIGHT" and "OVERSCAN" in h and h["TRIMSEC"].strip()
        assert hdul["MASK"].data.shape == data.shape and hdul["VARIANCE"].data.min() > 0
    raw = fits.getheader(path)
    order = config.settings("overscan")["fit_order"]
    ccd = CCDData.read(path, unit="adu")
    ref = ccdproc.subtract_overscan(ccd, fits_section=raw["BIASSEC"].replace(" ", ""), median=True,
                                    overscan_axis=1, model=Polynomial1D(order) if order is not None else None)
    ref = ccdproc.trim_image(ref, fits_section=raw["TRIMSEC"].replace(" ", "")).data
    good = mask == 0  # cosmic-ray pixels were cleaned by the product, not by ccdproc
    assert good.mean() > 0.95
    assert np.abs(data[good] - ref[good]).max() < 0.01
    assert h["OVERSCAN"] == pytest.approx(np.mean(ccd.data[:, 16:528] - ref), abs=0.01)


def test_not_flat_tile_compressed(real_dir, tmp_path):
    out = tmp_path / "not.fits"
    proc = _reduce(real_dir / "not_alfosc_raw_flat_gSDSS.fits.fz", out)
    assert proc.returncode == 0, proc.stderr
    h = fits.getheader(out)
    assert h["IMAGETYP"] == "FLAT" and h["FILTER"] == "g" and "OVERSCAN" in h
    assert h["NCRPIX"] == 0  # flats are not searched for cosmic rays


def test_gmos_cosmic_rays_found(real_dir, tmp_path):
    """The GMOS frame has a real cosmic-ray population; astroscrappy's own result is the reference."""
    import astroscrappy

    out = tmp_path / "gmos.fits"
    proc = _reduce(real_dir / "gemini_gmos_s_cosmic_rays.fits", out, "--obs", "SOAO")
    assert proc.returncode == 0, proc.stderr
    with fits.open(out) as hdul:
        ncr = hdul[0].header["NCRPIX"]
        mask = hdul["MASK"].data
    assert ncr > 50
    raw = fits.getdata(real_dir / "gemini_gmos_s_cosmic_rays.fits", 1).astype(np.float32)
    ref_mask, _ = astroscrappy.detect_cosmics(raw, gain=1.43, readnoise=13.6, sigclip=4.5, sigfrac=0.3, objlim=5.0)
    agree = ((mask & 4) > 0) & ref_mask
    assert agree.sum() >= 0.9 * ref_mask.sum()


def test_frame_without_imagetyp_is_a_clear_error(real_dir, tmp_path):
    proc = _reduce(real_dir / "m51_kpno_B_600s_iraf_devpix.fits", tmp_path / "m51.fits")
    assert proc.returncode == 65
    assert "m51_kpno_B_600s_iraf_devpix.fits" in proc.stderr and "IMAGETYP" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_truncated_file_is_a_clear_error(real_dir, tmp_path):
    bad = tmp_path / "cut.fits"
    bad.write_bytes((real_dir / "saao1m_ste3_raw_object_a8280271.fits").read_bytes()[:300_000])
    proc = _reduce(bad, tmp_path / "out.fits")
    assert proc.returncode == 65 and "cut.fits" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out.fits").exists()


SITE_NIGHTS = {  # real frames of other telescopes, each in a night folder of an IMSNG/GECKO site
    "saao1m_ste3_raw_object_a8280271.fits": ("LOAO", "2013_0712"),
    "not_alfosc_raw_flat_gSDSS.fits.fz": ("KCT", "20110701"),
    "apogee_alta_light_B_sipwcs.fit": ("RASA36", "2011-08-31"),
    "m51_kpno_B_600s_iraf_devpix.fits": ("SOAO", "1987_0504"),
}


def _saao_calibrations(real_dir, night) -> None:
    """Biases, 150 s darks and flats written with the SAAO frame's own header (its BIASSEC,
    TRIMSEC and filter wheel digit), so the real light frame has masters of its camera."""
    raw = fits.getheader(real_dir / "saao1m_ste3_raw_object_a8280271.fits")
    rng = np.random.default_rng(11)
    ny, nx = raw["NAXIS2"], raw["NAXIS1"]
    x = np.arange(nx)[None, :]
    flat = 1 + 0.1 * (x - nx / 2) / nx
    pattern = rng.normal(0, 2, (ny, nx))
    for i in range(5):
        level = 214 + rng.uniform(-3, 3) + 0.004 * np.arange(ny)[:, None]
        for kind, imagetyp, exptime, signal in (("bias", "zero", 0.0, 0.0), ("dark", "dark", 150.04, 3.0),
                                                ("flat", "flat", 2.0, 15000 * flat * (1 + 0.1 * i))):
            image = level + rng.normal(0, 2.6, (ny, nx))
            image[:, 16:] += (pattern + signal)[:, 16:]  # the overscan columns see no light and no pattern
            h = fits.Header([c for c in raw.cards if c.keyword not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1",
                                                                        "NAXIS2", "BZERO", "BSCALE")])
            h["IMAGETYP"], h["EXPTIME"], h["OBJECT"] = imagetyp, exptime, kind
            fits.PrimaryHDU(np.round(image).astype(np.uint16), h).writeto(night / f"a82800{i}{kind[0]}.fits")


def test_real_frames_in_site_nights_calibrated_or_one_line(real_dir, tmp_path):
    """Each real frame in a night of an IMSNG/GECKO site: plan, masters and reduce through the
    runner. The SAAO frame (with calibrations of its camera beside it) is calibrated, and its
    product equals ccdproc's overscan, trim, bias, dark and flat on the same masters; the others are
    quarantined or skipped with one line each; no stage fails as a bug."""
    import json
    import shutil

    import ccdproc
    from astropy.modeling.models import Polynomial1D
    from astropy.nddata import CCDData

    from gppy_stage import config, runner

    root = tmp_path / "root"
    for name, (obs, folder) in SITE_NIGHTS.items():
        dest = root / "obsdata" / obs / folder
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_dir / name, dest / name)
    _saao_calibrations(real_dir, root / "obsdata" / "LOAO" / "2013_0712")
    records = []
    for name, (obs, folder) in SITE_NIGHTS.items():
        records.append(runner.execute("plan", str(root), obs, folder))
        plan = json.loads((root / "runs" / obs / folder / "plan.json").read_text())
        records += [runner.execute("masters", str(root), obs, folder, item=cs["id"]) for cs in plan["calsets"]]
        reduced = {f["raw"]: runner.execute("reduce", str(root), obs, folder, item=f["id"]) for f in plan["frames"]}
        records += list(reduced.values())
        said = [q for q in plan["quarantine"] + plan["skipped"] if q["file"].endswith(name)]
        said += [r["error"] for raw, r in reduced.items() if raw.endswith(name) and r["status"] != "done"]
        done = [raw for raw, r in reduced.items() if raw.endswith(name) and r["status"] == "done"]
        assert len(said) + len(done) == 1, (name, plan, reduced)
        for q in said:
            assert q["reason"] and "\n" not in q["reason"], q
    assert all(r["status"] in ("done", "quarantined", "skipped") for r in records), records
    assert not any("traceback" in (r.get("error") or {}) for r in records)

    plan = json.loads((root / "runs" / "LOAO" / "2013_0712" / "plan.json").read_text())
    (entry,) = [f for f in plan["frames"] if f["raw"].endswith("saao1m_ste3_raw_object_a8280271.fits")]
    with fits.open(root / entry["output"]) as hdul:
        data, mask = hdul[0].data, hdul["MASK"].data
    assert data.shape == (520, 512)
    raw_path = real_dir / "saao1m_ste3_raw_object_a8280271.fits"
    h = fits.getheader(raw_path)
    order = config.settings("overscan")["fit_order"]
    ref = ccdproc.subtract_overscan(CCDData.read(raw_path, unit="adu"), fits_section=h["BIASSEC"].replace(" ", ""),
                                    median=True, overscan_axis=1, model=Polynomial1D(order))
    ref = ccdproc.trim_image(ref, fits_section=h["TRIMSEC"].replace(" ", ""))

    def master(kind):
        return CCDData(fits.getdata(root / entry["masters"][kind]).astype(np.float64), unit="adu")

    ref = ccdproc.subtract_bias(ref, master("zero"))
    dark = master("dark")
    ref = ccdproc.subtract_dark(ref, dark, dark_exposure=fits.getheader(root / entry["masters"]["dark"])["EXPTIME"] * u.s,
                                data_exposure=h["EXPTIME"] * u.s, scale=True)
    ref = ccdproc.flat_correct(ref, master("flat"), norm_value=1.0).data
    good = mask == 0  # cosmic-ray pixels are cleaned in the product, not by ccdproc
    assert good.mean() > 0.95
    np.testing.assert_allclose(data[good], ref[good], rtol=1e-4, atol=0.05)
