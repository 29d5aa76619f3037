"""The sky of a field: real Tycho-2 stars plus synthetic faint ones, and the Gaia-XP-like
reference catalogue made from them."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from . import model

TYCHO2_DIRS = (Path("/usr/share/astrometry"), Path("/usr/share/astrometry/data"))
# index-tycho2-07 has the finest quads, hence the most stars (1.87 million); the others are subsets.
TYCHO2_FILES = ("index-tycho2-07.littleendian.fits", "index-tycho2-08.littleendian.fits")


def find_tycho2_index() -> Path | None:
    for folder in TYCHO2_DIRS:
        for name in TYCHO2_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


@functools.lru_cache(maxsize=2)
def _tycho2_xyz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors and VT mags of every star in an astrometry.net index (see data/real/README.md)."""
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        locs = {}
        for hdu in hdul[1:]:
            name = str(hdu.header.get("TTYPE1", "")).strip()
            if name in ("kdtree_range_stars", "kdtree_data_stars", "MAG_VT"):
                locs[name] = (hdu.fileinfo()["datLoc"], int(hdu.header["NAXIS2"]))
    # The kdtree tables are raw native (little-endian) arrays in FITS clothing: read the bytes.
    rng = np.fromfile(path, dtype="<f8", count=7, offset=locs["kdtree_range_stars"][0])
    off, n = locs["kdtree_data_stars"]
    u = np.fromfile(path, dtype="<u4", count=3 * n, offset=off).reshape(n, 3)
    xyz = rng[:3] + u / rng[6]
    off, n = locs["MAG_VT"]
    mag = np.fromfile(path, dtype=">f4", count=n, offset=off).astype(float)
    return xyz, mag


def tycho2_stars(ra: float, dec: float, radius_deg: float, index: str | Path | None = None) -> Table:
    """Tycho-2 stars (ra, dec J2000 deg; mag_vt) within radius_deg of (ra, dec), sorted by ra.

    Empty table when no index file is installed (Debian astrometry-data-tycho2)."""
    path = Path(index) if index else find_tycho2_index()
    if path is None:
        return Table(names=("ra", "dec", "mag_vt"), dtype=(float, float, float))
    xyz, mag = _tycho2_xyz(str(path))
    r, d = math.radians(ra), math.radians(dec)
    c0 = np.array([math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d)])
    sel = xyz @ c0 >= math.cos(math.radians(radius_deg))
    p = xyz[sel]
    sra = np.degrees(np.arctan2(p[:, 1], p[:, 0])) % 360.0
    sdec = np.degrees(np.arcsin(np.clip(p[:, 2], -1, 1)))
    order = np.argsort(sra, kind="stable")
    return Table({"ra": sra[order], "dec": sdec[order], "mag_vt": mag[sel][order]})


def tangent_wcs(ra: float, dec: float, scale_arcsec: float, shape: tuple[int, int], rot_deg: float = 0.0) -> WCS:
    """A TAN WCS, north up and east left (then rotated), with the centre of shape at (ra, dec)."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    s = scale_arcsec / 3600.0
    c, sn = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    w.wcs.cd = np.array([[-s * c, s * sn], [s * sn, s * c]])
    return w


def star_field(ra0: float, dec0: float, half_width_deg: tuple[float, float], seed: int, field: str,
               boost: float = 1.0, faint_limit: float = 20.5, use_tycho2: bool = True) -> tuple[Table, bool]:
    """All stars of a box around (ra0, dec0) at Gaia's epoch: Tycho-2 where installed, plus synthetic
    stars down to faint_limit. Depends on (seed, field, box) only, so every night and unit sees the
    same sky. Returns (table, tycho2_used).

    Counts: dN/dm proportional to 10**(0.3 m), 2000 stars/deg^2 to G=20 (high galactic latitude),
    times boost (small frames get more so that they hold enough zero-point stars).
    """
    rng = model.rng_for(seed, "sky", field, round(half_width_deg[0], 6), round(half_width_deg[1], 6))
    hx, hy = half_width_deg
    box = tangent_wcs(ra0, dec0, 1.0, (1, 1))  # 1 arcsec "pixels" to place synthetic stars

    # synthetic: uniform in the tangent plane, magnitudes from the power-law counts
    area = 4 * hx * hy
    bright, slope = 12.0, 0.3
    norm = 2000.0 / (10 ** (slope * (20.0 - 20.0)) - 10 ** (slope * (bright - 20.0)))
    expected = boost * area * norm * (10 ** (slope * (faint_limit - 20.0)) - 10 ** (slope * (bright - 20.0)))
    n = int(rng.poisson(expected))
    u = rng.random(n)
    lo, hi = 10 ** (slope * (bright - 20.0)), 10 ** (slope * (faint_limit - 20.0))
    g = 20.0 + np.log10(lo + u * (hi - lo)) / slope
    dx = rng.uniform(-hx, hx, n) * 3600.0
    dy = rng.uniform(-hy, hy, n) * 3600.0
    sra, sdec = box.wcs_pix2world(box.wcs.crpix[0] + dx, box.wcs.crpix[1] + dy, 1)
    bp_rp = np.clip(rng.normal(0.95, 0.35, n), -0.2, 3.0)

    used = False
    tyc = tycho2_stars(ra0, dec0, math.hypot(hx, hy) * 1.01) if use_tycho2 else Table()
    if len(tyc):
        px, py = box.wcs_world2pix(tyc["ra"], tyc["dec"], 1)
        inside = (np.abs(px - box.wcs.crpix[0]) <= hx * 3600) & (np.abs(py - box.wcs.crpix[1]) <= hy * 3600)
        tyc = tyc[inside]
        used = True
    nt = len(tyc)
    t_bp_rp = np.clip(rng.normal(0.9, 0.3, nt), 0.0, 2.5)
    # VT -> G for FGK stars is roughly VT - 0.1 - 0.2 (BP-RP - 0.8)
    t_g = np.asarray(tyc["mag_vt"], dtype=float) - 0.1 - 0.2 * (t_bp_rp - 0.8) if nt else np.zeros(0)

    ra = np.concatenate([np.asarray(tyc["ra"], dtype=float) if nt else np.zeros(0), sra])
    dec = np.concatenate([np.asarray(tyc["dec"], dtype=float) if nt else np.zeros(0), sdec])
    gm = np.concatenate([t_g, g])
    col = np.concatenate([t_bp_rp, bp_rp])
    ntot = len(ra)
    # proper motions: a few mas/yr, a few fast movers; parallaxes of distant disc/halo stars
    pmra = rng.normal(0.0, 6.0, ntot)
    pmdec = rng.normal(-3.0, 6.0, ntot)
    fast = rng.random(ntot) < 0.03
    pmra[fast] *= 8
    pmdec[fast] *= 8
    parallax = np.abs(rng.lognormal(np.log(0.4), 0.8, ntot))
    source_id = 2_300_000_000_000_000_000 + np.cumsum(rng.integers(1, 10**9, ntot))
    t = Table({
        "source_id": source_id.astype(np.int64), "ra": ra % 360.0, "dec": dec, "parallax": parallax,
        "pmra": pmra, "pmdec": pmdec, "phot_g_mean_mag": gm, "bp_rp": col,
        "tycho2": np.r_[np.ones(nt, bool), np.zeros(n, bool)],
    })
    for f in model.ALL_FILTERS:
        t[f"mag_{f}"] = model.sed_mag(gm, col, f)
    return t, used


def positions_at(stars: Table, epoch: float) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) at a Julian epoch from J2016.0 positions and proper motions (pmra includes cos dec)."""
    dt = epoch - model.GAIA_EPOCH
    dec = np.asarray(stars["dec"]) + np.asarray(stars["pmdec"]) * dt / 3.6e6
    ra = np.asarray(stars["ra"]) + np.asarray(stars["pmra"]) * dt / 3.6e6 / np.cos(np.radians(np.asarray(stars["dec"])))
    return ra, dec


def reference_catalogue(stars: Table, seed: int, field: str) -> Table:
    """The Gaia DR3 XP synphot CSV of 7DT.md: catalogue mags scatter about the truth by their errors."""
    rng = model.rng_for(seed, "refcat", field)
    out = Table()
    for c in ("source_id", "ra", "dec", "parallax", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp"):
        out[c] = stars[c]
    for f in model.ALL_FILTERS:
        true = np.asarray(stars[f"mag_{f}"])
        err = model.catalogue_magerr(true)
        out[f"mag_{f}"] = true + rng.normal(0.0, 1.0, len(true)) * err
        out[f"magerr_{f}"] = err
    return out
