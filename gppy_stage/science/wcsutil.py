"""A header's WCS, read quietly."""

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
