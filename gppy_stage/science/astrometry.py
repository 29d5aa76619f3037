"""Astrometry of one reduced frame: first WCS from the pointing, SExtractor pre-catalogue, SCAMP
against the local reference, solve-field as the fallback, an independent quality check, and the
solution merged into the header with MissFITS.

Pure functions on arrays, Tables and Headers; the stage module does the reading and writing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from ..errors import BadInputError, ToolError
from ..headers import pointing  # noqa: F401  (the frame's pointing: one reader, in headers)
from ..tools import astromatic, astrometrynet
from . import refcat as refcat_mod
from .wcsutil import wcs_of

# the WCS cards a new solution replaces (anything left from an older one would corrupt it)
_WCS_KEY_PREFIXES = ("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "PC1_", "PC2_", "CDELT", "CUNIT", "PV1_", "PV2_",
                     "A_", "B_", "AP_", "BP_", "CROTA", "LONPOLE", "LATPOLE", "WCSAXES", "RADESYS", "EQUINOX",
                     "IMAGEW", "IMAGEH")
_WCS_KEYS_EXACT = ("A_ORDER", "B_ORDER", "AP_ORDER", "BP_ORDER", "WCSNAME", "MJDREF")


class AstrometryError(BadInputError):
    """The frame cannot be solved (no pointing and no blind solution, too few stars...)."""


@dataclass
class Solution:
    """A solved WCS (header cards only) and how it was obtained."""

    wcs_header: fits.Header
    method: str  # 'SCAMP', 'ASTROMETRY.NET' (SIP) or 'ASTROMETRY.NET+SCAMP'
    nmatch: int
    rms1_arcsec: float
    rms2_arcsec: float
    median_offset_arcsec: float
    n_detected: int
    notes: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    @property
    def wcs(self) -> WCS:
        return wcs_of(self.wcs_header)

    def summary(self) -> dict:
        return {"method": self.method, "nmatch": self.nmatch, "rms_arcsec": [self.rms1_arcsec, self.rms2_arcsec],
                "median_offset_arcsec": self.median_offset_arcsec, "n_detected": self.n_detected, "notes": self.notes}


# ----------------------------------------------------------------------------- pointing

def initial_wcs(shape: tuple[int, int], center: SkyCoord, pixscale: float, *, rotation_deg: float = 0.0) -> fits.Header:
    """A TAN WCS at the pointing with the nominal scale, north up and east left (7DT frames)."""
    ny, nx = shape
    s = pixscale / 3600.0
    c, sn = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["CRVAL1"], h["CRVAL2"] = float(center.ra.deg), float(center.dec.deg)
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2.0, (ny + 1) / 2.0
    h["CD1_1"], h["CD1_2"] = -s * c, s * sn
    h["CD2_1"], h["CD2_2"] = s * sn, s * c
    h["EQUINOX"], h["RADESYS"] = 2000.0, "ICRS"
    return h


def strip_wcs(header: fits.Header) -> fits.Header:
    out = header.copy()
    for key in list(out.keys()):
        if key in _WCS_KEYS_EXACT or any(key.startswith(p) for p in _WCS_KEY_PREFIXES):
            del out[key]
    return out


def weight_and_flag(mask: np.ndarray | None, variance: np.ndarray | None, shape) -> tuple[np.ndarray | None, np.ndarray]:
    """SExtractor's MAP_WEIGHT (1/variance, 0 where masked) and flag image from MASK/VARIANCE."""
    flag = np.zeros(shape, np.int32) if mask is None else mask.astype(np.int32)
    if variance is None:
        return None, flag
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where((variance > 0) & np.isfinite(variance), 1.0 / variance, 0.0)
    weight[flag != 0] = 0.0
    return weight.astype(np.float32), flag


# ----------------------------------------------------------------------------- detection

def detect(data, header, *, mask=None, variance=None, gain: float, saturation: float, pixscale: float,
           seeing_arcsec: float = 2.5, options: dict | None = None) -> Table:
    """The SExtractor pre-catalogue SCAMP and solve-field work from (XWIN/YWIN and errors)."""
    weight, flag = weight_and_flag(mask, variance, data.shape)
    opts = {"DETECT_THRESH": 5.0, "ANALYSIS_THRESH": 5.0, "DETECT_MINAREA": 5, "GAIN": gain,
            "SATUR_LEVEL": saturation, "PIXEL_SCALE": pixscale, "SEEING_FWHM": seeing_arcsec}
    opts.update(options or {})
    return astromatic.sextractor(data, strip_wcs(header), weight=weight, flag=flag,
                                 params="sextractor/astrometry.param", options=opts)


def _usable(cat: Table) -> Table:
    good = (cat["FLAGS"] < 4) & (cat["FLUX_AUTO"] > 0)
    if "IMAFLAGS_ISO" in cat.colnames:
        good &= cat["IMAFLAGS_ISO"] == 0
    return cat[good]


# ----------------------------------------------------------------------------- quality

def quality(cat: Table, wcs: WCS, reference: Table, *, radius_arcsec: float = 2.0) -> dict:
    """Independent check of a solution: detections through ``wcs`` matched to the reference."""
    cat = _usable(cat)
    if len(cat) == 0 or len(reference) == 0:
        return {"nmatch": 0, "median_offset_arcsec": np.inf, "rms1_arcsec": np.inf, "rms2_arcsec": np.inf}
    ra, dec = wcs.all_pix2world(np.asarray(cat["XWIN_IMAGE"]), np.asarray(cat["YWIN_IMAGE"]), 1)
    det = SkyCoord(ra * u.deg, dec * u.deg)
    ref = SkyCoord(np.asarray(reference["ra"]) * u.deg, np.asarray(reference["dec"]) * u.deg)
    idx, sep, _ = det.match_to_catalog_sky(ref)
    ok = sep.arcsec < radius_arcsec
    if ok.sum() == 0:
        return {"nmatch": 0, "median_offset_arcsec": np.inf, "rms1_arcsec": np.inf, "rms2_arcsec": np.inf}
    dra, ddec = det[ok].spherical_offsets_to(ref[idx[ok]])
    return {
        "nmatch": int(ok.sum()),
        "median_offset_arcsec": float(np.median(sep.arcsec[ok])),
        "rms1_arcsec": float(np.sqrt(np.mean(dra.arcsec**2))),
        "rms2_arcsec": float(np.sqrt(np.mean(ddec.arcsec**2))),
    }


# ----------------------------------------------------------------------------- solvers

def solve_scamp(cat: Table, header: fits.Header, first_wcs: fits.Header, reference: Table, shape: tuple[int, int], *,
                band: str | None = None, position_maxerr_arcmin: float = 5.0, options: dict | None = None):
    """SCAMP on one frame's pre-catalogue; (solved WCS header, SCAMP statistics)."""
    cat = _usable(cat)
    if len(cat) < 6:
        raise AstrometryError(f"too few usable stars for SCAMP ({len(cat)})")
    img = strip_wcs(header)
    img.update(first_wcs)
    img["NAXIS1"], img["NAXIS2"] = int(shape[1]), int(shape[0])
    # SCAMP groups fields by ASTRINSTRU_KEY (FILTER); one field alone needs a modest distortion degree
    degree = 1 if len(cat) < 30 else 2 if len(cat) < 150 else 3
    opts = {"POSITION_MAXERR": position_maxerr_arcmin, "DISTORT_DEGREES": degree,
            "MATCH_NMAX": min(len(cat), 2000)}
    opts.update(options or {})
    result = astromatic.scamp([(cat, img)], refcat_mod.scamp_reference(reference, band), options=opts)
    head = result.headers[0]
    wcs_head = fits.Header()
    for card in head.cards:
        if card.keyword in ("COMMENT", "HISTORY", ""):
            continue
        wcs_head.append(card, end=True)
    if not any(k.startswith("PV1_") for k in wcs_head.keys()):
        # a linear solution comes without PV cards, and TPV without them is a zero polynomial
        wcs_head["CTYPE1"], wcs_head["CTYPE2"] = "RA---TAN", "DEC--TAN"
    return wcs_head, result.stats(0), result.meta


def solve_blind(cat: Table, shape: tuple[int, int], pixscale: float, *, center: SkyCoord | None = None,
                radius_deg: float | None = None, cpulimit: float = 30.0, scale_tolerance: float = 0.1,
                index_dir: str = astrometrynet.DEFAULT_INDEX_DIR) -> fits.Header:
    """solve-field on the pre-catalogue, scale hint from the registry +- ``scale_tolerance``."""
    cat = _usable(cat)
    if len(cat) < 5:
        raise AstrometryError(f"too few usable stars for a blind solve ({len(cat)})")
    ny, nx = shape
    kwargs = {}
    if center is not None:
        kwargs = {"ra": float(center.ra.deg), "dec": float(center.dec.deg),
                  "radius_deg": radius_deg or max(nx, ny) * pixscale / 3600.0}
    return astrometrynet.solve_field(
        cat, nx, ny, scale_low=pixscale * (1 - scale_tolerance), scale_high=pixscale * (1 + scale_tolerance),
        cpulimit=cpulimit, index_dir=index_dir, x_col="XWIN_IMAGE", y_col="YWIN_IMAGE", **kwargs)


def solve(
    data: np.ndarray,
    header: fits.Header,
    reference: Table | None,
    *,
    pixscale: float,
    gain: float,
    saturation: float,
    mask: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    band: str | None = None,
    position_maxerr_arcmin: float = 5.0,
    max_offset_arcsec: float = 1.0,
    min_match: int = 6,
    allow_blind: bool = True,
    cpulimit: float = 30.0,
    scamp_options: dict | None = None,
) -> Solution:
    """Solve one frame: SCAMP from the pointing against ``reference`` (already at the observation
    epoch), else solve-field. Raises AstrometryError with the reason when nothing works."""
    shape = data.shape
    cat = detect(data, header, mask=mask, variance=variance, gain=gain, saturation=saturation, pixscale=pixscale)
    n_det = len(_usable(cat))
    notes: list[str] = []
    prov = {"SEXVER": cat.meta.get("SEXVER"), "SEXCONF": cat.meta.get("SEXCONF")}
    scamp = {"band": band, "scamp_options": scamp_options, "min_match": min_match,
             "max_offset_arcsec": max_offset_arcsec}
    center = pointing(header)
    if center is None:
        notes.append("no usable pointing in the header")
    has_reference = reference is not None and len(reference)
    if center is not None and has_reference:
        first = initial_wcs(shape, center, pixscale)
        sol = _scamp_from_pointing(cat, header, first, reference, shape, n_det, notes, prov,
                                   position_maxerr_arcmin=position_maxerr_arcmin, **scamp)
        if sol is not None:
            return sol
    elif not has_reference:
        notes.append("no reference catalogue for SCAMP")
    if not allow_blind:
        raise AstrometryError("; ".join(notes) or "not solved")
    try:
        wcs_head = solve_blind(cat, shape, pixscale, center=center, radius_deg=2.0 if center is not None else None,
                               cpulimit=cpulimit)
    except (ToolError, AstrometryError) as exc:
        notes.append(f"solve-field failed: {exc.reason}")
        raise AstrometryError("; ".join(notes)) from None
    prov["ANVER"] = wcs_head.get("ANVER")
    if has_reference:
        sol = _refine_blind(cat, header, wcs_head, reference, shape, n_det, notes, prov, **scamp)
        if sol is not None:
            return sol
    nmatch_an = int(wcs_head.get("ANMATCH", 0))
    return Solution(wcs_head, "ASTROMETRY.NET", nmatch_an, np.nan, np.nan, np.nan, n_det, notes, prov)


def _acceptable(q: dict, min_match: int, max_offset_arcsec: float) -> bool:
    return q["nmatch"] >= min_match and q["median_offset_arcsec"] < max_offset_arcsec


def _scamp_from_pointing(cat: Table, header: fits.Header, first: fits.Header, reference: Table,
                         shape: tuple[int, int], n_det: int, notes: list[str], prov: dict, *,
                         position_maxerr_arcmin: float, band: str | None, scamp_options: dict | None,
                         min_match: int, max_offset_arcsec: float) -> Solution | None:
    """SCAMP from the guess at the header's pointing; None, with a note why, when it is not good enough."""
    try:
        wcs_head, stats, meta = solve_scamp(cat, header, first, reference, shape, band=band,
                                            position_maxerr_arcmin=position_maxerr_arcmin, options=scamp_options)
        prov.update(meta)
        q = quality(cat, wcs_of(wcs_head), reference)
        if _acceptable(q, min_match, max_offset_arcsec):
            return Solution(wcs_head, "SCAMP", int(stats["nmatch"]) or q["nmatch"],
                            stats["rms1_arcsec"], stats["rms2_arcsec"], q["median_offset_arcsec"], n_det, notes,
                            prov)
        notes.append(f"SCAMP solution rejected: {q['nmatch']} matches, median offset "
                     f"{q['median_offset_arcsec']:.2f}\"")
    except (ToolError, AstrometryError) as exc:
        notes.append(f"SCAMP failed: {exc.reason}")
    return None


def _refine_blind(cat: Table, header: fits.Header, wcs_head: fits.Header, reference: Table,
                  shape: tuple[int, int], n_det: int, notes: list[str], prov: dict, *, band: str | None,
                  scamp_options: dict | None, min_match: int, max_offset_arcsec: float) -> Solution | None:
    """solve-field's solution refined by SCAMP, else checked as it is against the reference; None
    when too few reference stars match it to measure its quality."""
    # solve-field's SIP distortion is not read by SWarp: refine with SCAMP from its linear part,
    # so that every stored solution is TPV and stacks resample correctly
    try:
        first = _linear_part(wcs_head)
        refined, stats, meta = solve_scamp(cat, header, first, reference, shape, band=band,
                                           position_maxerr_arcmin=1.0, options=scamp_options)
        q = quality(cat, wcs_of(refined), reference)
        if _acceptable(q, min_match, max_offset_arcsec):
            prov.update(meta)
            return Solution(refined, "ASTROMETRY.NET+SCAMP", int(stats["nmatch"]) or q["nmatch"],
                            stats["rms1_arcsec"], stats["rms2_arcsec"], q["median_offset_arcsec"], n_det,
                            notes, prov)
        notes.append(f"SCAMP refinement rejected: {q['nmatch']} matches")
    except (ToolError, AstrometryError) as exc:
        notes.append(f"SCAMP refinement failed: {exc.reason}")
    q = quality(cat, wcs_of(wcs_head), reference)
    if q["nmatch"] >= min_match:
        return Solution(wcs_head, "ASTROMETRY.NET", q["nmatch"], q["rms1_arcsec"], q["rms2_arcsec"],
                        q["median_offset_arcsec"], n_det, notes, prov)
    return None


def _linear_part(wcs_head: fits.Header) -> fits.Header:
    """The TAN part of a TAN-SIP solution, as a first guess for SCAMP."""
    w = wcs_of(wcs_head).deepcopy()
    w.sip = None
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    return w.to_header()


# ----------------------------------------------------------------------------- header

def apply_solution(header: fits.Header, solution: Solution, *, use_missfits: bool = True) -> fits.Header:
    """The frame header with the solution merged in (MissFITS) and the quality keys recorded."""
    head = fits.Header()
    for card in solution.wcs_header.cards:
        if card.keyword in ("ANMATCH", "ANVER"):
            continue
        head.append(card, end=True)
    head["ASTROMTD"] = (solution.method, "astrometric solver")
    head["NMATCH"] = (int(solution.nmatch), "stars matched to the astrometric reference")
    head["ASTRRMS1"] = (_finite(solution.rms1_arcsec), "[arcsec] astrometric RMS vs reference, axis 1")
    head["ASTRRMS2"] = (_finite(solution.rms2_arcsec), "[arcsec] astrometric RMS vs reference, axis 2")
    head["ASTMEDOF"] = (_finite(solution.median_offset_arcsec), "[arcsec] median offset to reference (check)")
    for key, value in solution.provenance.items():
        if value is not None and len(key) <= 8:
            head[key] = value
    base = strip_wcs(header)
    if use_missfits:
        return astromatic.missfits(base, head)
    base.update(head)
    return base


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else -1.0


def offset_from_truth(wcs: WCS, true_wcs: WCS, shape: tuple[int, int], n: int = 20) -> np.ndarray:
    """Separations (arcsec) between two WCSs over a grid on the frame."""
    ny, nx = shape
    yy, xx = np.meshgrid(np.linspace(0, ny - 1, n), np.linspace(0, nx - 1, n), indexing="ij")
    a = SkyCoord(*wcs.all_pix2world(xx.ravel(), yy.ravel(), 0), unit="deg")
    b = SkyCoord(*true_wcs.all_pix2world(xx.ravel(), yy.ravel(), 0), unit="deg")
    return a.separation(b).arcsec


def observation_time(header: fits.Header) -> Time | None:
    if header.get("MJD") not in (None, ""):
        try:
            return Time(float(header["MJD"]), format="mjd")
        except (TypeError, ValueError):
            pass
    if header.get("DATE-OBS"):
        try:
            return Time(header["DATE-OBS"])
        except ValueError:
            return None
    return None
