"""Tracks of transient candidates through the single frames of the night, for the moving flag.

``tracks`` sets ``science.moving.link_tracks``'s tolerances from the PSF and the caller's
radii; ``sky_rate`` turns a track's pixel velocity into a rate and a position angle on the sky.
"""

from __future__ import annotations

import numpy as np


def tracks(x, y, frames, fwhm: float, radius: float, tol: float, *, groups=None, times=None, span=None,
           vmax: float | None = None) -> dict:
    """The track of each candidate (``science.moving.link_tracks``'s dict) through per-frame
    source positions on the candidates' grid.

    Sources found at the same place (within ``tol``) in most frames are static (a star, a galaxy,
    a transient that stays put) and cannot show motion: dropping them first is what lets
    whole-frame catalogues serve, so a galaxy beside a transient, found in every frame, never pairs
    with the transient found in only one. Without ``times`` frame k is at time k, the candidates'
    span covers every frame and a mover shifts by at most ``radius`` per frame. How far a track
    may pass from a candidate and from its detections follows the PSF's ``fwhm``.
    """
    from gppy_stage.science.moving import link_tracks

    if times is None:
        times, span, vmax = np.arange(len(frames), dtype=float), (0.0, max(len(frames) - 1.0, 0.0)), radius
    return link_tracks(x, y, span, frames, times, vmax=vmax, tol=max(1.5, 0.5 * fwhm), r0=max(tol, fwhm),
                       static_tol=tol, fit_tol=max(1.0, 0.25 * fwhm), groups=groups)


def sky_rate(wcs, track: dict, moving) -> tuple[np.ndarray, np.ndarray]:
    """Rate (arcsec/h) and position angle (deg, east of north) of each moving candidate's track
    (velocities in px/day); NaN for the others."""
    from gppy_stage.science.moving import rate_and_pa

    rate, pa = rate_and_pa(wcs, track["x0"], track["y0"], track["vx"], track["vy"], per_hour=24.0)
    return np.where(moving, rate, np.nan), np.where(moving, pa, np.nan)
