"""What the photometry of a frame is written as: the cards of its header (7DT's, and gpPy's for
IMSNG/GECKO frames) and the calibrated ``*.phot.cat`` catalogue.

Pure functions on Tables and Headers; the measurement itself is :mod:`photometry`.
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits
from astropy.table import Table

# aperture suffixes in catalogue order (SExtractor's FLUX_APER(6) columns 0..5)
APERTURES = ("APER", "APER_1", "APER_2", "APER_3", "APER_4", "APER_5")
ALL_APERTURES = ("AUTO",) + APERTURES


def seeing_cards(seeing: float, seeing_se: float, pixscale: float, growth, ellip: float, sky: float,
                 skysig: float) -> fits.Header:
    """The seeing and sky of the frame (arcsec and ADU), from the first pass and its growth curve."""
    hdr = fits.Header()
    hdr["SEEING"] = (round(seeing, 4), "[arcsec] FWHM of bright stars (growth-curve fit)")
    hdr["PEEING"] = (round(seeing / pixscale, 4), "[pixel] FWHM of bright stars")
    hdr["SEEINGSE"] = (round(seeing_se, 4), "[arcsec] median SExtractor FWHM_IMAGE of bright stars")
    hdr["MOFBETA"] = (round(growth.beta, 3), "Moffat beta of the growth-curve fit")
    hdr["ELLIP"] = (round(ellip, 4), "median ellipticity of bright stars")
    hdr["SKYVAL"] = (round(sky, 4), "[ADU] sigma-clipped median sky")
    hdr["SKYSIG"] = (round(skysig, 4), "[ADU] sigma-clipped sky standard deviation")
    return hdr


def zero_point_cards(hdr: fits.Header, zps: dict, ul5: dict[str, float], apers: dict[str, float],
                     apcor: dict[str, float], pixscale: float) -> None:
    """Per aperture its zero point, error, depth, star count, diameter and correction, then the
    frame's total-flux zero point, into ``hdr``."""
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


def calibrated_catalog(cat: Table, zps: dict, band: str, ra=None, dec=None) -> Table:
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
