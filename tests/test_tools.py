"""Tool wrappers: the real Debian programs, one temporary directory per call."""

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from astro_synth import make_frame  # noqa: E402

from gppy_stage.errors import ToolError, ToolMissingError  # noqa: E402
from gppy_stage.tools import astromatic, ldac  # noqa: E402

M51 = Path(__file__).parent / "data" / "real" / "m51_kpno_B_600s_iraf_devpix.fits"


def test_missing_binary_names_the_debian_package():
    with pytest.raises(ToolMissingError) as exc:
        astromatic.find_binary("no-such-tool-xyz")
    assert "apt-get install" in str(exc.value)
    astromatic._BINARIES["fake-sex"] = (("definitely-not-installed-sex",), "source-extractor")
    try:
        with pytest.raises(ToolMissingError, match="source-extractor"):
            astromatic.find_binary("fake-sex")
    finally:
        del astromatic._BINARIES["fake-sex"]


def test_versions_and_config_hashes():
    prov = astromatic.provenance("source-extractor", "sextractor/default.sex")
    assert prov["version"].startswith("2.")
    assert len(prov["sextractor/default.sex"]) == 16
    assert astromatic.tool_version("scamp").startswith("2.")
    assert astromatic.tool_version("missfits").startswith("2.")


def test_failing_tool_carries_stderr():
    data = np.random.default_rng(0).normal(100, 5, (64, 64)).astype(np.float32)
    with pytest.raises(ToolError) as exc:
        astromatic.sextractor(data, options={"FILTER_NAME": "/nonexistent/filter.conv"})
    assert "filter.conv" in str(exc.value) or "can't" in str(exc.value).lower()


def test_sextractor_finds_synthetic_stars():
    data, hdr, var, truth = make_frame(seed=5, shape=(500, 600), n_stars=120)
    cat = astromatic.sextractor(data, hdr, weight=1 / var, options={"GAIN": 0.78, "SATUR_LEVEL": 60000})
    assert isinstance(cat, Table) and cat.meta["SEXVER"].startswith("2.")
    stars = truth["stars"]
    bright = stars[(stars["mag"] < 17) & (stars["x"] > 10) & (stars["x"] < 590) & (stars["y"] > 10) & (stars["y"] < 490)]
    d = np.hypot(cat["XWIN_IMAGE"][None, :] - 1 - bright["x"][:, None], cat["YWIN_IMAGE"][None, :] - 1 - bright["y"][:, None])
    # bright stars are found at their true positions (SExtractor is 1-based); a few random blends aside
    dmin = d.min(axis=1)
    assert np.median(dmin) < 0.05 and np.mean(dmin < 0.3) > 0.9, np.sort(dmin)[-5:]


def test_ldac_round_trip_keeps_header_blank_padded(tmp_path):
    t = Table({"A": [1.0, 2.0], "B": [3, 4]})
    h = fits.Header({"NAXIS1": 10, "NAXIS2": 20, "OBJECT": "x"})
    raw = ldac.write_ldac(t, h)
    assert b"END" + b" " * 77 in raw  # NUL padding crashes SCAMP
    back, hh = ldac.read_ldac(raw, with_header=True)
    assert list(back["A"]) == [1.0, 2.0] and hh["OBJECT"] == "x" and hh["NAXIS2"] == 20


def test_missfits_merges_a_head():
    base = fits.Header({"OBJECT": "T1", "FILTER": "m425", "EXPTIME": 100.0})
    head = fits.Header({"CTYPE1": "RA---TAN", "CRVAL1": 11.5, "NMATCH": 42})
    merged = astromatic.missfits(base, head)
    assert merged["OBJECT"] == "T1" and merged["CRVAL1"] == 11.5 and merged["NMATCH"] == 42


def test_sextractor_agrees_with_sep_on_a_real_frame():
    sep = pytest.importorskip("sep")
    data = fits.getdata(M51).astype(np.float32)
    diam = 10.0
    cat = astromatic.sextractor(
        data, params=["X_IMAGE", "Y_IMAGE", "FLUX_APER(1)", "FLUXERR_APER(1)", "FLUX_MAX", "FLAGS"],
        options={"PHOT_APERTURES": diam, "BACK_SIZE": 64, "BACK_FILTERSIZE": 3, "DETECT_THRESH": 5,
                 "FILTER": False, "SATUR_LEVEL": 1e9, "BACKPHOTO_TYPE": "GLOBAL", "DETECT_MINAREA": 5,
                 "CLEAN": False, "DEBLEND_MINCONT": 0.005})
    bkg = sep.Background(data.astype(np.float64), bw=64, bh=64, fw=3, fh=3)
    sub = data.astype(np.float64) - bkg.back()
    objs = sep.extract(sub, 5.0, err=bkg.globalrms, minarea=5, filter_kernel=None, clean=False, deblend_cont=0.005)
    flux, _, _ = sep.sum_circle(sub, objs["x"], objs["y"], diam / 2, subpix=5)
    # bright, isolated, unflagged sources
    se = cat[(cat["FLAGS"] == 0) & (cat["FLUX_APER"] > 50 * cat["FLUXERR_APER"])]
    assert len(se) >= 10
    d = np.hypot(se["X_IMAGE"][:, None] - 1 - objs["x"][None, :], se["Y_IMAGE"][:, None] - 1 - objs["y"][None, :])
    j = d.argmin(axis=1)
    ok = d[np.arange(len(se)), j] < 1.0
    assert ok.sum() >= 10
    dpos = d[np.arange(len(se)), j][ok]
    ratio = np.asarray(se["FLUX_APER"])[ok] / flux[j[ok]]
    print(f"\nM51: {ok.sum()} bright sources; median |dpos| {np.median(dpos):.4f} px, max {dpos.max():.4f} px; "
          f"flux ratio median {np.median(ratio):.5f}, max |1-r| {np.max(np.abs(ratio - 1)):.5f}")
    assert np.median(dpos) < 0.1
    assert np.median(np.abs(ratio - 1)) < 0.02
    assert np.percentile(np.abs(ratio - 1), 90) < 0.02
