"""simulate_site_night: a raw IMSNG/GECKO night (LOAO, KCT, RASA36) as MaxIm DL writes it.

The detector is the site's registry row (gain, read noise, pixel scale; the frame cut down to
``--size`` as for 7DT), the headers MaxIm's (``IMAGETYP = 'Light Frame'``, ``XBINNING``, the
pointing as OBJCTRA/OBJCTDEC sexagesimal, RA/DEC degrees or missing, per site), the night folder
and the file names the site's way. The sky, detector maps and noise come from the 7DT simulator's
modules (catalog, detector, render, model), so the same seed gives byte-identical files.

Magnitudes are AB. Johnson-Cousins B V R I truth is made from the true g r i through the
transformation the site's catalogue kind names in config/refcat_columns.yaml (science/transforms.py:
Tonry 2012 for PS1, Lupton 2005 for APASS) plus Blanton & Roweis (2007)'s Vega-to-AB offsets: the
simulated sky obeys the published relations exactly, so a zero point calibrated through them can be
judged against the truth to a few mmag (the relations' own scatter about real stars is not simulated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .. import config
from ..errors import ConfigError
from ..science import refcat as refcat_mod
from ..science import transforms
from ..science.refcat import VEGA_TO_AB
from . import catalog, detector, model, render
from .night import _write_csv, _write_fits, _write_json, wcs_cards

N_BIAS, N_DARK, N_FLATS = 5, 5, 5  # a master needs 5 (pipeline.yaml min_frames)
FLAT_TARGET_ADU = 25000.0
CATALOGUE_MARGIN_DEG = 3.0 / 60.0
# a small 7DT frame (1024 x 1536 px of 0.505", seeing ~2.6" = 5.1 px, star density boost 4): each site's
# frame gets as many stars per seeing disc as it has, which the 7DT photometry is proven on
SEVEN_DT_SMALL = {"deg2": 1024 * 1536 * (0.505 / 3600.0) ** 2, "npix": 1024 * 1536, "fwhm_px": 2.6 / 0.505,
                  "boost": 4.0}
FRINGE_BANDS = ("z", "y")  # the bands whose sky fringes (LOAO z and y in gpPy)
FRINGE_AMPLITUDE = 0.06  # peak fringe / sky
# one-sided, so that a tiny frame keeps the site's pixel scale and enough stars
SIZES = {"small": 1024, "tiny": 512}

# effective wavelength (nm) and AB mag of 1 ADU in 100 s at the zenith for a 1 m telescope at
# about 2.5 e-/ADU; a site's telescope shifts these by its zp_offset
BANDS = {"B": 445.0, "V": 551.0, "R": 658.0, "I": 806.0, "g": 475.0, "r": 620.0, "i": 760.0, "z": 870.0,
         "y": 960.0}
ZP100_1M = {"B": 27.0, "V": 27.4, "R": 27.4, "I": 26.9, "g": 27.6, "r": 27.5, "i": 27.1, "z": 26.3, "y": 25.4}


@dataclass(frozen=True)
class SiteSim:
    """What a site's night looks like beyond its registry row."""

    lat: float
    lon: float
    height: float
    utc_offset_h: int
    filters: tuple[str, ...]
    field: str
    refcat: str  # ps1 (north) or apass (south): a kind of config/refcat_columns.yaml
    pointing: str  # sexagesimal (OBJCTRA/OBJCTDEC), degrees (RA/DEC) or missing
    pointing_error_arcmin: float  # how far the header's pointing is from the true centre
    file_names: str  # descriptive (LOAO_M101_R_60s_001.fit) or autosave (image.000.fits)
    exptime: float
    zp_offset: float
    seeing: tuple[float, float]  # night's seeing range (arcsec)
    telescope: str
    # the night's sky against the dark sky (moonlight: negative is brighter); a sky of a few ADU is
    # quantised so coarsely that a median-based background is biased by a few per cent of a star
    sky_offset_mag: float = 0.0
    # stars per seeing disc against a small 7DT frame: a few-arcminute field needs more to hold
    # enough catalogue stars for a zero point
    crowding: float = 1.0


SITES = {
    "LOAO": SiteSim(32.4420, -110.7888, 2776.0, -7, ("B", "R"), "NGC3938", "ps1", "sexagesimal", 1.5, "descriptive",
                    60.0, 0.0, (1.6, 2.2), "LOAO 1m"),
    "KCT": SiteSim(-30.4704, -70.7804, 1580.0, -3, ("g", "r"), "NGC1566", "apass", "degrees", 1.0, "autosave",
                   180.0, -2.0, (2.0, 2.6), "KCT 0.36m", sky_offset_mag=-1.5, crowding=2.0),
    "RASA36": SiteSim(-30.4704, -70.7804, 1580.0, -3, ("r",), "NGC1566", "apass", "missing", 0.0, "autosave",
                      60.0, -0.6, (5.0, 6.0), "RASA 36cm"),  # 2.1-2.5 px: sharper is taken for cosmic rays
}
FIELDS = {"NGC3938": (178.2058, 44.1207), "NGC1566": (65.0016, -54.9380)}


def site_sim(obs: str) -> SiteSim:
    try:
        return SITES[obs.upper()]
    except KeyError:
        raise ConfigError(f"the simulator has no IMSNG/GECKO mode for {obs!r} (known: {', '.join(SITES)})") from None


def is_site(obs: str) -> bool:
    return obs.upper() in SITES


# ----------------------------------------------------------------------------- bands

def sed_mag(g_mag, bp_rp, lam: float):
    """model.sed_mag at any wavelength (the 7DT bands' SED, so every band of a star agrees)."""
    g_mag, bp_rp = np.asarray(g_mag, float), np.asarray(bp_rp, float)
    return g_mag + bp_rp * (640.0 - lam) / 270.0 + 0.3 * np.clip(bp_rp, 0, None) * max(0.0, (450.0 - lam) / 50.0)


def transform_name(kind: str) -> str | None:
    return (refcat_mod.column_maps().get(kind) or {}).get("transform")


def true_mags(g, r, i, z, band: str, kind: str):
    """AB magnitude in ``band`` from the true AB g r i and z; B V R I through the transformation of
    the catalogue ``kind``."""
    m = {"g": np.asarray(g, float), "r": np.asarray(r, float), "i": np.asarray(i, float), "z": np.asarray(z, float)}
    if band in m:
        return m[band]
    t = transforms.transform_for(transform_name(kind), band)
    if t is None:
        raise ConfigError(f"catalogue kind {kind!r} has no transformation to {band}")
    return t.ab(m[t.base], m[t.blue], m[t.red])


def star_mags(stars: Table, band: str, kind: str) -> np.ndarray:
    gm, col = stars["phot_g_mean_mag"], stars["bp_rp"]
    if band == "y":
        return sed_mag(gm, col, BANDS["y"])
    return true_mags(stars["mag_g"], stars["mag_r"], stars["mag_i"], sed_mag(gm, col, BANDS["z"]), band, kind)


def object_mag(g_mag: float, bp_rp: float, band: str, kind: str) -> float:
    """A single object's AB magnitude in ``band`` (the galaxy, the transient, the mover)."""
    return float(true_mags(*(sed_mag(g_mag, bp_rp, BANDS[x]) for x in "griz"), band, kind))


def check_filter(filt: str) -> str:
    if filt not in BANDS:
        raise ConfigError(f"unknown filter {filt!r} for an IMSNG/GECKO night (known: {', '.join(BANDS)})")
    return filt


def extinction(band: str) -> float:
    return 0.15 * (425.0 / BANDS[band]) ** 2


def sky_mag(site: SiteSim, band: str) -> float:
    return 22.0 - 2.5 * (BANDS[band] - 400.0) / 475.0 + site.sky_offset_mag


def zp100(site: SiteSim, band: str) -> float:
    return ZP100_1M[band] + site.zp_offset


def frame_zp(site: SiteSim, band: str, exptime: float, airmass: float, jitter: float = 0.0) -> float:
    return zp100(site, band) + 2.5 * math.log10(exptime / 100.0) - extinction(band) * airmass + jitter


# ----------------------------------------------------------------------------- the night's frames

@dataclass
class Frame:
    imagetyp: str  # BIAS DARK FLAT LIGHT
    filt: str | None
    exptime: float
    start: datetime
    seq: int
    level: float = 0.0

    @property
    def mid(self) -> datetime:
        return self.start + timedelta(seconds=self.exptime / 2)


def plan_frames(obs: str, site: SiteSim, night: str, filters, n_science: int, seed: int) -> list[Frame]:
    """Biases and darks in the afternoon, dusk flats, then the science frames around transit."""
    rng = model.rng_for(seed, obs, night, "plan")
    day = datetime.fromisoformat(night).replace(tzinfo=timezone.utc)
    local_noon = day + timedelta(hours=12 - site.utc_offset_h)
    t = local_noon + timedelta(hours=4)
    frames: list[Frame] = []
    for k in range(N_BIAS):
        frames.append(Frame("BIAS", None, 0.0, t, k + 1))
        t += timedelta(seconds=4 + rng.uniform(0, 1))
    for k in range(N_DARK):
        frames.append(Frame("DARK", None, site.exptime, t, k + 1))
        t += timedelta(seconds=site.exptime + 4 + rng.uniform(0, 1))
    t = local_noon + timedelta(hours=6, minutes=20)  # sunset at ~18:00 local: flats from dusk
    for filt in filters:
        for k in range(N_FLATS):
            level = FLAT_TARGET_ADU * rng.uniform(0.8, 1.2)
            frames.append(Frame("FLAT", filt, float(round(rng.uniform(2.0, 8.0), 1)), t, k + 1, level))
            t += timedelta(seconds=20 + rng.uniform(0, 2))
        t += timedelta(seconds=30)
    ra, _ = FIELDS[site.field]
    jd = model.julian_date(local_noon)
    transit = local_noon + timedelta(seconds=((ra - model.lst_deg(jd, site.lon)) % 360.0) / 360.0 * 86164.1)
    duration = len(filters) * n_science * (site.exptime + 10)
    start = min(max(transit - timedelta(seconds=duration / 2), local_noon + timedelta(hours=7, minutes=30)),
                local_noon + timedelta(hours=17))
    t = start
    for filt in filters:
        for k in range(n_science):
            frames.append(Frame("LIGHT", filt, site.exptime, t, k + 1))
            t += timedelta(seconds=site.exptime + 8 + rng.uniform(0, 1))
        t += timedelta(seconds=30)
    for f in frames:  # MaxIm writes whole seconds
        f.start = f.start.replace(microsecond=0)
    return frames


def night_folder(obs: str, night: str) -> str:
    pattern = config.site(obs).night_folder
    d = datetime.fromisoformat(night)
    fmt = {"YYYY_MMDD": "%Y_%m%d", "YYYYMMDD": "%Y%m%d", "YYYY-MM-DD": "%Y-%m-%d"}.get(pattern)
    if fmt is None:
        raise ConfigError(f"{obs}'s night folder pattern {pattern!r} is not an IMSNG/GECKO one")
    return d.strftime(fmt)


def file_name(obs: str, site: SiteSim, fr: Frame, index: int) -> str:
    if site.file_names == "autosave":
        return f"image.{index:03d}.fits"
    if fr.imagetyp == "LIGHT":
        return f"{obs}_{site.field}_{fr.filt}_{fr.exptime:g}s_{fr.seq:03d}.fit"
    what = {"BIAS": "bias", "DARK": f"dark_{fr.exptime:g}s", "FLAT": f"skyflat_{fr.filt}"}[fr.imagetyp]
    return f"{obs}_{what}_{fr.seq:03d}.fit"


MAXIM_TYPES = {"BIAS": "Bias Frame", "DARK": "Dark Frame", "FLAT": "Flat Field", "LIGHT": "Light Frame"}


def maxim_header(obs: str, site: SiteSim, inst: config.Instrument, fr: Frame, pointing: tuple[float, float] | None,
                 airmass: float | None, ccd_temp: float) -> fits.Header:
    """A MaxIm DL header: no WCS, no MJD, whole-second DATE-OBS, the pointing the site's way."""
    local = fr.start + timedelta(hours=site.utc_offset_h)
    h = fits.Header()
    cards = [
        ("IMAGETYP", MAXIM_TYPES[fr.imagetyp], "Type of image"),
        ("EXPTIME", fr.exptime, "[s] Exposure time"),
        ("EXPOSURE", fr.exptime, "[s] Exposure time"),
        ("DATE-OBS", fr.start.strftime("%Y-%m-%dT%H:%M:%S"), "[ISO 8601] UTC start of exposure"),
        ("DATE-LOC", local.strftime("%Y-%m-%dT%H:%M:%S"), "Local start of exposure"),
        ("JD", round(model.julian_date(fr.start), 6), "Julian date of exposure start"),
        ("XBINNING", 1, "Binning factor in width"),
        ("YBINNING", 1, "Binning factor in height"),
        ("XPIXSZ", 9.0, "[um] Pixel width incl. binning"),
        ("CCD-TEMP", ccd_temp, "[C] CCD temperature"),
        ("SET-TEMP", -30.0, "[C] CCD set point"),
        ("EGAIN", inst.gain, "[e-/ADU] Electronic gain"),
        ("INSTRUME", inst.camera, "Camera"),
        ("TELESCOP", site.telescope, "Telescope"),
        ("SITELAT", f"{site.lat:+.4f}", "Site latitude"),
        ("SITELONG", f"{site.lon:+.4f}", "Site longitude"),
        ("SWCREATE", "MaxIm DL Version 6.13 (gppy-stage simulator)", "Software"),
    ]
    if fr.filt is not None:
        cards.append(("FILTER", fr.filt, "Filter"))
    if fr.imagetyp == "LIGHT":
        cards.append(("OBJECT", site.field, "Target"))
        if airmass is not None:
            cards.append(("AIRMASS", round(airmass, 4), "Airmass at exposure start"))
    elif fr.imagetyp == "FLAT":
        cards.append(("OBJECT", "skyflat", "Target"))
    if pointing is not None and site.pointing == "sexagesimal":
        ra_s, dec_s = model.sexagesimal(*pointing)
        cards += [("OBJCTRA", ra_s.replace(":", " "), "[hms J2000] Target right ascension"),
                  ("OBJCTDEC", dec_s.replace(":", " "), "[dms J2000] Target declination")]
    elif pointing is not None and site.pointing == "degrees":
        cards += [("RA", round(pointing[0], 5), "[deg] Telescope right ascension"),
                  ("DEC", round(pointing[1], 5), "[deg] Telescope declination")]
    for k, v, c in cards:
        h[k] = (v, c)
    return h


def fringe_pattern(shape: tuple[int, int], obs: str, seed: int, band: str) -> np.ndarray:
    """A fringe map (fraction of the sky, peak about FRINGE_AMPLITUDE): a few interfering waves of
    20-80 px, the same every night of a site (it belongs to the detector and the band)."""
    rng = model.rng_for(seed, obs, "fringe", band, *shape)
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for _ in range(4):
        period, theta, phase = rng.uniform(20.0, 80.0), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        k = np.float32(2 * np.pi / period)
        out += np.sin(k * (x * np.float32(math.cos(theta)) + y * np.float32(math.sin(theta))) + np.float32(phase))
    out *= np.float32(FRINGE_AMPLITUDE / np.abs(out).max())
    return out


# ----------------------------------------------------------------------------- reference catalogue

def reference_catalogue(stars: Table, kind: str, seed: int, field: str) -> tuple[Table, str]:
    """The site's reference in its catalogue's own columns (Pan-STARRS1 DR1 or APASS DR9) and the
    file name under ref_cat/. Catalogue magnitudes scatter about the truth by their errors; APASS
    B and V are Vega, as APASS publishes them."""
    rng = model.rng_for(seed, "refcat", kind, field)
    out = Table()
    if kind == "ps1":
        out["objID"] = stars["source_id"]
        out["raMean"], out["decMean"] = stars["ra"], stars["dec"]
        bands = {b: (f"{b}MeanPSFMag", f"{b}MeanPSFMagErr", 0.0) for b in ("g", "r", "i", "z", "y")}
        keep = np.ones(len(stars), bool)
    elif kind == "apass":
        out["recno"] = np.arange(1, len(stars) + 1)
        out["RAJ2000"], out["DEJ2000"] = stars["ra"], stars["dec"]
        bands = {"B": ("Bmag", "e_Bmag", VEGA_TO_AB["B"]), "V": ("Vmag", "e_Vmag", VEGA_TO_AB["V"]),
                 "g": ("g'mag", "e_g'mag", 0.0), "r": ("r'mag", "e_r'mag", 0.0), "i": ("i'mag", "e_i'mag", 0.0)}
        keep = star_mags(stars, "V", kind) < 17.5  # APASS's depth
    else:
        raise ConfigError(f"the simulator writes ps1 or apass reference catalogues, not {kind!r}")
    for band, (mag_col, err_col, vega_to_ab) in bands.items():
        true = star_mags(stars, band, kind)
        err = model.catalogue_magerr(true)
        out[mag_col] = true + rng.normal(0.0, 1.0, len(true)) * err - vega_to_ab
        out[err_col] = err
    return out[keep], refcat_mod.refcat_file(kind, field)


# ----------------------------------------------------------------------------- the night

def simulate_site_night(out: str | Path, obs: str = "LOAO", night: str = "2024-02-29",
                        filters: tuple[str, ...] | list[str] | None = None, size: str = "small", seed: int = 0,
                        n_science: int = 2, reference: bool = True,
                        progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write a raw IMSNG/GECKO night under out/ (a storage root) plus its truth; the summary."""
    out = Path(out)
    obs = obs.upper()
    site = site_sim(obs)
    inst = config.instrument(obs)
    filters = tuple(check_filter(f) for f in (filters or site.filters))
    try:
        datetime.fromisoformat(night)
    except ValueError:
        raise ConfigError(f"night must be YYYY-MM-DD, got {night!r}") from None
    if size == "full":
        shape = inst.shape
    elif size in SIZES:
        shape = (min(inst.ny, SIZES[size]), min(inst.nx, SIZES[size]))
    else:
        raise ConfigError(f"unknown size {size!r} (small, tiny or full)")
    ny, nx = shape
    pixscale, gain, rdnoise = inst.pixscale, inst.gain, inst.rdnoise
    dark_e = inst.dark if inst.dark is not None else 0.01
    field = site.field
    ra0, dec0 = FIELDS[field]
    folder = night_folder(obs, night)
    raw_dir = out / "obsdata" / obs / folder
    truth_dir = out / "truth" / obs / folder

    # ---- the sky: as crowded (stars per seeing disc) as a small 7DT frame
    half = (nx * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG, ny * pixscale / 7200.0 + CATALOGUE_MARGIN_DEG)
    area = nx * ny * (pixscale / 3600.0) ** 2
    fwhm_px = sum(site.seeing) / 2 / pixscale
    ref = SEVEN_DT_SMALL
    boost = float(np.clip(site.crowding * ref["boost"] * ref["deg2"] / area * (nx * ny / ref["npix"])
                          * (ref["fwhm_px"] / fwhm_px) ** 2, 1.0, 40.0))
    stars, tycho_used = catalog.star_field(ra0, dec0, half, seed, field, boost=boost)
    refcat, refcat_name = reference_catalogue(stars, site.refcat, seed, field)
    refcat_path = out / "ref_cat" / refcat_name
    fmt = {c: "{:.5f}" for c in refcat.colnames} | {"objID": "{:d}", "recno": "{:d}", "raMean": "{:.8f}",
                                                  "decMean": "{:.8f}", "RAJ2000": "{:.8f}", "DEJ2000": "{:.8f}"}
    _write_csv(refcat_path, refcat, fmt)
    truth_stars = Table(stars)
    for band in filters:
        truth_stars[f"true_{band}"] = star_mags(stars, band, site.refcat)
    _write_csv(truth_dir / "stars.csv", truth_stars, {c: "{:.6f}" for c in truth_stars.colnames}
               | {"source_id": "{:d}", "tycho2": "{:d}", "ra": "{:.9f}", "dec": "{:.9f}"})

    # ---- the field's galaxy and its new point source; the night's moving object
    frng = model.rng_for(seed, "objects", obs, field)
    offsets = catalog.tangent_wcs(ra0, dec0, 1.0, (1, 1))
    g_ra, g_dec = (float(v) for v in offsets.wcs_pix2world(1 - 0.3 * nx * pixscale / 2, 1 + 0.3 * ny * pixscale / 2, 1))
    galaxy = {"ra": g_ra, "dec": g_dec, "mag_g": float(frng.uniform(14.0, 14.5)), "bp_rp": 1.0,
              "r_eff_arcsec": float(frng.uniform(5.0, 8.0)), "sersic_n": 1.0,
              "axis_ratio": float(frng.uniform(0.45, 0.7)), "pa_deg": float(frng.uniform(0, 180))}
    sep, ang = float(frng.uniform(2.0, 3.0)), float(frng.uniform(0, 2 * math.pi))
    t_dra, t_ddec = sep * math.sin(ang), sep * math.cos(ang)
    tr_g = float(frng.uniform(16.8, 17.3)) + (site.zp_offset < -1.0) * -0.8  # brighter for a small telescope
    tr_color = 0.1
    tr_true = {b: object_mag(tr_g, tr_color, b, site.refcat) for b in filters}
    transient = {"ra": g_ra + t_dra / 3600.0 / math.cos(math.radians(g_dec)), "dec": g_dec + t_ddec / 3600.0,
                 "host_offset_arcsec": sep, "mag": tr_true}
    nrng = model.rng_for(seed, obs, night, "night")
    ast_rate, ast_pa = float(nrng.uniform(30.0, 60.0)), float(nrng.uniform(0, 2 * math.pi))
    ast_g = float(nrng.uniform(16.5, 17.0))
    a_ra0, a_dec0 = (float(v) for v in offsets.wcs_pix2world(1 + nrng.uniform(-0.2, 0.2) * nx * pixscale,
                                                             1 + nrng.uniform(-0.2, 0.2) * ny * pixscale, 1))
    seeing0 = float(nrng.uniform(*site.seeing))
    rot_deg = float(model.rng_for(seed, obs, "mount").uniform(-0.5, 0.5))
    point_ang = float(nrng.uniform(0, 2 * math.pi))

    frames = plan_frames(obs, site, night, filters, n_science, seed)
    sci = [f for f in frames if f.imagetyp == "LIGHT"]
    t_ref = sci[0].mid

    def asteroid_at(when: datetime) -> tuple[float, float]:
        dt_h = (when - t_ref).total_seconds() / 3600.0
        d_e, d_n = ast_rate * dt_h * math.sin(ast_pa), ast_rate * dt_h * math.cos(ast_pa)
        return a_ra0 + d_e / 3600.0 / math.cos(math.radians(a_dec0)), a_dec0 + d_n / 3600.0

    # ---- detector maps (site- and seed-dependent only)
    bias = detector.bias_pattern(shape, obs, seed)
    dark_adu, hot = detector.dark_rate(shape, obs, seed, dark_e, gain)
    _write_fits(truth_dir / "bias.fits", bias)
    _write_fits(truth_dir / "dark_rate.fits", dark_adu)
    flats = {f: detector.true_flat(shape, obs, seed, _flat_band(f)) for f in filters}
    fringes = {f: fringe_pattern(shape, obs, seed, f) for f in filters if f in FRINGE_BANDS}
    for f in filters:
        _write_fits(truth_dir / f"flat_{f}.fits", flats[f])
    for f, pattern in fringes.items():
        _write_fits(truth_dir / f"fringe_{f}.fits", pattern)

    entries, track, files, counts = [], {}, [], {}
    for index, fr in enumerate(frames):
        name = file_name(obs, site, fr, index)
        rng = model.rng_for(seed, obs, night, "frame", name)
        entry = {"file": name, "imagetyp": fr.imagetyp, "filter": fr.filt, "exptime": fr.exptime,
                 "date_obs": fr.start.strftime("%Y-%m-%dT%H:%M:%S")}
        cr_idx, cr_val, hits = detector.cosmic_rays(shape, fr.exptime, rng)
        header_pointing = airmass = None
        if fr.imagetyp == "LIGHT":
            jd_mid = model.julian_date(fr.mid)
            airmass = model.altaz(ra0, dec0, jd_mid, site.lat, site.lon).airmass
            jitter = float(rng.normal(0, 0.02))
            zp = frame_zp(site, fr.filt, fr.exptime, airmass, jitter)
            fwhm = float(np.clip(seeing0 + rng.normal(0, 0.1), 1.2, 4.5))
            beta = float(np.clip(rng.normal(2.75, 0.08), 2.5, 3.0))
            sky_zp = zp100(site, fr.filt) + 2.5 * math.log10(fr.exptime / 100.0)
            sky_adu = float(10 ** (-0.4 * (sky_mag(site, fr.filt) - sky_zp)) * pixscale**2 * rng.uniform(0.9, 1.15))
            # the true centre is the rough pointing's error away from the field centre
            err = site.pointing_error_arcmin * 60.0
            de = err * math.cos(point_ang) + rng.normal(0, 2.0)
            dn = err * math.sin(point_ang) + rng.normal(0, 2.0)
            c_ra, c_dec = ra0 + de / 3600.0 / math.cos(math.radians(dec0)), dec0 + dn / 3600.0
            header_pointing = (ra0, dec0) if site.pointing != "missing" else None
            wcs = catalog.tangent_wcs(c_ra, c_dec, pixscale, shape, rot_deg)
            epoch = model.julian_year(fr.mid)
            s_ra, s_dec = catalog.positions_at(stars, epoch)
            signal = render.render_sky(shape, wcs, Table({"ra": s_ra, "dec": s_dec,
                                                          "mag": star_mags(stars, fr.filt, site.refcat)}),
                                       fwhm, sky_adu, zp, beta=beta)
            if fr.filt in fringes:
                signal += np.float32(sky_adu) * fringes[fr.filt]
            fwhm_px = fwhm / pixscale
            gxp, gyp = wcs.all_world2pix(galaxy["ra"], galaxy["dec"], 0)
            render.render_galaxy(signal, float(gxp), float(gyp),
                                 10 ** (-0.4 * (object_mag(galaxy["mag_g"], galaxy["bp_rp"], fr.filt, site.refcat) - zp)),
                                 galaxy["r_eff_arcsec"] / pixscale, galaxy["sersic_n"], galaxy["axis_ratio"],
                                 galaxy["pa_deg"], fwhm_px, beta)
            alpha = model.moffat_alpha(fwhm_px, beta)
            txp, typ = wcs.all_world2pix(transient["ra"], transient["dec"], 0)
            render.add_moffat(signal, float(txp), float(typ), 10 ** (-0.4 * (tr_true[fr.filt] - zp)), alpha, beta)
            a_mag = object_mag(ast_g, 0.85, fr.filt, site.refcat)
            for k in range(5):  # the mover trails during the exposure
                when = fr.start + timedelta(seconds=fr.exptime * (k + 0.5) / 5)
                axp, ayp = wcs.all_world2pix(*asteroid_at(when), 0)
                render.add_moffat(signal, float(axp), float(ayp), 10 ** (-0.4 * (a_mag - zp)) / 5, alpha, beta)
            a_ra, a_dec = asteroid_at(fr.mid)
            axp, ayp = wcs.all_world2pix(a_ra, a_dec, 0)
            track[name] = {"ra": a_ra, "dec": a_dec, "x": float(axp), "y": float(ayp), "mag": a_mag,
                           "filter": fr.filt, "mid_utc": fr.mid.isoformat()}
            expected = signal
            expected *= flats[fr.filt]
            expected += dark_adu * np.float32(fr.exptime)
            expected *= np.float32(gain)
            entry |= {"object": field, "zp": zp, "zp_jitter": jitter, "fwhm_arcsec": fwhm, "moffat_beta": beta,
                      "sky_adu": sky_adu, "wcs": wcs_cards(wcs), "pointing_error_arcsec": math.hypot(de, dn),
                      "header_pointing": site.pointing, "airmass": airmass, "epoch": epoch,
                      "transient_xy": [float(txp), float(typ)], "asteroid_xy": [float(axp), float(ayp)],
                      "fringe_amplitude_adu": sky_adu * FRINGE_AMPLITUDE if fr.filt in fringes else 0.0}
        elif fr.imagetyp == "FLAT":
            expected = flats[fr.filt] * np.float32(fr.level)
            expected += dark_adu * np.float32(fr.exptime)
            expected *= np.float32(gain)
            entry["level"] = fr.level
        else:
            expected = None if fr.imagetyp == "BIAS" else dark_adu * np.float32(gain * fr.exptime)
        raw = detector.digitise(expected, bias, gain, rdnoise, rng, (cr_idx, cr_val), inst.saturation)
        del expected
        header = maxim_header(obs, site, inst, fr, header_pointing, airmass, round(-30.0 + float(rng.normal(0, 0.1)), 2))
        path = raw_dir / name
        _write_fits(path, raw, header)
        _write_fits(truth_dir / "crmask" / f"{Path(name).stem}.fits", detector.cr_mask(shape, cr_idx), compress=True)
        entry["n_cosmic_rays"] = len(hits)
        entries.append(entry)
        files.append(str(path))
        counts[fr.imagetyp] = counts.get(fr.imagetyp, 0) + 1
        if progress:
            progress(index + 1, len(frames), name)

    _write_json(truth_dir / "frames.json", entries)
    _write_json(truth_dir / "transients.json", {
        "transient": transient, "host": galaxy,
        "asteroid": {"rate_arcsec_per_hour": ast_rate, "pa_deg": math.degrees(ast_pa) % 360.0, "mag_g": ast_g,
                     "positions": track}})
    ref_paths = {}
    if reference:
        for filt in filters:
            ref_paths[filt] = str(_reference_frame(out, obs, site, filt, shape, pixscale, stars, galaxy, seeing0,
                                                   model.julian_year(t_ref) - 1.0, gain, rdnoise, seed))
    summary = {"obs": obs, "unit": obs, "night": night, "night_folder": folder, "field": field,
               "filters": list(filters), "size": size, "shape": list(shape), "seed": seed, "counts": counts,
               "n_frames": len(frames), "raw_dir": str(raw_dir), "truth_dir": str(truth_dir),
               "ref_cat": str(refcat_path), "ref_cat_kind": site.refcat, "ref_frames": ref_paths, "files": files,
               "tycho2": tycho_used, "n_catalogue_stars": len(refcat), "pointing": site.pointing}
    _write_json(truth_dir / "truth.json", {
        "obs": obs, "night": night, "night_folder": folder, "field": field, "field_center": [ra0, dec0],
        "seed": seed, "size": size, "shape": list(shape), "filters": list(filters), "gain_e_per_adu": gain,
        "rdnoise_e": rdnoise, "dark_e_per_s": dark_e, "bias_level_adu": model.BIAS_LEVEL, "n_hot_pixels": int(hot.size),
        "pixscale_arcsec": pixscale, "rotation_deg": rot_deg, "saturation_adu": inst.saturation,
        "zp100": {f: zp100(site, f) for f in filters}, "extinction_mag_per_airmass": {f: extinction(f) for f in filters},
        "zp_definition": "mag (AB) = zp - 2.5 log10(total ADU of the source in the bias-, dark- and flat-corrected frame)",
        "johnson_cousins_truth": f"{transform_name(site.refcat)} from the true g r i, plus Blanton & Roweis (2007) "
                                 "Vega-to-AB (science/transforms.py)",
        "fringe": {f: f"fringe_{f}.fits: raw signal += sky_adu * map, before the flat" for f in fringes},
        "star_density_boost": boost, "ref_cat": refcat_name, "ref_cat_kind": site.refcat,
        "summary": {k: v for k, v in summary.items() if k != "files"},
    })
    return summary


def _flat_band(filt: str) -> str:
    """The 7DT band nearest in wavelength: detector.true_flat's colour dependence takes a 7DT name."""
    return min((f for f in model.WAVELENGTH), key=lambda f: abs(model.WAVELENGTH[f] - BANDS[filt]))


def _reference_frame(out: Path, obs: str, site: SiteSim, filt: str, shape, pixscale: float, stars: Table,
                     galaxy: dict, seeing0: float, epoch: float, gain: float, rdnoise: float, seed: int) -> Path:
    """A deep (10 frames), calibrated, sky-subtracted reference of the site with a correct WCS: no
    transient, no mover, no cosmic rays, no fringes. Named as subtract.yaml's patterns find it."""
    from .night import REF_MARGIN_PX

    rng = model.rng_for(seed, "ref", obs, site.field, filt, *shape)
    ra0, dec0 = FIELDS[site.field]
    rshape = (shape[0] + 2 * REF_MARGIN_PX, shape[1] + 2 * REF_MARGIN_PX)
    wcs = catalog.tangent_wcs(ra0, dec0, pixscale, rshape, 0.0)
    nexp = 10
    exptime = nexp * site.exptime
    zp = frame_zp(site, filt, exptime, 1.2)
    fwhm = float(seeing0 * rng.uniform(0.85, 0.95))
    beta = 2.8
    sky = float(10 ** (-0.4 * (sky_mag(site, filt) - zp100(site, filt) - 2.5 * math.log10(exptime / 100))) * pixscale**2)
    s_ra, s_dec = catalog.positions_at(stars, epoch)
    img = render.render_sky(rshape, wcs, Table({"ra": s_ra, "dec": s_dec, "mag": star_mags(stars, filt, site.refcat)}),
                            fwhm, sky, zp, beta=beta)
    gxp, gyp = wcs.all_world2pix(galaxy["ra"], galaxy["dec"], 0)
    render.render_galaxy(img, float(gxp), float(gyp),
                         10 ** (-0.4 * (object_mag(galaxy["mag_g"], galaxy["bp_rp"], filt, site.refcat) - zp)),
                         galaxy["r_eff_arcsec"] / pixscale, galaxy["sersic_n"], galaxy["axis_ratio"],
                         galaxy["pa_deg"], fwhm / pixscale, beta)
    detector.add_noise_adu(img, gain, rdnoise * math.sqrt(nexp), rng)
    img -= np.float32(sky)
    h = fits.Header(wcs_cards(wcs))
    for k, v, c in (("OBJECT", site.field, "Field"), ("FILTER", filt, "Filter"), ("EXPTIME", exptime, "[s] total"),
                    ("NCOMBINE", nexp, "frames combined"), ("ZP", round(zp, 4), "mag (AB) = ZP - 2.5 log10(ADU)"),
                    ("FWHM", round(fwhm, 3), "[arcsec] seeing"), ("BUNIT", "ADU", "summed ADU of NCOMBINE frames"),
                    ("EGAIN", gain, "[e-/ADU] effective gain of the sum"), ("SKYSUB", True, "sky subtracted"),
                    ("SKYVAL", round(sky, 3), "[ADU] sky level subtracted"), ("EPOCH", round(epoch, 4), "epoch of star positions"),
                    ("TELESCOP", obs, ""), ("SIMULATD", True, "gppy-stage simulator")):
        h[k] = (v, c)
    # the first of subtract.yaml's patterns (ref_7DT_<obj>_*) is the one for a site's own deep stack
    path = out / "ref_frame" / filt / f"ref_7DT_{site.field}_{filt}_{obs}_deep.fits"
    _write_fits(path, img.astype(np.float32), h)
    return path
