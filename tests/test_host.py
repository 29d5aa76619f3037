"""Host association against the simulator's truth: the transient's host galaxy and its offset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from gppy_stage.science.host import associate
from gppy_stage.sim import model, simulate_night
from gppy_stage.sim.render import render_galaxy, render_stars


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostnight")
    simulate_night(out, filters=("m425",), seed=7, n_science=1, calib=("bias",))
    return out


def test_simulated_transient_host(night):
    truth = json.loads(next(night.glob("truth/*/*/transients.json")).read_text())
    path = next(night.glob("ref_frame/m425/*.fits"))
    data, header = fits.getdata(path, header=True)
    wcs = WCS(header)
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600)
    t = truth["transient"]
    x, y = wcs.world_to_pixel_values(t["ra"], t["dec"])
    host = associate(data, [x], [y], fwhm=float(header["FWHM"]), pixel_scale=scale, zp=float(header["ZP"]))[0]
    hx, hy = wcs.world_to_pixel_values(truth["host"]["ra"], truth["host"]["dec"])
    assert np.hypot(host["host_x"] - hx, host["host_y"] - hy) * scale < 0.5  # the true host, not a neighbour
    assert abs(host["host_sep"] - t["host_offset_arcsec"]) < 0.5
    true_mag = model.sed_mag(truth["host"]["mag_g"], truth["host"]["bp_rp"], "m425")
    assert abs(host["host_mag"] - true_mag) < 0.3
    assert host["host_dlr"] < 1  # inside the galaxy's light


def test_star_is_no_host_and_light_radius_ranks():
    """A nearer star is not a host; a big galaxy farther away beats a small one nearer in light radii."""
    rng = np.random.default_rng(3)
    img = rng.normal(100, 3, (400, 400)).astype(np.float32)
    fwhm = 3.0
    render_stars(img, np.array([200.0]), np.array([208.0]), np.array([2e5]), fwhm, 3.0)
    render_galaxy(img, 225.0, 200.0, 3e5, 20.0, 1.0, 0.8, 0.0, fwhm, 3.0)  # big, 25 px away
    render_galaxy(img, 200.0, 188.0, 2e4, 3.0, 1.0, 0.8, 0.0, fwhm, 3.0)  # small, 12 px away
    host = associate(img, [200.0, 20.0], [200.0, 380.0], fwhm=fwhm, pixel_scale=0.5, zp=25.0)
    assert abs(host["host_x"][0] - 225) < 1 and abs(host["host_y"][0] - 200) < 1
    assert abs(host["host_sep"][0] - 12.5) < 0.5
    assert host["host_x"][1] == -1 and np.isnan(host["host_sep"][1])  # nothing extended near the corner
