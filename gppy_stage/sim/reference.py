"""A field's deep reference frame, 7DT's and an IMSNG/GECKO site's alike: ten exposures summed,
calibrated and sky-subtracted, with a correct WCS and a margin around the science footprint; no
transient, no asteroid, no cosmic rays, no fringes. The caller's telescope model gives the
photometry (``RefBand``); the rendering, the noise and the header are the same for every site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from . import catalog, detector, render
from .frames import add_host, wcs_cards, write_fits

REF_MARGIN_PX = 128
N_COMBINE = 10
REF_AIRMASS = 1.2
REF_BETA = 2.8


@dataclass(frozen=True)
class RefBand:
    """What the telescope makes of the field in one band, summed over N_COMBINE exposures."""

    field: str
    filt: str
    exptime: float  # [s] of the sum
    zp: float  # of the sum, at REF_AIRMASS
    zp100: float  # of a 100 s exposure at the zenith, which the sky brightness is quoted against
    sky_mag: float  # [mag / arcsec^2]
    star_mags: np.ndarray
    galaxy_mag: float
    telescope: str  # TELESCOP
    gain_key: str  # GAIN (TCSpy's) or EGAIN (MaxIm DL's)
    zp_comment: str


def deep_reference(path: Path, band: RefBand, rng: np.random.Generator, centre: tuple[float, float],
                   shape: tuple[int, int], pixscale: float, stars: Table, galaxy: dict, seeing0: float,
                   epoch: float, gain: float, rdnoise: float) -> Path:
    """Write the reference of ``band`` to ``path``: the field at ``centre``, north up, ``shape``
    plus REF_MARGIN_PX on each side, the stars at ``epoch``, seeing a little better than the night's."""
    rshape = (shape[0] + 2 * REF_MARGIN_PX, shape[1] + 2 * REF_MARGIN_PX)
    wcs = catalog.tangent_wcs(centre[0], centre[1], pixscale, rshape, 0.0)
    fwhm = float(seeing0 * rng.uniform(0.85, 0.95))
    sky = float(10 ** (-0.4 * (band.sky_mag - band.zp100 - 2.5 * math.log10(band.exptime / 100))) * pixscale**2)
    s_ra, s_dec = catalog.positions_at(stars, epoch)
    img = render.render_sky(rshape, wcs, Table({"ra": s_ra, "dec": s_dec, "mag": band.star_mags}),
                            fwhm, sky, band.zp, beta=REF_BETA)
    add_host(img, wcs, galaxy, band.galaxy_mag, band.zp, pixscale, fwhm / pixscale, REF_BETA)
    detector.add_noise_adu(img, gain, rdnoise * math.sqrt(N_COMBINE), rng)
    img -= np.float32(sky)
    h = fits.Header(wcs_cards(wcs))
    for k, v, c in (("OBJECT", band.field, "Field"), ("FILTER", band.filt, "Filter"),
                    ("EXPTIME", band.exptime, "[s] total"), ("NCOMBINE", N_COMBINE, "frames combined"),
                    ("ZP", round(band.zp, 4), band.zp_comment), ("FWHM", round(fwhm, 3), "[arcsec] seeing"),
                    ("BUNIT", "ADU", "summed ADU of NCOMBINE frames"),
                    (band.gain_key, gain, "[e-/ADU] effective gain of the sum"), ("SKYSUB", True, "sky subtracted"),
                    ("SKYVAL", round(sky, 3), "[ADU] sky level subtracted"),
                    ("EPOCH", round(epoch, 4), "epoch of star positions"), ("TELESCOP", band.telescope, ""),
                    ("SIMULATD", True, "gppy-stage simulator")):
        h[k] = (v, c)
    write_fits(path, img.astype(np.float32), h)
    return path
