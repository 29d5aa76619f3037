"""Real frames of real telescopes through `gppy reduce-file`: a product, or a clear one-line error."""

from __future__ import annotations

import subprocess
import sys

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
