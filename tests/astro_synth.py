"""Seeded synthetic frames for the astrometry/photometry tests (no simulator needed).

A frame has Moffat stars at known sky positions and fluxes, a known TAN WCS (north up, east
left, as 7DT frames are), sky, Poisson and read noise, and a matching Gaia-XP-style reference
catalogue (7DT column format, positions at J2016.0 with proper motions).
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from gppy_stage.sim import tangent_wcs


def true_wcs(ra, dec, shape, pixscale, rot_deg=0.0) -> WCS:
    return tangent_wcs(ra, dec, pixscale, shape, rot_deg)


def moffat_stamp(x, y, flux, fwhm, beta, half):
    """A Moffat star integrated on a 5x5 sub-pixel grid, normalised to its analytic total."""
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    ix, iy = int(round(x)), int(round(y))
    sub = (np.arange(5) - 2) / 5.0
    yy, xx = np.mgrid[iy - half: iy + half + 1, ix - half: ix + half + 1]
    img = np.zeros(xx.shape)
    for dy in sub:
        for dx in sub:
            r2 = (xx + dx - x) ** 2 + (yy + dy - y) ** 2
            img += (1 + r2 / alpha**2) ** (-beta)
    img /= 25.0
    norm = np.pi * alpha**2 / (beta - 1)  # analytic integral of the Moffat profile
    return iy - half, ix - half, img * flux / norm


def make_frame(
    seed=0,
    shape=(1000, 1500),
    ra=11.383,
    dec=-25.472,
    pixscale=0.505,
    fwhm_arcsec=2.6,
    beta=3.0,
    zp=26.3,
    sky=300.0,
    gain=0.78,
    rdnoise=3.0,
    filt="m425",
    n_stars=400,
    date_obs="2025-01-02T05:07:04",
    pointing_error_arcsec=(40.0, -30.0),
    refcat_noise=0.01,
    with_pm=True,
    rot_deg=0.0,
    saturate=65535.0,
):
    """(data, header, truth) where truth has 'wcs', 'stars' (Table), 'refcat' (Table), 'zp', 'fwhm'."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    w = true_wcs(ra, dec, shape, pixscale, rot_deg)
    margin = 60
    # stars over a slightly larger area so the reference extends past the edges
    px = rng.uniform(-margin, nx + margin, n_stars)
    py = rng.uniform(-margin, ny + margin, n_stars)
    # a magnitude distribution rising to the faint end, with enough 12-17.5 stars for zero points
    mags = np.concatenate([rng.uniform(12.0, 17.5, n_stars // 2), rng.uniform(17.5, 21.0, n_stars - n_stars // 2)])
    rng.shuffle(mags)
    sky_ra, sky_dec = w.all_pix2world(px, py, 0)
    pmra = rng.normal(0, 8, n_stars) if with_pm else np.zeros(n_stars)
    pmdec = rng.normal(0, 8, n_stars) if with_pm else np.zeros(n_stars)
    t_obs = Time(date_obs, scale="utc")
    dt = t_obs.jyear - 2016.0
    # the image shows stars at the observation epoch; the reference lists them at J2016.0
    ra16 = sky_ra - pmra * dt / 3.6e6 / np.cos(np.radians(sky_dec))
    dec16 = sky_dec - pmdec * dt / 3.6e6
    fwhm_px = fwhm_arcsec / pixscale
    flux = 10 ** (-0.4 * (mags - zp))
    img = np.full(shape, sky, float)
    half = int(np.ceil(12 * fwhm_px))
    big = np.zeros((ny + 2 * half + 2, nx + 2 * half + 2))
    for x, y, f in zip(px, py, flux):
        y0, x0, st = moffat_stamp(x, y, f, fwhm_px, beta, half)
        y0 += half + 1
        x0 += half + 1
        if y0 < 0 or x0 < 0 or y0 + st.shape[0] > big.shape[0] or x0 + st.shape[1] > big.shape[1]:
            continue
        big[y0: y0 + st.shape[0], x0: x0 + st.shape[1]] += st
    img += big[half + 1: half + 1 + ny, half + 1: half + 1 + nx]
    electrons = rng.poisson(np.clip(img * gain, 0, None)).astype(float)
    data = (electrons + rng.normal(0, rdnoise, shape)) / gain
    data = np.minimum(data, saturate).astype(np.float32)
    err_ra, err_dec = pointing_error_arcsec
    pra = ra + err_ra / 3600 / np.cos(np.radians(dec))
    pdec = dec + err_dec / 3600
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(pra * u.deg, pdec * u.deg)
    hdr = fits.Header()
    hdr["IMAGETYP"] = "LIGHT"
    hdr["FILTER"] = filt
    hdr["EXPTIME"] = 100.0
    hdr["DATE-OBS"] = date_obs
    hdr["MJD"] = t_obs.mjd
    hdr["OBJECT"] = "T10779"
    hdr["RA"] = pra
    hdr["DEC"] = pdec
    hdr["OBJCTRA"] = c.ra.to_string(unit=u.hour, sep=":", precision=2)
    hdr["OBJCTDEC"] = c.dec.to_string(unit=u.deg, sep=":", precision=1, alwayssign=True)
    hdr["TELESCOP"] = "7DT01"
    hdr["EGAIN"] = gain
    hdr["RDNOISE"] = rdnoise
    hdr["SATURATE"] = saturate
    variance = np.clip(data, 0, None) / gain + (rdnoise / gain) ** 2
    refmag = mags + rng.normal(0, refcat_noise, n_stars)
    refcat = Table(
        {
            "source_id": np.arange(n_stars, dtype=np.int64) + 10**15,
            "ra": ra16,
            "dec": dec16,
            "parallax": np.full(n_stars, 0.5),
            "pmra": pmra,
            "pmdec": pmdec,
            "phot_g_mean_mag": mags - 0.3,
            "bp_rp": np.full(n_stars, 0.8),
            f"mag_{filt}": refmag,
            f"magerr_{filt}": np.full(n_stars, max(refcat_noise, 0.005)),
        }
    )
    stars = Table({"x": px, "y": py, "ra": sky_ra, "dec": sky_dec, "mag": mags, "flux": flux})
    truth = {"wcs": w, "stars": stars, "refcat": refcat, "zp": zp, "fwhm_arcsec": fwhm_arcsec}
    return data, hdr, variance.astype(np.float32), truth


def write_calib(path, data, header, variance, mask=None):
    """A reduced frame as the lead's reduction writes it (primary + MASK + VARIANCE)."""
    mask = np.zeros(data.shape, np.uint8) if mask is None else mask
    fits.HDUList([
        fits.PrimaryHDU(data, header),
        fits.ImageHDU(mask, name="MASK"),
        fits.ImageHDU(variance, name="VARIANCE"),
    ]).writeto(path, overwrite=True)


def refcat_csv_bytes(refcat: Table) -> bytes:
    import io

    buf = io.StringIO()
    refcat.write(buf, format="ascii.csv")
    return buf.getvalue().encode()


def wide_field(csv_path, *, shape=(1024, 1024), pixscale=4.0, ra=11.383, dec=-25.472, rot_deg=0.0, seed=3,
               zp=19.5, fwhm_px=2.2, sky=200.0, n_faint=60):
    """A wide frame (about 1.1 degree across) with real Tycho-2 stars and no pointing in the header."""
    from astropy.table import Table as _T

    rng = np.random.default_rng(seed)
    tyc = _T.read(csv_path, format="ascii.csv")
    w = true_wcs(ra, dec, shape, pixscale, rot_deg)
    x, y = w.all_world2pix(tyc["ra"], tyc["dec"], 0)
    mags = np.asarray(tyc["mag_vt"], float)
    ny, nx = shape
    fx = rng.uniform(0, nx, n_faint)
    fy = rng.uniform(0, ny, n_faint)
    fm = rng.uniform(10.5, 13.0, n_faint)
    xs, ys, ms = np.concatenate([x, fx]), np.concatenate([y, fy]), np.concatenate([mags, fm])
    img = np.full(shape, sky, float)
    half = 15
    big = np.zeros((ny + 2 * half + 2, nx + 2 * half + 2))
    for xi, yi, m in zip(xs, ys, ms):
        if not (0 <= xi < nx and 0 <= yi < ny):
            continue
        y0, x0, st = moffat_stamp(xi, yi, 10 ** (-0.4 * (m - zp)), fwhm_px, 3.0, half)
        big[y0 + half + 1: y0 + half + 1 + st.shape[0], x0 + half + 1: x0 + half + 1 + st.shape[1]] += st
    img += big[half + 1: half + 1 + ny, half + 1: half + 1 + nx]
    data = rng.poisson(np.clip(img, 0, None)).astype(np.float32)
    data = np.minimum(data, 65535).astype(np.float32)
    hdr = fits.Header()
    hdr["IMAGETYP"] = "LIGHT"
    hdr["FILTER"] = "V"
    hdr["EXPTIME"] = 60.0
    hdr["DATE-OBS"] = "2025-01-02T05:07:04"
    hdr["OBJECT"] = "WIDE"
    return data, hdr, w


def sim_calib_frames(out, filters=("m425",), n_science=3, seed=0):
    """Simulate a night and calibrate its science frames with the simulator's true masters (so
    these tests do not depend on the reduce stage). Returns [(data, header, mask, variance, truth)]."""
    import json
    from pathlib import Path

    from gppy_stage import config
    from gppy_stage.headers import normalise
    from gppy_stage.sim import simulate_night

    s = simulate_night(out, filters=filters, n_science=n_science, seed=seed, calib=("bias",))
    truth_dir, raw_dir = Path(s["truth_dir"]), Path(s["raw_dir"])
    inst = config.instrument(s["unit"])
    bias = fits.getdata(truth_dir / "bias.fits").astype(np.float64)
    dark = fits.getdata(truth_dir / "dark_rate.fits").astype(np.float64)
    frames = []
    for entry in json.load(open(truth_dir / "frames.json")):
        if entry["imagetyp"] != "LIGHT":
            continue
        flat = fits.getdata(truth_dir / f"flat_{entry['filter']}.fits").astype(np.float64)
        with fits.open(raw_dir / entry["file"]) as hdul:
            raw = hdul[0].data.astype(np.float64)
            header = normalise(hdul[0].header.copy(), entry["file"])
        stem = entry["file"][:-5]
        crm = fits.getdata(truth_dir / "crmask" / f"{stem}.fits")
        sat = raw >= inst.saturation
        data = (raw - bias - dark * entry["exptime"]) / flat
        variance = (np.clip(data * flat, 0, None) / inst.gain + (inst.rdnoise / inst.gain) ** 2) / flat**2
        mask = (sat * 1 | (crm > 0) * 4).astype(np.uint8)
        header["EGAIN"] = inst.gain
        header["RDNOISE"] = inst.rdnoise
        header["SATURATE"] = inst.saturation
        for k in ("BZERO", "BSCALE", "BITPIX", "NAXIS1", "NAXIS2"):
            header.remove(k, ignore_missing=True)
        frames.append((data.astype(np.float32), header, mask, variance.astype(np.float32), entry))
    return s, frames
