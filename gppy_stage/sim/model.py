"""Numbers and small pure models behind the simulator: filters, fields, site, sky, seeds.

Values come from docs/7DT.md where it has them; the rest are plausible estimates, named here
so that a test can read the same number the simulator used.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from ..errors import ConfigError

# AB magnitude of 1 ADU in a 100 s frame (7DT.md, early QA values) and effective wavelength (nm).
ZP100 = {
    "m400": 25.675, "m425": 26.339, "m450": 26.669, "m475": 26.716, "m500": 26.721,
    "m525": 26.745, "m550": 26.62, "m575": 26.592, "m600": 26.39, "m625": 26.161,
    "m650": 26.003, "m675": 25.806, "m700": 25.642, "m725": 25.366, "m750": 25.034,
    "m775": 24.602, "m800": 24.45, "m825": 24.047, "m850": 23.673, "m875": 23.358,
    "g": 28.652, "r": 28.154, "i": 26.726,
}
WAVELENGTH = {f: float(f[1:]) for f in ZP100 if f.startswith("m")} | {"g": 475.0, "r": 620.0, "i": 760.0}
ALL_FILTERS = tuple(ZP100)

# Known pointings: 7DS tiles and named fields (deg, J2000).
FIELDS: dict[str, tuple[float, float]] = {
    "T10779": (11.383, -25.472),  # 7DS tile near NGC 253
    "UDS": (34.5, -5.1),
}

# El Sauce Observatory (7DT.md).
SITE_LAT = -30.4704
SITE_LON = -70.7804
SITE_HEIGHT = 1580.0
LOCAL_UTC_OFFSET_H = -3  # Chilean summer time (CLST) in January

GAIA_EPOCH = 2016.0
READOUT_S = 3.0  # C3-61000 full-frame download + save: the gap between exposures
BIAS_LEVEL = 512.6  # ADU; the master-bias QA wants a clipped median of 512-514
CR_RATE = 3.0  # hits per cm^2 per s: generous, so a small frame holds tens of hits
HOT_PIXEL_FRACTION = 1.3e-4  # ~200 hot pixels in a small frame
PIXEL_UM = 3.76


def check_filter(filt: str) -> str:
    if filt not in ZP100:
        raise ConfigError(f"unknown filter {filt!r} for the simulator (known: {', '.join(ALL_FILTERS)})")
    return filt


def field_center(field: str) -> tuple[float, float]:
    try:
        return FIELDS[field]
    except KeyError:
        raise ConfigError(f"unknown field {field!r} for the simulator (known: {', '.join(sorted(FIELDS))})") from None


def extinction_coeff(filt: str) -> float:
    """mag per airmass: ~0.15 in the blue medium bands, falling to the red (Rayleigh-like)."""
    return 0.15 * (425.0 / WAVELENGTH[filt]) ** 2


def sky_surface_brightness(filt: str) -> float:
    """Dark-sky AB mag/arcsec^2: ~22 at 400 nm brightening to ~19.5 at 875 nm."""
    return 22.0 - 2.5 * (WAVELENGTH[filt] - 400.0) / 475.0


def frame_zp(filt: str, exptime: float, airmass: float, jitter: float = 0.0) -> float:
    """mag = zp - 2.5 log10(total ADU of the source in the flat-fielded frame)."""
    return ZP100[filt] + 2.5 * math.log10(exptime / 100.0) - extinction_coeff(filt) * airmass + jitter


def sed_mag(g_mag, bp_rp, filt: str):
    """A star's AB mag in a filter from G and BP-RP: a straight line in wavelength plus a
    4000 A break that deepens for red stars. Simple, but gives each star a colour."""
    lam = WAVELENGTH[filt]
    g_mag = np.asarray(g_mag, dtype=float)
    bp_rp = np.asarray(bp_rp, dtype=float)
    return g_mag + bp_rp * (640.0 - lam) / 270.0 + 0.3 * np.clip(bp_rp, 0, None) * max(0.0, (450.0 - lam) / 50.0)


def catalogue_magerr(mag):
    """Gaia XP synphot-like errors: ~0.005 at mag 12 growing to ~0.1 at mag 20."""
    return 0.005 + 0.095 * 10 ** (0.4 * (np.asarray(mag, dtype=float) - 20.0))


def moffat_alpha(fwhm_px: float, beta: float) -> float:
    return fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


# ---------------------------------------------------------------- seeds
def _stable_int(key) -> int:
    if isinstance(key, (int, np.integer)) and key >= 0:
        return int(key)
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")


def rng_for(seed: int, *keys) -> np.random.Generator:
    """An independent generator per (seed, keys): the bias of a unit never depends on the night,
    a frame's noise never depends on how many frames came before it."""
    return np.random.default_rng(np.random.SeedSequence([_stable_int(seed)] + [_stable_int(k) for k in keys]))


# ---------------------------------------------------------------- time and site
def julian_date(when: datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return 2440587.5 + when.timestamp() / 86400.0


def julian_year(when: datetime) -> float:
    return 2000.0 + (julian_date(when) - 2451545.0) / 365.25


def lst_deg(jd: float, lon_deg: float = SITE_LON) -> float:
    gmst_h = 18.697374558 + 24.06570982441908 * (jd - 2451545.0)
    return (gmst_h * 15.0 + lon_deg) % 360.0


@dataclass(frozen=True)
class Horizontal:
    alt: float
    az: float
    airmass: float


def airmass_of(alt_deg: float) -> float:
    """Pickering (2002); fine down to the horizon."""
    h = max(alt_deg, 0.5)
    return 1.0 / math.sin(math.radians(h + 244.0 / (165.0 + 47.0 * h**1.1)))


def altaz(ra: float, dec: float, jd: float, lat: float = SITE_LAT, lon: float = SITE_LON) -> Horizontal:
    ha = math.radians(lst_deg(jd, lon) - ra)
    d, p = math.radians(dec), math.radians(lat)
    sin_alt = math.sin(p) * math.sin(d) + math.cos(p) * math.cos(d) * math.cos(ha)
    alt = math.degrees(math.asin(max(-1.0, min(1.0, sin_alt))))
    az = math.degrees(math.atan2(-math.sin(ha) * math.cos(d), math.sin(d) * math.cos(p) - math.cos(d) * math.sin(p) * math.cos(ha)))
    return Horizontal(alt=alt, az=az % 360.0, airmass=airmass_of(alt))


def radec_of(alt: float, az: float, jd: float, lat: float = SITE_LAT, lon: float = SITE_LON) -> tuple[float, float]:
    a, z, p = math.radians(alt), math.radians(az), math.radians(lat)
    sin_d = math.sin(a) * math.sin(p) + math.cos(a) * math.cos(p) * math.cos(z)
    d = math.asin(sin_d)
    ha = math.atan2(-math.sin(z) * math.cos(a), math.sin(a) * math.cos(p) - math.cos(a) * math.sin(p) * math.cos(z))
    return (lst_deg(jd, lon) - math.degrees(ha)) % 360.0, math.degrees(d)


def sexagesimal(ra: float, dec: float) -> tuple[str, str]:
    """TCSpy's OBJCTRA 'hh:mm:ss.ss' and OBJCTDEC '+dd:mm:ss.s'."""
    t = round((ra % 360.0) / 15.0 * 360000)  # centiseconds of time
    t %= 24 * 360000
    h, rem = divmod(t, 360000)
    m, cs = divmod(rem, 6000)
    ra_s = f"{h:02d}:{m:02d}:{cs / 100:05.2f}"
    sign = "-" if dec < 0 else "+"
    ds = round(abs(dec) * 36000)  # tenths of arcsec
    d, rem = divmod(ds, 36000)
    m, ts = divmod(rem, 600)
    return ra_s, f"{sign}{d:02d}:{m:02d}:{ts / 10:04.1f}"
