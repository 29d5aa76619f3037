"""A header's WCS: whether it has one on the sky, and reading it quietly."""

from __future__ import annotations

import warnings

from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning


def wcs_of(header: fits.Header) -> WCS:
    """The WCS of a header, without astropy's notes on what it fixed (MJD-OBS read from DATE-OBS,
    and the like): they are nothing to act on, and one per cut-out floods a stage's log."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return WCS(header)


def has_celestial_wcs(header: fits.Header) -> bool:
    """Whether the header places its pixels on the sky (RA/Dec axes with a reference point): a
    frame astrometry failed on has none."""
    c1, c2 = str(header.get("CTYPE1", "")), str(header.get("CTYPE2", ""))
    return c1.startswith("RA--") and c2.startswith("DEC-") and "CRVAL1" in header and "CRVAL2" in header
