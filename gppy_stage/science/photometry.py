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

Pure functions on arrays, Tables and Headers.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.stats import sigma_clip, sigma_clipped_stats
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning
from scipy.optimize import least_squares

from ..errors import BadInputError
from ..tools import astromatic
from . import transforms
from .astrometry import weight_and_flag

# aperture suffixes in catalogue order (SExtractor's FLUX_APER(6) columns 0..5)
APERTURES = ("APER", "APER_1", "APER_2", "APER_3", "APER_4", "APER_5")
ALL_APERTURES = ("AUTO",) + APERTURES
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


def growth_diameters(pixscale: float, n: int = 30) -> np.ndarray:
    """First-pass aperture diameters (pixels): 1 px to 40" (at least 40 px)."""
    dmax = max(40.0 / pixscale, 40.0)
    return np.geomspace(1.0, dmax, n)


def moffat_fraction(radius, alpha: float, beta: float):
    """Fraction of a Moffat profile's flux inside ``radius``."""
    return 1.0 - (1.0 + (np.asarray(radius, float) / alpha) ** 2) ** (1.0 - beta)


def moffat_fwhm(alpha: float, beta: float) -> float:
    return 2.0 * alpha * np.sqrt(2.0 ** (1.0 / beta) - 1.0)


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


@dataclass
class GrowthCurve:
    diameters: np.ndarray  # px
    curve: np.ndarray  # median flux(d) / flux(d_ref)
    snr: np.ndarray  # median S/N at each diameter
    best_diameter: float  # px, the aperture of best S/N
    alpha: float  # Moffat fit (px)
    beta: float
    reference_diameter: float
    nstars: int

    @property
    def fwhm(self) -> float:
        return moffat_fwhm(self.alpha, self.beta)

    def correction(self, diameter: float) -> float:
        """Aperture correction (mag, >= 0) from ``diameter`` to total flux."""
        return float(-2.5 * np.log10(moffat_fraction(diameter / 2.0, self.alpha, self.beta)))


def growth_curve(cat: Table, stars: np.ndarray, diameters: np.ndarray, fwhm_px: float) -> GrowthCurve:
    """Median growth curve of ``stars`` and its Moffat fit (apertures beyond ~6 FWHM are left
    out of the fit: there a small background error outweighs the missing wings)."""
    flux = np.asarray(cat["FLUX_APER"], float)[stars]
    err = np.asarray(cat["FLUXERR_APER"], float)[stars]
    d_ref = diameters[np.argmin(np.abs(diameters - 4.0 * fwhm_px))]
    iref = int(np.argmin(np.abs(diameters - d_ref)))
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = flux / flux[:, iref:iref + 1]
        snr = np.where(err > 0, flux / err, 0)
    curve = np.nanmedian(norm, axis=0)
    snr_med = np.nanmedian(snr, axis=0)
    best = float(diameters[int(np.nanargmax(snr_med))])
    use = (diameters <= 6.0 * fwhm_px) & (diameters >= 0.5 * fwhm_px) & np.isfinite(curve)

    def resid(p):
        alpha, beta = np.exp(p[0]), 1.0 + np.exp(p[1])
        model = moffat_fraction(diameters[use] / 2, alpha, beta) / moffat_fraction(d_ref / 2, alpha, beta)
        return model - curve[use]

    alpha0 = fwhm_px / (2 * np.sqrt(2 ** (1 / 3.0) - 1))
    fit = least_squares(resid, [np.log(alpha0), np.log(2.0)], bounds=([np.log(0.1), np.log(0.05)], [np.log(1e3), np.log(50.0)]))
    alpha, beta = float(np.exp(fit.x[0])), float(1.0 + np.exp(fit.x[1]))
    return GrowthCurve(diameters, curve, snr_med, best, alpha, beta, float(d_ref), int(stars.sum()))


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header)
    if not wcs.has_celestial:
        raise PhotometryError("frame has no WCS: run astrometry first")
    if reference is None or len(reference) == 0:
        raise PhotometryError("no reference catalogue")
    reference, trans = reference_band(reference, band)
    weight, flag = weight_and_flag(mask, variance, data.shape)
    sky, skysig = sky_stats(data, mask)
    # 1. growth curve
    diam = growth_diameters(pixscale)
    cat1 = astromatic.sextractor(data, header, weight=weight, flag=flag, params="sextractor/growth.param",
                                 options=_sex_options(gain, saturation, pixscale, 2.5, diam))
    stars = select_stars(cat1, saturation=saturation, sky=sky)
    if stars.sum() < 5:
        raise PhotometryError(f"too few bright unsaturated stars for the seeing ({int(stars.sum())} < 5)")
    fwhm_px = float(np.median(np.asarray(cat1["FWHM_IMAGE"], float)[stars]))
    growth = growth_curve(cat1, stars, diam, fwhm_px)
    # SExtractor's FWHM_IMAGE reads ~5-10 % high on Moffat stars; the growth-curve fit is
    # unbiased where it converged, so it is the seeing unless the two disagree wildly
    seeing_se = fwhm_px * pixscale
    seeing = growth.fwhm * pixscale if 0.75 < growth.fwhm / fwhm_px < 1.25 else seeing_se
    ellip = float(np.median(np.asarray(cat1["ELLIPTICITY"], float)[stars]))
    # 2. the 7DT apertures
    apers = aperture_diameters(seeing, pixscale, scheme, best_px=growth.best_diameter)
    cat = astromatic.sextractor(data, header, weight=weight, flag=flag, params="sextractor/photometry.param",
                                options=_sex_options(gain, saturation, pixscale, seeing, list(apers.values())))
    if len(cat) == 0:
        raise PhotometryError("no sources detected")
    ra, dec = wcs.all_pix2world(np.asarray(cat["XWIN_IMAGE"], float), np.asarray(cat["YWIN_IMAGE"], float), 1)
    idx, matched = match(ra, dec, reference, match_radius_arcsec)
    ref_mag = np.where(matched, np.asarray(reference[f"mag_{band}"], float)[idx], np.nan)
    ecol = f"magerr_{band}"
    ref_err = np.where(matched, np.asarray(reference[ecol], float)[idx] if ecol in reference.colnames else np.nan, np.nan)
    good = (np.asarray(cat["FLAGS"]) == 0) & matched
    if "IMAFLAGS_ISO" in cat.colnames:
        good &= np.asarray(cat["IMAFLAGS_ISO"]) == 0
    zps: dict[str, ZeroPoint] = {}
    for ap in ALL_APERTURES:
        if ap == "AUTO":
            inst, inst_err = cat["MAG_AUTO"], cat["MAGERR_AUTO"]
        else:
            k = APERTURES.index(ap)
            inst, inst_err = np.asarray(cat["MAG_APER"])[:, k], np.asarray(cat["MAGERR_APER"])[:, k]
        zps[ap] = zero_point(ref_mag, ref_err, inst, inst_err, good, aperture=ap, mag_range=mag_range,
                             max_ref_err=max_ref_err)
    # AUTO's area from the stars' Kron ellipses, for its depth
    kron_area = np.pi * np.asarray(cat["A_IMAGE"]) * np.asarray(cat["B_IMAGE"]) * np.asarray(cat["KRON_RADIUS"]) ** 2
    auto_d = 2 * np.sqrt(np.nanmedian(kron_area[good]) / np.pi) if good.any() else apers["APER_2"]
    ul5 = {ap: depth(zps[ap].zp, skysig, auto_d if ap == "AUTO" else apers[ap]) for ap in ALL_APERTURES}
    apcor = {ap: growth.correction(apers[ap]) for ap in APERTURES}
    out = calibrated_catalog(cat, zps, band, ra, dec)
    out["REF_MAG"] = ref_mag
    hdr = fits.Header()
    hdr["SEEING"] = (round(seeing, 4), "[arcsec] FWHM of bright stars (growth-curve fit)")
    hdr["PEEING"] = (round(seeing / pixscale, 4), "[pixel] FWHM of bright stars")
    hdr["SEEINGSE"] = (round(seeing_se, 4), "[arcsec] median SExtractor FWHM_IMAGE of bright stars")
    hdr["MOFBETA"] = (round(growth.beta, 3), "Moffat beta of the growth-curve fit")
    hdr["ELLIP"] = (round(ellip, 4), "median ellipticity of bright stars")
    hdr["SKYVAL"] = (round(sky, 4), "[ADU] sigma-clipped median sky")
    hdr["SKYSIG"] = (round(skysig, 4), "[ADU] sigma-clipped sky standard deviation")
    hdr["REFCAT"] = (str(reference.meta.get("REFCAT", "unknown"))[:60], "photometric reference catalogue")
    hdr["NSTARZP"] = (int(zps["APER_1"].n), "stars in the APER_1 zero point")
    hdr["BESTAPER"] = (round(growth.best_diameter * pixscale, 3), "[arcsec] diameter of best S/N (growth curve)")
    hdr["NGROWTH"] = (growth.nstars, "stars in the growth curve")
    for ap in ALL_APERTURES:
        _set(hdr, f"ZP_{ap}", round(zps[ap].zp, 5), f"zero point, {ap} (ref - inst, AB)")
        _set(hdr, f"EZP_{ap}", round(zps[ap].ezp, 5), f"zero-point error, {ap}")
        _set(hdr, f"UL5_{ap}", round(ul5[ap], 4), f"5-sigma depth, {ap} (AB)")
        _set(hdr, f"NZP_{ap}", zps[ap].n, f"stars in the zero point, {ap}")
        if ap != "AUTO":
            _set(hdr, f"APER{ap[4:]}", round(apers[ap] * pixscale, 4), f"[arcsec] diameter of {ap}")
            _set(hdr, f"APC_{ap}", round(apcor[ap], 5), f"[mag] aperture correction to total, {ap}")
    # The zero point of the image itself (total flux of a point source), which is what scaling
    # images to one another needs: the seeing-scaled aperture's, corrected to total.
    hdr["ZPTOT"] = (round(zps["APER_1"].zp + apcor["APER_1"], 5), "total-flux zero point (ZP_APER_1 + APC_APER_1)")
    hdr["EZPTOT"] = (round(zps["APER_1"].ezp, 5), "error of ZPTOT")
    for key, value in cat.meta.items():
        hdr[key] = value
    if trans is not None:
        for key, card in trans.header_cards().items():
            hdr[key] = card
    if scheme == "gppy":
        hdr.update(gppy_cards(zps, ul5, apers, seeing, pixscale, cat, good, mag_range))
    extra = {"apcor": apcor, "ul5": ul5, "skyval": sky, "skysig": skysig, "ellip": ellip,
             "seeing_moffat_arcsec": growth.fwhm * pixscale, "seeing_sextractor_arcsec": seeing_se}
    return PhotResult(out, hdr, zps, growth, seeing, apers, band, extra)


def gppy_cards(zps, ul5, apers, seeing, pixscale, cat, good, mag_range) -> fits.Header:
    """gpPy's own keys (SilverRon/gppy phot/gregoryphot_mp_2021.py), so its users' scripts read an
    IMSNG/GECKO frame as before: per aperture k (0 = AUTO, 1 = APER, ... 6 = APER_5) ``ZP_k``,
    ``ZPER_k``, ``UL5_k``, ``STDNUM_k``; the optimal aperture ``APERPIX`` [px] and ``NAPER``
    (= APERPIX / seeing in px); ``ELONG``; the reference magnitude range ``MAGLOW``/``MAGUP``.
    gpPy's ``APER_k`` keys are diameters in pixels; here they stay arcsec, as on 7DT frames."""
    hdr = fits.Header()
    for k, ap in enumerate(ALL_APERTURES):
        hdr[f"ZP_{k}"] = (round(zps[ap].zp, 3), f"zero point for MAG_{ap} (gpPy)")
        hdr[f"ZPER_{k}"] = (round(zps[ap].ezp, 3), f"zero-point error for MAG_{ap} (gpPy)")
        hdr[f"UL5_{k}"] = (round(ul5[ap], 3), f"5 sigma limit mag for MAG_{ap} (gpPy)")
        hdr[f"STDNUM_{k}"] = (zps[ap].n, f"# of std stars for MAG_{ap} (gpPy)")
    hdr["APERPIX"] = (round(apers["APER"], 3), "[pixel] S/N-optimal aperture diameter")
    hdr["NAPER"] = (round(apers["APER"] * pixscale / seeing, 3), "N = APERTURE/PEEING")
    hdr["ELONG"] = (round(float(np.nanmedian(np.asarray(cat["ELONGATION"], float)[good])) if good.any()
                          else float("nan"), 3), "median elongation A/B of reference stars")
    hdr["MAGLOW"] = (mag_range[0], "ref mag range, bright limit")
    hdr["MAGUP"] = (mag_range[1], "ref mag range, faint limit")
    return hdr


def _set(hdr: fits.Header, key: str, value, comment: str) -> None:
    # 7DT's long names (ZP_APER_1, EZP_APER_1...) need HIERARCH; say so to avoid astropy's warning
    hdr[f"HIERARCH {key}" if len(key) > 8 else key] = (value, comment)


def calibrated_catalog(cat: Table, zps: dict[str, ZeroPoint], band: str, ra=None, dec=None) -> Table:
    """The *.phot.cat columns: instrumental and zero-point corrected magnitudes, fluxes in uJy and
    S/N for AUTO and each aperture, plus positions, shapes and flags."""
    out = Table()
    for col in ("NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE"):
        out[col] = cat[col]
    out["ALPHA_J2000"] = np.asarray(ra if ra is not None else cat["ALPHA_J2000"], float)
    out["DELTA_J2000"] = np.asarray(dec if dec is not None else cat["DELTA_J2000"], float)
    for col in ("A_IMAGE", "B_IMAGE", "THETA_IMAGE", "ELONGATION", "ELLIPTICITY", "FWHM_IMAGE", "FWHM_WORLD",
                "FLUX_RADIUS", "CLASS_STAR", "BACKGROUND", "ISOAREA_IMAGE", "FLUX_MAX", "KRON_RADIUS", "FLAGS",
                "FLAGS_WEIGHT", "IMAFLAGS_ISO"):
        if col in cat.colnames:
            out[col] = cat[col]
    if "FWHM_WORLD" in out.colnames:
        out["FWHM_WORLD"] = np.asarray(out["FWHM_WORLD"], float) * 3600.0  # arcsec, as 7DT writes it
    for ap in ALL_APERTURES:
        if ap == "AUTO":
            flux, ferr = np.asarray(cat["FLUX_AUTO"], float), np.asarray(cat["FLUXERR_AUTO"], float)
            mag, merr = np.asarray(cat["MAG_AUTO"], float), np.asarray(cat["MAGERR_AUTO"], float)
        else:
            k = APERTURES.index(ap)
            flux, ferr = np.asarray(cat["FLUX_APER"], float)[:, k], np.asarray(cat["FLUXERR_APER"], float)[:, k]
            mag, merr = np.asarray(cat["MAG_APER"], float)[:, k], np.asarray(cat["MAGERR_APER"], float)[:, k]
        zp = zps[ap]
        bad = ~(flux > 0)
        mag_cal = np.where(bad, np.nan, mag + zp.zp)
        merr_cal = np.where(bad, np.nan, np.hypot(merr, zp.ezp))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(ferr > 0, flux / ferr, 0.0)
        # fluxes in microjansky: AB magnitude 23.9 is 1 uJy
        ujy = np.where(bad, np.nan, 10 ** ((23.9 - mag_cal) / 2.5))
        out[f"FLUX_{ap}"] = flux
        out[f"FLUXERR_{ap}"] = ferr
        out[f"MAG_{ap}"] = np.where(bad, 99.0, mag)
        out[f"MAGERR_{ap}"] = np.where(bad, 99.0, merr)
        out[f"MAG_{ap}_{band}"] = mag_cal
        out[f"MAGERR_{ap}_{band}"] = merr_cal
        out[f"FLUX_{ap}_{band}"] = ujy
        out[f"FLUXERR_{ap}_{band}"] = np.where(snr > 0, ujy / snr, np.nan)
        out[f"SNR_{ap}_{band}"] = snr
    return out


def catalog_bytes(table: Table) -> bytes:
    """The catalogue as text that ``Table.read(path, format="ascii")`` reads back (ECSV)."""
    buf = io.StringIO()
    t = table.copy(copy_data=False)
    t.meta = {}
    t.write(buf, format="ascii.ecsv")
    return buf.getvalue().encode()


def zp_plot(result: PhotResult, title: str = "", aperture: str = "APER_1") -> bytes:
    """PNG (bytes) of the zero-point fit: ref - inst against ref mag, clipped stars marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = result.zeropoints[aperture]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
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
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
