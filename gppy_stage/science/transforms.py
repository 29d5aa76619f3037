"""Johnson-Cousins B V R I magnitudes (AB) of reference stars from a catalogue's g r i.

IMSNG/GECKO sites observe in B V R I, which Pan-STARRS1, SDSS, SkyMapper and APASS (R, I) do not
list. Each catalogue kind names its transformation in config/refcat_columns.yaml (``transform``);
the coefficients are the published ones, kept here with their source:

- ``lupton2005``: R. Lupton (2005), SDSS DR4 "Transformations between SDSS magnitudes and other
  systems" (sdss.org, the Lupton 2005 equations fitted to Stetson's standards), for SDSS-like
  g r i (SDSS, APASS g'r'i', SkyMapper):
  B = g + 0.3130 (g-r) + 0.2271 (rms 0.0107);  V = g - 0.5784 (g-r) - 0.0038 (0.0054);
  R = r - 0.2936 (r-i) - 0.1439 (0.0072);      I = r - 1.2444 (r-i) - 0.3820 (0.0078).
- ``tonry2012``: Tonry et al. (2012, ApJ 750, 99), table 6, quadratic in (g-r)_P1, for PS1:
  B = g + 0.212 + 0.556 x + 0.034 x^2 (0.032);  V = r + 0.005 + 0.462 x + 0.013 x^2 (0.012);
  R = r - 0.137 - 0.108 x - 0.029 x^2 (0.015);  I = i - 0.366 - 0.136 x - 0.018 x^2 (0.017).

Both give Vega magnitudes; the AB magnitude adds Blanton & Roweis (2007, AJ 133, 734, table 1)
m_AB - m_Vega: B -0.09, V +0.02, R +0.21, I +0.45 (refcat.VEGA_TO_AB). The colour range over which
a star is used is this pipeline's choice, not the papers': the stellar locus from A to early M
stars, where the fits were made and stay linear (M dwarfs bend away); stars outside it are left out
of the zero point. It is recorded in the frame header with the transformation (ZPTRANS, ZPCOLOR,
ZPCOLMIN, ZPCOLMAX).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ..errors import ConfigError
from .refcat import VEGA_TO_AB


@dataclass(frozen=True)
class Transform:
    """``band`` (Vega) = mag_``base`` + a0 + a1 x + a2 x^2, x = mag_``blue`` - mag_``red``."""

    name: str
    band: str
    base: str
    blue: str
    red: str
    a0: float
    a1: float
    a2: float
    rms: float
    colour_range: tuple[float, float]

    @property
    def colour(self) -> str:
        return f"{self.blue}-{self.red}"

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.base, self.blue, self.red)))

    def formula(self) -> str:
        terms = f"{self.base}{self.a0:+.4g}{self.a1:+.4g}({self.colour})"
        if self.a2:
            terms += f"{self.a2:+.4g}({self.colour})^2"
        return f"{self.band}={terms}"

    def vega(self, base, blue, red) -> np.ndarray:
        x = np.asarray(blue, float) - np.asarray(red, float)
        return np.asarray(base, float) + self.a0 + self.a1 * x + self.a2 * x * x

    def ab(self, base, blue, red) -> np.ndarray:
        return self.vega(base, blue, red) + VEGA_TO_AB[self.band]

    def in_range(self, blue, red) -> np.ndarray:
        x = np.asarray(blue, float) - np.asarray(red, float)
        return np.isfinite(x) & (x >= self.colour_range[0]) & (x <= self.colour_range[1])

    def header_cards(self) -> dict[str, tuple]:
        return {
            "ZPTRANS": (f"{self.name} {self.formula()}"[:68], "reference band from catalogue (Vega, then AB)"),
            "ZPCOLOR": (self.colour, "colour of the transformation"),
            "ZPCOLMIN": (self.colour_range[0], "bluest colour used in the zero point"),
            "ZPCOLMAX": (self.colour_range[1], "reddest colour used in the zero point"),
            "ZPTRMS": (self.rms, "[mag] published rms of the transformation"),
            "ZPVEGAAB": (VEGA_TO_AB[self.band], "[mag] m_AB - m_Vega added (Blanton & Roweis 2007)"),
        }


# colour ranges: A to early-M stars (see the module docstring)
_GR = (-0.2, 1.4)
_RI = (-0.2, 1.0)

TRANSFORMS: dict[str, dict[str, Transform]] = {
    "lupton2005": {
        "B": Transform("Lupton2005", "B", "g", "g", "r", 0.2271, 0.3130, 0.0, 0.0107, _GR),
        "V": Transform("Lupton2005", "V", "g", "g", "r", -0.0038, -0.5784, 0.0, 0.0054, _GR),
        "R": Transform("Lupton2005", "R", "r", "r", "i", -0.1439, -0.2936, 0.0, 0.0072, _RI),
        "I": Transform("Lupton2005", "I", "r", "r", "i", -0.3820, -1.2444, 0.0, 0.0078, _RI),
    },
    "tonry2012": {
        "B": Transform("Tonry2012", "B", "g", "g", "r", 0.212, 0.556, 0.034, 0.032, _GR),
        "V": Transform("Tonry2012", "V", "r", "g", "r", 0.005, 0.462, 0.013, 0.012, _GR),
        "R": Transform("Tonry2012", "R", "r", "g", "r", -0.137, -0.108, -0.029, 0.015, _GR),
        "I": Transform("Tonry2012", "I", "i", "g", "r", -0.366, -0.136, -0.018, 0.017, _GR),
    },
}


def transform_for(name: str | None, band: str) -> Transform | None:
    """The transformation ``name`` (a catalogue kind's ``transform``) gives for ``band``, or None."""
    if not name:
        return None
    if name not in TRANSFORMS:
        raise ConfigError(f"refcat_columns.yaml: unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
    return TRANSFORMS[name].get(band)


def derive_band(reference: Table, t: Transform) -> Table:
    """A copy of ``reference`` with ``mag_<band>``/``magerr_<band>`` (AB) through ``t``: NaN for a
    star outside the colour range or without the bands it needs, so the zero point leaves it out.
    The error adds the catalogue errors of the terms (correlations ignored) and the published rms."""
    missing = [b for b in t.needs if f"mag_{b}" not in reference.colnames]
    if missing:
        raise ValueError(f"transformation {t.name} for {t.band} needs {', '.join(missing)}")
    m = {b: np.asarray(reference[f"mag_{b}"], float) for b in t.needs}
    e = {b: np.asarray(reference[f"magerr_{b}"], float) if f"magerr_{b}" in reference.colnames
         else np.full(len(reference), np.nan) for b in t.needs}
    mag = t.ab(m[t.base], m[t.blue], m[t.red])
    keep = t.in_range(m[t.blue], m[t.red])
    err = np.sqrt(sum(np.nan_to_num(e[b]) ** 2 for b in t.needs) + t.rms ** 2)
    out = reference.copy()
    out[f"mag_{t.band}"] = np.where(keep, mag, np.nan)
    out[f"magerr_{t.band}"] = np.where(keep, err, np.nan)
    out.meta["TRANSFORM"] = t.name
    return out
