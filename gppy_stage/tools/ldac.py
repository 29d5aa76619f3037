"""FITS-LDAC catalogues: the format SExtractor writes and SCAMP reads.

An LDAC file is a primary HDU followed by pairs of binary tables: ``LDAC_IMHEAD`` (one row, one
column ``Field Header Card`` holding the image header as 80-character cards) and ``LDAC_OBJECTS``.
astropy reads and writes both, so no extra dependency is needed.
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits
from astropy.table import Table


def header_hdu(header: fits.Header) -> fits.BinTableHDU:
    """The ``LDAC_IMHEAD`` table of an image header."""
    cards = [str(card).ljust(80)[:80] for card in header.cards] + ["END".ljust(80)]
    # one string, not an array of 80-char strings: astropy pads those with NULs, which SCAMP
    # cannot parse (it segfaults); TDIM is set afterwards for the same reason
    blob = "".join(cards).encode("ascii", "replace")
    col = fits.Column(name="Field Header Card", format=f"{len(blob)}A", array=np.array([blob]))
    hdu = fits.BinTableHDU.from_columns([col])
    hdu.header["TDIM1"] = f"(80, {len(cards)})"
    hdu.header["EXTNAME"] = "LDAC_IMHEAD"
    return hdu


def objects_hdu(table: Table) -> fits.BinTableHDU:
    hdu = fits.table_to_hdu(Table(table, copy=False))
    hdu.header["EXTNAME"] = "LDAC_OBJECTS"
    return hdu


def write_ldac(table: Table, header: fits.Header | None = None) -> bytes:
    """An LDAC file (bytes) of one catalogue and the header of the image it came from."""
    hdus = fits.HDUList([fits.PrimaryHDU(), header_hdu(header if header is not None else fits.Header()),
                         objects_hdu(table)])
    buf = io.BytesIO()
    hdus.writeto(buf)
    raw = bytearray(buf.getvalue())
    # astropy pads a string cell's trailing blanks with NULs; SCAMP then never finds the
    # "END     " card and crashes, so the header cell is re-blanked in place
    start = len(hdus[0].header.tostring()) + len(hdus[1].header.tostring())
    width = hdus[1].header["NAXIS1"]
    raw[start: start + width] = raw[start: start + width].replace(b"\x00", b" ")
    return bytes(raw)


def read_ldac(source, *, with_header: bool = False):
    """The objects table of an LDAC file (path or bytes); with its image header when asked."""
    fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with fits.open(fh) as hdul:
        objects = next((h for h in hdul if h.name == "LDAC_OBJECTS"), None)
        if objects is None:
            raise ValueError("not an LDAC file: no LDAC_OBJECTS table")
        table = Table.read(objects, unit_parse_strict="silent")
        if not with_header:
            return table
        imhead = next((h for h in hdul if h.name == "LDAC_IMHEAD"), None)
        header = fits.Header()
        if imhead is not None:
            cards = imhead.data[0][0]
            if isinstance(cards, (str, bytes)):
                cards = [cards]
            text = "".join((c.decode() if isinstance(c, bytes) else c).ljust(80) for c in cards)
            header = fits.Header.fromstring(text)
        return table, header


def refcat_table(ra, dec, mag, magerr=None, *, pos_err_arcsec: float = 0.05, epoch: float = 2000.0) -> Table:
    """A reference catalogue as SCAMP's ``ASTREF_CATALOG FILE`` wants it (see config/scamp.conf)."""
    ra = np.asarray(ra, float)
    n = len(ra)
    err_deg = np.full(n, pos_err_arcsec / 3600.0)
    mag = np.asarray(mag, float)
    magerr = np.full(n, 0.02) if magerr is None else np.nan_to_num(np.asarray(magerr, float), nan=0.05)
    return Table(
        {
            "X_WORLD": ra,
            "Y_WORLD": np.asarray(dec, float),
            "ERRA_WORLD": err_deg,
            "ERRB_WORLD": err_deg,
            "ERRTHETA_WORLD": np.zeros(n),
            "MAG": np.nan_to_num(mag, nan=99.0),
            "MAGERR": magerr,
            "OBSDATE": np.full(n, float(epoch)),
        }
    )
