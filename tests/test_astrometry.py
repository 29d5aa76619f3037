"""Astrometry: SCAMP from the header pointing against a local reference, solve-field fallback."""

import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.wcs import WCS

sys.path.insert(0, str(Path(__file__).parent))
from astro_synth import make_frame, refcat_csv_bytes, sim_calib_frames, wide_field  # noqa: E402

from gppy_stage.errors import BadInputError  # noqa: E402
from gppy_stage.science import astrometry as A  # noqa: E402
from gppy_stage.science import refcat as R  # noqa: E402

TYCHO = Path(__file__).parent / "data" / "real" / "tycho2_T10779_NGC0253_r1.5deg.csv"


def _ref(truth, hdr):
    return R.at_epoch(R.read_refcat(refcat_csv_bytes(truth["refcat"]), name="gaiaxp_dr3_synphot_T10779.csv"),
                      A.observation_time(hdr))


def test_pointing_from_sexagesimal_and_degrees():
    h = fits.Header({"OBJCTRA": "00:45:31.92", "OBJCTDEC": "-25:28:19.2", "RA": 1.0, "DEC": 2.0})
    c = A.pointing(h)
    assert c.separation(SkyCoord(11.383, -25.472, unit="deg")).arcsec < 0.1
    h2 = fits.Header({"OBJCTRA": "00 45 31.92", "OBJCTDEC": "-25 28 19.2"})
    assert A.pointing(h2).separation(c).arcsec < 1e-6
    assert A.pointing(fits.Header({"RA": 11.383, "DEC": -25.472})).separation(c).arcsec < 0.1
    assert A.pointing(fits.Header({"OBJECT": "x"})) is None


def test_initial_wcs_is_north_up_east_left():
    w = WCS(A.initial_wcs((1000, 1500), SkyCoord(11.383, -25.472, unit="deg"), 0.505))
    ra0, dec0 = w.all_pix2world(750, 500, 0)
    ra1, dec1 = w.all_pix2world(760, 510, 0)
    assert ra1 < ra0 and dec1 > dec0
    assert abs((dec1 - dec0) * 3600 - 5.05) < 0.01


@pytest.mark.parametrize("seed,err", [(0, (45.0, -40.0)), (4, (-60.0, 30.0))])
def test_scamp_solves_a_synthetic_frame(seed, err):
    data, hdr, var, truth = make_frame(seed=seed, pointing_error_arcsec=err, rot_deg=0.3)
    sol = A.solve(data, hdr, _ref(truth, hdr), pixscale=0.505, gain=0.78, saturation=60000, variance=var,
                  band="m425", allow_blind=False)
    off = A.offset_from_truth(sol.wcs, truth["wcs"], data.shape)
    print(f"\nseed {seed}: {sol.method} nmatch {sol.nmatch} rms {sol.rms1_arcsec:.3f}/{sol.rms2_arcsec:.3f}\" "
          f"median offset from truth {np.median(off):.4f}\" max {off.max():.4f}\"")
    assert sol.method == "SCAMP"
    assert np.median(off) < 0.1
    assert sol.nmatch >= 50 and 0 < sol.rms1_arcsec < 0.1
    h = A.apply_solution(hdr, sol)
    assert h["ASTROMTD"] == "SCAMP" and h["NMATCH"] == sol.nmatch and h["ASTRRMS1"] > 0
    assert h["OBJECT"] == "T10779" and "SCAMPVER" in h
    assert np.median(A.offset_from_truth(WCS(h), truth["wcs"], data.shape)) < 0.1


def test_simulated_night_frames_solve(tmp_path):
    _, frames = sim_calib_frames(tmp_path / "sim", n_science=2)
    ref_raw = (tmp_path / "sim" / "ref_cat" / "gaiaxp_dr3_synphot_T10779.csv").read_bytes()
    for data, header, mask, var, truth in frames:
        assert "CTYPE1" not in header  # raw headers carry only the pointing
        ref = R.at_epoch(R.read_refcat(ref_raw, name="ref"), A.observation_time(header))
        sol = A.solve(data, header, ref, pixscale=0.505, gain=0.78, saturation=65535, mask=mask, variance=var,
                      band=truth["filter"])
        off = A.offset_from_truth(sol.wcs, WCS(fits.Header(truth["wcs"])), data.shape)
        print(f"\n{truth['file']}: pointing error {truth['pointing_error_arcsec']:.1f}\", {sol.method} "
              f"nmatch {sol.nmatch} rms {sol.rms1_arcsec:.3f}/{sol.rms2_arcsec:.3f}\" median offset {np.median(off):.4f}\"")
        assert sol.method == "SCAMP" and np.median(off) < 0.1


def test_solve_field_fallback_on_a_wide_field_without_pointing():
    data, hdr, w = wide_field(TYCHO)
    assert A.pointing(hdr) is None
    sol = A.solve(data, hdr, None, pixscale=4.0, gain=1.0, saturation=65535, cpulimit=30)
    off = A.offset_from_truth(sol.wcs, w, data.shape)
    print(f"\nwide field: {sol.method} matched {sol.nmatch}, median offset {np.median(off):.3f}\" max {off.max():.3f}\"")
    assert sol.method == "ASTROMETRY.NET"
    assert np.median(off) < 1.0
    assert "no usable pointing" in " ".join(sol.notes)


def test_blind_solution_is_refined_to_a_distortion_swarp_reads():
    """With a reference at hand, solve-field's TAN-SIP solution is refined by SCAMP: what is stored
    is a TPV/TAN solution (SWarp ignores SIP), as good as the truth."""
    from astropy.table import Table

    data, hdr, w = wide_field(TYCHO)
    tyc = Table.read(TYCHO, format="ascii.csv")
    ref = Table({"ra": tyc["ra"], "dec": tyc["dec"], "phot_g_mean_mag": tyc["mag_vt"]})
    sol = A.solve(data, hdr, ref, pixscale=4.0, gain=1.0, saturation=65535, cpulimit=30)
    off = A.offset_from_truth(sol.wcs, w, data.shape)
    print(f"\nrefined: {sol.method} matched {sol.nmatch}, median offset {np.median(off):.3f}\"")
    assert sol.method == "ASTROMETRY.NET+SCAMP"
    assert "SIP" not in sol.wcs_header["CTYPE1"] and not any(k.startswith("A_") for k in sol.wcs_header)
    assert np.median(off) < 1.0


def test_unsolvable_frame_is_a_typed_error():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 5, (300, 300)).astype(np.float32)
    with pytest.raises(A.AstrometryError) as exc:
        A.solve(data, fits.Header({"OBJECT": "x"}), None, pixscale=0.505, gain=1.0, saturation=65535, cpulimit=5)
    assert isinstance(exc.value, BadInputError)
    assert "too few" in exc.value.reason and "no usable pointing" in exc.value.reason
