"""The IMSNG/GECKO sites as the simulator sees them (LOAO, KCT, RASA36): each site's night beyond
its registry row, its bands, and the true magnitudes and reference catalogue of its field.

Magnitudes are AB. Johnson-Cousins B V R I truth is made from the true g r i through the
transformation the site's catalogue kind names in config/refcat_columns.yaml (science/transforms.py:
Tonry 2012 for PS1, Lupton 2005 for APASS) plus Blanton & Roweis (2007)'s Vega-to-AB offsets: the
simulated sky obeys the published relations exactly, so a zero point calibrated through them can be
judged against the truth to a few mmag (the relations' own scatter about real stars is not simulated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ..errors import ConfigError
from ..science import refcat as refcat_mod
from ..science import transforms
from ..science.refcat import VEGA_TO_AB
from . import model

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


def flat_band(filt: str) -> str:
    """The 7DT band nearest in wavelength: detector.true_flat's colour dependence takes a 7DT name."""
    return min((f for f in model.WAVELENGTH), key=lambda f: abs(model.WAVELENGTH[f] - BANDS[filt]))
