"""Photometry of one astrometrically solved frame, as gpPy/gppy-gpu do it.

1. SExtractor first pass with many apertures: the growth curve of bright unsaturated stars, the
   aperture of best signal-to-noise, the seeing (median FWHM of those stars) and a Moffat fit of
   the growth curve that gives each aperture's correction to total flux.
2. SExtractor second pass with the 7DT apertures: AUTO; APER = seeing x 2 x 0.673; APER_1 =
   seeing x 2; APER_2 = seeing x 3; APER_3 = 3"; APER_4 = 5"; APER_5 = 10". IMSNG/GECKO frames get
   gpPy's set instead (``scheme="gppy"``): APER = the S/N-optimal aperture of the growth curve;
   APER_1 = seeing x 1.3462; APER_2 = seeing x 2; APER_3 = seeing x 3; APER_4 = 3"; APER_5 = 5"
   (SilverRon/gppy, phot/gregoryphot_mp_2021.py: ``aperlist``), and gpPy's header keys beside ours.
3. Zero point per aperture (7DT recipe): stars matched within 1" to the reference, reference mag
   12-17.5 with error < 0.05, FLAGS == 0; 2-sigma-clipped median of (ref - inst); its error from
   the NMAD / sqrt(N). ``ZP_<AP>`` includes the aperture loss (so calibrated aperture magnitudes
   of point sources are total magnitudes); ``APC_<AP>`` is that loss from the growth curve, so
   the zero point of total flux is ZP_<AP> + APC_<AP>.

Pure functions on arrays, Tables and Headers; the growth curve is :mod:`growth`, the header cards
and the catalogue written are :mod:`phot_products`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.stats import sigma_clip, sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS

from ..errors import BadInputError
from ..tools import astromatic
from . import phot_products as products
from . import plots
from .wcsutil import wcs_of
from . import transforms
from .astrometry import weight_and_flag
from .growth import GrowthCurve, growth_curve, growth_diameters
from .phot_products import ALL_APERTURES, APERTURES

NMAD = 1.4826
# the median of N normal values scatters 1.2533 times more than their mean
MEDIAN_EFFICIENCY = 1.2533


class PhotometryError(BadInputError):
    """The frame cannot be calibrated (no WCS, too few stars, no reference...)."""


# ----------------------------------------------------------------------------- apertures

SCHEMES = ("7dt", "gppy")


def aperture_diameters(seeing_arcsec: float, pixscale: float, scheme: str = "7dt",
                       best_px: float | None = None) -> dict[str, float]:
    """The apertures (diameters in pixels) for a seeing (arcsec): 7DT's, or gpPy's (IMSNG/GECKO),
    whose first is the S/N-optimal diameter ``best_px`` of the growth curve."""
    s = seeing_arcsec
    if scheme == "gppy":
        if best_px is None:
            raise ValueError("gpPy's aperture set needs the S/N-optimal diameter (best_px)")
        # gpPy's 1.3462 is 2 x 0.6731: the Gaussian S/N-optimal diameter in units of the FWHM
        arcsec = {"APER": best_px * pixscale, "APER_1": s * 1.3462, "APER_2": s * 2, "APER_3": s * 3,
                  "APER_4": 3.0, "APER_5": 5.0}
    elif scheme == "7dt":
        arcsec = {"APER": s * 2 * 0.673, "APER_1": s * 2, "APER_2": s * 3, "APER_3": 3.0, "APER_4": 5.0,
                  "APER_5": 10.0}
    else:
        raise ValueError(f"unknown aperture scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return {k: v / pixscale for k, v in arcsec.items()}


def reference_band(reference: Table, band: str) -> tuple[Table, transforms.Transform | None]:
    """The reference with ``mag_<band>``: as the catalogue gives it, else through the catalogue's
    transformation (B V R I from g r i); the transformation used, or None."""
    if f"mag_{band}" in reference.colnames:
        return reference, None
    t = transforms.transform_for(reference.meta.get("TRANSFORM"), band)
    have = [c[4:] for c in reference.colnames if c.startswith("mag_")]
    if t is None or any(b not in have for b in t.needs):
        raise PhotometryError(f"reference catalogue has no magnitudes in {band} (has: {', '.join(have)}"
                              + (f"; {t.name} needs {', '.join(t.needs)})" if t else ")"))
    return transforms.derive_band(reference, t), t


# ----------------------------------------------------------------------------- sky and stars

def sky_stats(data: np.ndarray, mask: np.ndarray | None = None, step: int = 2) -> tuple[float, float]:
    """Sigma-clipped median and standard deviation of the sky (ADU) on a sub-sampled grid."""
    sub = data[::step, ::step]
    good = np.isfinite(sub)
    if mask is not None:
        good &= mask[::step, ::step] == 0
    _, med, std = sigma_clipped_stats(sub[good], sigma=3.0, maxiters=10)
    return float(med), float(std)


def select_stars(cat: Table, *, saturation: float, sky: float = 0.0, min_snr: float = 30.0) -> np.ndarray:
    """Bright, isolated, unsaturated point sources (a boolean mask over ``cat``)."""
    flux = np.asarray(cat["FLUX_AUTO"], float)
    err = np.asarray(cat["FLUXERR_AUTO"], float)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(err > 0, flux / err, 0)
    ok = (np.asarray(cat["FLAGS"]) == 0) & (snr > min_snr) & (np.asarray(cat["FWHM_IMAGE"]) > 0.5)
    if "IMAFLAGS_ISO" in cat.colnames:
        ok &= np.asarray(cat["IMAFLAGS_ISO"]) == 0
    ok &= np.asarray(cat["FLUX_MAX"], float) + sky < 0.8 * saturation
    ok &= np.asarray(cat["ELONGATION"], float) < 1.5
    if ok.sum() >= 5:
        # galaxies and blends sit above the stellar FWHM locus
        fw = np.asarray(cat["FWHM_IMAGE"], float)
        clipped = sigma_clip(fw[ok], sigma=2.5, maxiters=5)
        keep = np.zeros(len(cat), bool)
        keep[np.flatnonzero(ok)[~clipped.mask]] = True
        ok = keep
    return ok


# ----------------------------------------------------------------------------- zero points

@dataclass
class ZeroPoint:
    aperture: str
    zp: float
    ezp: float
    n: int  # stars kept after clipping
    ref_mag: np.ndarray  # the candidate stars (for the plot)
    delta: np.ndarray  # ref - inst
    delta_err: np.ndarray
    kept: np.ndarray  # bool over the candidates

    def summary(self) -> dict:
        return {"zp": self.zp, "ezp": self.ezp, "n": self.n}


def zero_point(ref_mag, ref_err, inst_mag, inst_err, good, *, aperture: str = "", mag_range=(12.0, 17.5),
               max_ref_err: float = 0.05, sigma: float = 2.0, min_stars: int = 3) -> ZeroPoint:
    """7DT zero point: 2-sigma-clipped median of ref - inst over the selected stars.

    ``good`` marks stars with FLAGS == 0 (and a clean flag image). The error is the median's:
    1.2533 x NMAD / sqrt(N), over the clipped set.
    """
    ref_mag = np.asarray(ref_mag, float)
    ref_err = np.asarray(ref_err, float)
    inst_mag = np.asarray(inst_mag, float)
    inst_err = np.asarray(inst_err, float)
    sel = (np.asarray(good, bool) & np.isfinite(ref_mag) & np.isfinite(inst_mag) & (inst_mag < 90)
           & (ref_mag >= mag_range[0]) & (ref_mag <= mag_range[1]))
    sel &= ~(ref_err >= max_ref_err)  # a NaN error (unknown) is not a reason to drop a star
    delta = ref_mag[sel] - inst_mag[sel]
    derr = np.hypot(np.nan_to_num(ref_err[sel]), inst_err[sel])
    if sel.sum() < min_stars:
        raise PhotometryError(f"too few reference stars for a zero point in {aperture or 'aperture'} "
                              f"({int(sel.sum())} < {min_stars})")
    clipped = sigma_clip(delta, sigma=sigma, maxiters=10, cenfunc="median", stdfunc="mad_std")
    kept = ~np.ma.getmaskarray(clipped)
    zp = float(np.median(delta[kept]))
    nmad = NMAD * float(np.median(np.abs(delta[kept] - zp)))
    n = int(kept.sum())
    # a floor from the stars' own errors keeps a lucky tiny NMAD from claiming too much
    scatter = max(nmad, float(np.median(derr[kept])) if n else 0.0)
    ezp = MEDIAN_EFFICIENCY * scatter / np.sqrt(max(n, 1))
    return ZeroPoint(aperture, zp, float(ezp), n, ref_mag[sel], delta, derr, kept)


def depth(zp: float, skysig: float, diameter_px: float, nsigma: float = 5.0) -> float:
    """Limiting magnitude (``nsigma``) of a point source in a circular aperture on the sky noise."""
    area = np.pi * (diameter_px / 2.0) ** 2
    return float(zp - 2.5 * np.log10(nsigma * skysig * np.sqrt(area)))


def match(cat_ra, cat_dec, ref: Table, radius_arcsec: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(index into ref, matched?) for each catalogue source."""
    det = SkyCoord(np.asarray(cat_ra) * u.deg, np.asarray(cat_dec) * u.deg)
    cat = SkyCoord(np.asarray(ref["ra"]) * u.deg, np.asarray(ref["dec"]) * u.deg)
    idx, sep, _ = det.match_to_catalog_sky(cat)
    return idx, sep.arcsec < radius_arcsec


# ----------------------------------------------------------------------------- the frame

@dataclass
class PhotResult:
    catalog: Table  # the *.phot.cat table
    header: fits.Header  # cards to put into the frame header
    zeropoints: dict[str, ZeroPoint]
    growth: GrowthCurve
    seeing_arcsec: float
    diameters_px: dict[str, float]
    band: str
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "seeing_arcsec": self.seeing_arcsec,
            "seeing_sextractor_arcsec": self.extra.get("seeing_sextractor_arcsec"),
            "zp": {k: round(z.zp, 4) for k, z in self.zeropoints.items()},
            "ezp": {k: round(z.ezp, 4) for k, z in self.zeropoints.items()},
            "apcor": {k: round(v, 4) for k, v in self.extra.get("apcor", {}).items()},
            "ul5": {k: round(v, 3) for k, v in self.extra.get("ul5", {}).items()},
            "nstar": {k: z.n for k, z in self.zeropoints.items()},
        }


def _sex_options(gain, saturation, pixscale, seeing_arcsec, diameters):
    return {"DETECT_THRESH": 1.5, "ANALYSIS_THRESH": 1.5, "DETECT_MINAREA": 5, "GAIN": gain,
            "SATUR_LEVEL": saturation, "PIXEL_SCALE": pixscale, "SEEING_FWHM": seeing_arcsec,
            "PHOT_APERTURES": [float(d) for d in diameters], "MAG_ZEROPOINT": 0.0}


def photometry(
    data: np.ndarray,
    header: fits.Header,
    reference: Table | None,
    band: str,
    *,
    pixscale: float,
    gain: float,
    saturation: float,
    mask: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    match_radius_arcsec: float = 1.0,
    mag_range: tuple[float, float] = (12.0, 17.5),
    max_ref_err: float = 0.05,
    scheme: str = "7dt",
) -> PhotResult:
    """Two SExtractor passes, zero points per aperture, depths and the calibrated catalogue.

    ``reference`` is in the one shape of :mod:`refcat`, already at the observation epoch; a band
    it lacks (B V R I) comes through its transformation (:func:`reference_band`). ``scheme``:
    the aperture set, ``7dt`` or ``gppy`` (IMSNG/GECKO sites).
    Raises PhotometryError (a BadInputError) with the reason when the frame cannot be calibrated.
    """
    wcs = _celestial_wcs(header)
    if reference is None or len(reference) == 0:
        raise PhotometryError("no reference catalogue")
    reference, trans = reference_band(reference, band)
    weight, flag = weight_and_flag(mask, variance, data.shape)
    sky, skysig = sky_stats(data, mask)
    sex = {"header": header, "weight": weight, "flag": flag, "gain": gain, "saturation": saturation,
           "pixscale": pixscale}
    growth, seeing, seeing_se, ellip = _seeing(data, sex, sky)
    apers = aperture_diameters(seeing, pixscale, scheme, best_px=growth.best_diameter)
    cat = _sextractor(data, sex, "sextractor/photometry.param", seeing, list(apers.values()))
    if len(cat) == 0:
        raise PhotometryError("no sources detected")
    ra, dec = wcs.all_pix2world(np.asarray(cat["XWIN_IMAGE"], float), np.asarray(cat["YWIN_IMAGE"], float), 1)
    ref_mag, ref_err, good = _matched_reference(cat, ra, dec, reference, band, match_radius_arcsec)
    zps = {ap: zero_point(ref_mag, ref_err, *_instrumental(cat, ap), good, aperture=ap, mag_range=mag_range,
                          max_ref_err=max_ref_err) for ap in ALL_APERTURES}
    ul5 = _depths(cat, good, zps, skysig, apers)
    apcor = {ap: growth.correction(apers[ap]) for ap in APERTURES}
    out = products.calibrated_catalog(cat, zps, band, ra, dec)
    out["REF_MAG"] = ref_mag
    hdr = products.seeing_cards(seeing, seeing_se, pixscale, growth, ellip, sky, skysig)
    hdr["REFCAT"] = (str(reference.meta.get("REFCAT", "unknown"))[:60], "photometric reference catalogue")
    hdr["NSTARZP"] = (int(zps["APER_1"].n), "stars in the APER_1 zero point")
    hdr["BESTAPER"] = (round(growth.best_diameter * pixscale, 3), "[arcsec] diameter of best S/N (growth curve)")
    hdr["NGROWTH"] = (growth.nstars, "stars in the growth curve")
    products.zero_point_cards(hdr, zps, ul5, apers, apcor, pixscale)
    for key, value in cat.meta.items():
        hdr[key] = value
    if trans is not None:
        for key, card in trans.header_cards().items():
            hdr[key] = card
    if scheme == "gppy":
        hdr.update(products.gppy_cards(zps, ul5, apers, seeing, pixscale, cat, good, mag_range))
    extra = {"apcor": apcor, "ul5": ul5, "skyval": sky, "skysig": skysig, "ellip": ellip,
             "seeing_moffat_arcsec": growth.fwhm * pixscale, "seeing_sextractor_arcsec": seeing_se}
    return PhotResult(out, hdr, zps, growth, seeing, apers, band, extra)


def _celestial_wcs(header: fits.Header) -> WCS:
    wcs = wcs_of(header)
    if not wcs.has_celestial:
        raise PhotometryError("frame has no WCS: run astrometry first")
    return wcs


def _sextractor(data, sex: dict, params: str, seeing_arcsec: float, diameters) -> Table:
    return astromatic.sextractor(data, sex["header"], weight=sex["weight"], flag=sex["flag"], params=params,
                                 options=_sex_options(sex["gain"], sex["saturation"], sex["pixscale"],
                                                      seeing_arcsec, diameters))


def _seeing(data, sex: dict, sky: float) -> tuple[GrowthCurve, float, float, float]:
    """The first pass: (growth curve, seeing, SExtractor's seeing, ellipticity) of the bright
    unsaturated stars, seeing in arcsec."""
    pixscale = sex["pixscale"]
    diam = growth_diameters(pixscale)
    cat1 = _sextractor(data, sex, "sextractor/growth.param", 2.5, diam)
    stars = select_stars(cat1, saturation=sex["saturation"], sky=sky)
    if stars.sum() < 5:
        raise PhotometryError(f"too few bright unsaturated stars for the seeing ({int(stars.sum())} < 5)")
    fwhm_px = float(np.median(np.asarray(cat1["FWHM_IMAGE"], float)[stars]))
    growth = growth_curve(cat1, stars, diam, fwhm_px)
    # SExtractor's FWHM_IMAGE reads ~5-10 % high on Moffat stars; the growth-curve fit is
    # unbiased where it converged, so it is the seeing unless the two disagree wildly
    seeing_se = fwhm_px * pixscale
    seeing = growth.fwhm * pixscale if 0.75 < growth.fwhm / fwhm_px < 1.25 else seeing_se
    ellip = float(np.median(np.asarray(cat1["ELLIPTICITY"], float)[stars]))
    return growth, seeing, seeing_se, ellip


def _matched_reference(cat: Table, ra, dec, reference: Table, band: str, radius_arcsec: float):
    """(reference mag, its error, usable for the zero point?) per source; NaN where unmatched."""
    idx, matched = match(ra, dec, reference, radius_arcsec)
    ref_mag = np.where(matched, np.asarray(reference[f"mag_{band}"], float)[idx], np.nan)
    ecol = f"magerr_{band}"
    ref_err = np.where(matched, np.asarray(reference[ecol], float)[idx] if ecol in reference.colnames else np.nan, np.nan)
    good = (np.asarray(cat["FLAGS"]) == 0) & matched
    if "IMAFLAGS_ISO" in cat.colnames:
        good &= np.asarray(cat["IMAFLAGS_ISO"]) == 0
    return ref_mag, ref_err, good


def _instrumental(cat: Table, ap: str):
    """(mag, error) of one aperture (or AUTO) of the second pass."""
    if ap == "AUTO":
        return cat["MAG_AUTO"], cat["MAGERR_AUTO"]
    k = APERTURES.index(ap)
    return np.asarray(cat["MAG_APER"])[:, k], np.asarray(cat["MAGERR_APER"])[:, k]


def _depths(cat: Table, good, zps: dict[str, ZeroPoint], skysig: float, apers: dict[str, float]) -> dict[str, float]:
    # AUTO's area from the stars' Kron ellipses, for its depth
    kron_area = np.pi * np.asarray(cat["A_IMAGE"]) * np.asarray(cat["B_IMAGE"]) * np.asarray(cat["KRON_RADIUS"]) ** 2
    auto_d = 2 * np.sqrt(np.nanmedian(kron_area[good]) / np.pi) if good.any() else apers["APER_2"]
    return {ap: depth(zps[ap].zp, skysig, auto_d if ap == "AUTO" else apers[ap]) for ap in ALL_APERTURES}


def zp_plot(result: PhotResult, title: str = "", aperture: str = "APER_1") -> bytes:
    """PNG (bytes) of the zero-point fit: ref - inst against ref mag, clipped stars marked."""
    z = result.zeropoints[aperture]
    fig = plots.figure((7, 4.5), dpi=110)
    ax = fig.subplots()
    ax.errorbar(z.ref_mag[z.kept], z.delta[z.kept], yerr=z.delta_err[z.kept], fmt="o", ms=3, color="tab:blue",
                alpha=0.8, label=f"used ({z.n})")
    if (~z.kept).any():
        ax.plot(z.ref_mag[~z.kept], z.delta[~z.kept], "x", color="tab:red", ms=6,
                label=f"clipped ({int((~z.kept).sum())})")
    ax.axhline(z.zp, color="k", lw=1.2)
    ax.axhspan(z.zp - z.ezp, z.zp + z.ezp, color="k", alpha=0.15)
    lim = 5 * max(NMAD * np.median(np.abs(z.delta[z.kept] - z.zp)), 0.02)
    ax.set_ylim(z.zp - lim, z.zp + lim)
    ax.set_xlabel(f"reference mag ({result.band}, AB)")
    ax.set_ylabel(f"ref - inst ({aperture})")
    ax.set_title(title or f"zero point {aperture}")
    ax.text(0.02, 0.95, f"ZP_{aperture} = {z.zp:.3f} +/- {z.ezp:.3f}\nseeing = {result.seeing_arcsec:.2f}\"  "
            f"APC = {result.extra.get('apcor', {}).get(aperture, float('nan')):.3f}",
            transform=ax.transAxes, va="top", fontsize=10, bbox={"fc": "white", "alpha": 0.8})
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return plots.png(fig)
