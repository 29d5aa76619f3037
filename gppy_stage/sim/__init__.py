"""The 7DT night simulator: raw frames as TCSpy writes them, plus the truth to test against.

Public API:
    simulate_night(out, unit, night, filters, size, seed, calib, n_science, field, reference, progress) -> dict
    render_sky(shape, wcs, stars, fwhm_arcsec, sky_adu, zp, *, beta, mag_col, rng, gain, rdnoise, sky_gradient)
    tycho2_stars(ra, dec, radius_deg) -> astropy Table (ra, dec, mag_vt)
    tangent_wcs(ra, dec, scale_arcsec, shape, rot_deg) -> astropy WCS
"""

from .catalog import star_field, tangent_wcs, tycho2_stars
from .model import ALL_FILTERS, FIELDS, ZP100
from .night import simulate_night
from .render import add_moffat, render_galaxy, render_sky

__all__ = ["simulate_night", "render_sky", "render_galaxy", "add_moffat", "tycho2_stars", "tangent_wcs",
           "star_field", "FIELDS", "ZP100", "ALL_FILTERS"]
