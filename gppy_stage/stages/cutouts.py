"""Cut-outs of a stack's calibrated frames, and of the field's reference on a cut-out's grid.

The detect stage measures small boxes of each single frame of a stack minus the reference twice
over: per-frame centroids of faint movers (``stages.detect.centroid_movers``) and forced light
curves (``stages.forced``). ``StackFrames`` serves both from one opening: each calibrated frame
(its image, VARIANCE and MASK, and the photometry stage's WCS and zero point in its header) and
the reference are opened once, on first use, memory-mapped, and stay open until the detect
stage's block ends, so on S3 each is downloaded once. A box reads only its own pages, and a
consumer done with a frame lets its pages go (``StackFrames.frame``), so what stays resident does
not grow with the number of frames.

``frame_cut`` reads a box of a frame; ``reference_cut`` resamples the reference onto a box's grid
(SWarp, through ``stages.reference.reference_on_grid``), cutting the reference around the box
first, so neither ever reads a whole frame.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from typing import Iterator, NamedTuple

import numpy as np
from astropy.io import fits

from .. import storage
from ..errors import BadInputError
from ..fitsio import image_hdu_index
from ..science import forced
from ..science.wcsutil import wcs_of
from .base import Night
from .reference import find_reference, reference_on_grid, reference_zero_point

REF_MARGIN = 16       # px of reference beyond the cut-out's footprint, for SWarp's interpolation kernel


@contextlib.contextmanager
def open_image(url: str) -> Iterator[tuple[fits.HDUList, int]]:
    """(HDU list, index of its image) of a FITS file, memory-mapped: a cut-out reads only its box."""
    with storage.local_copy(url) as path:
        try:
            hdul = fits.open(path, memmap=True)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot read FITS ({exc})", path=url) from exc
        with hdul:
            yield hdul, image_hdu_index(hdul)


@contextlib.contextmanager
def primary_images(urls: dict[str, str]) -> Iterator[dict[str, tuple]]:
    """{name: (memory-mapped data, header)} of each file's primary HDU, which must be a 2-D image
    (the stack's products: stack, difference, noise, mask, reference on the stack's grid)."""
    with contextlib.ExitStack() as files:
        out = {}
        for name, url in urls.items():
            path = files.enter_context(storage.local_copy(url))
            try:
                hdul = files.enter_context(fits.open(path, memmap=True))
                out[name] = (hdul[0].data, hdul[0].header)
            except (OSError, ValueError) as exc:
                raise BadInputError(f"cannot read FITS ({exc})", path=url) from exc
            if out[name][0] is None or out[name][0].ndim != 2:
                raise BadInputError("no 2-D image in the primary HDU", path=url)
        yield out


def frame_cut(hdul: fits.HDUList, idx: int, box) -> tuple[np.ndarray, np.ndarray, np.ndarray, fits.Header]:
    """(image, variance, mask, header on the box's grid) of ``box`` = (y0, y1, x0, x1) of a
    calibrated frame; no MASK extension means nothing masked."""
    y0, y1, x0, x1 = box
    names = [h.name for h in hdul]
    data = np.asarray(hdul[idx].data[y0:y1, x0:x1], np.float32)
    var = np.asarray(hdul["VARIANCE"].data[y0:y1, x0:x1], np.float32)
    mask = np.asarray(hdul["MASK"].data[y0:y1, x0:x1]) != 0 if "MASK" in names else np.zeros(data.shape, bool)
    return data, var, mask, forced.shifted_header(hdul[idx].header, x0, y0, data.shape)


def reference_cut(ref_data, ref_header, grid_header, shape, scale):
    """The reference on a cut-out's grid, times ``scale`` (``reference_on_grid``'s result): cut
    around the cut-out's footprint first, so SWarp and the reference's variance see a few hundred
    pixels, not the whole reference."""
    ny, nx = shape
    corners = wcs_of(grid_header).pixel_to_world_values(np.array([0, nx - 1, 0, nx - 1, nx / 2]),
                                                     np.array([0, 0, ny - 1, ny - 1, ny / 2]))
    rx, ry = wcs_of(ref_header).world_to_pixel_values(*corners)
    rny, rnx = ref_data.shape
    y0, y1 = max(0, int(np.floor(ry.min())) - REF_MARGIN), min(rny, int(np.ceil(ry.max())) + REF_MARGIN + 1)
    x0, x1 = max(0, int(np.floor(rx.min())) - REF_MARGIN), min(rnx, int(np.ceil(rx.max())) + REF_MARGIN + 1)
    if y1 - y0 < 16 or x1 - x0 < 16:
        raise BadInputError("the reference does not cover the cut-out")
    cut = np.asarray(ref_data[y0:y1, x0:x1], np.float32)
    return reference_on_grid(cut, forced.shifted_header(ref_header, x0, y0, cut.shape), grid_header, shape, scale)


def seeing_px(header, pixscale: float) -> float | None:
    """FWHM in px on the frame's grid from SEEING (arcsec, as the photometry stage writes it) or
    FWHM (arcsec, as the simulator's references carry it); None without either."""
    value = next((header[k] for k in ("SEEING", "FWHM") if header.get(k) not in (None, "")), None)
    try:
        return float(value) / pixscale if value is not None and float(value) > 0 else None
    except (TypeError, ValueError):
        return None


class Reference(NamedTuple):
    data: np.ndarray      # memory-mapped
    header: fits.Header
    zp: float | None      # reference_zero_point's value; None without one


class StackFrames:
    """The calibrated frames and the reference of one stack, each opened once on first use and
    kept open while the ``stack_frames`` block lasts (see the module's docstring)."""

    def __init__(self, ctx: Night, entry: dict, files: contextlib.ExitStack):
        self._ctx, self._entry, self._files = ctx, entry, files
        self._frames = {f["id"]: f for f in ctx.plan()["frames"]}
        self._open: dict[str, tuple[fits.HDUList, int]] = {}
        self._ref: Reference | None = None
        self._ref_key: str | None = None
        self._ref_found = False

    def plan_frame(self, fid: str) -> dict | None:
        """The plan's entry of frame ``fid``, or None when the plan has none."""
        return self._frames.get(fid)

    def frame_url(self, fid: str) -> str | None:
        """The URL of frame ``fid``'s calibrated product, or None when the plan or storage has none."""
        fr = self._frames.get(fid)
        if fr is None or not storage.exists(self._ctx.url(fr["output"])):
            return None
        return self._ctx.url(fr["output"])

    @contextlib.contextmanager
    def frame(self, fid: str) -> Iterator[tuple[fits.HDUList, int]]:
        """(HDU list, image index) of frame ``fid`` (check ``frame_url`` first); on leaving, the
        pages its cut-outs read are let go: they read back from the file if cut again."""
        if fid not in self._open:
            self._open[fid] = self._files.enter_context(open_image(self.frame_url(fid)))
        try:
            yield self._open[fid]
        finally:
            release_pages(self._open[fid][0][self._open[fid][1]].data)

    def reference(self) -> Reference | None:
        """The field's reference frame in this stack's filter, or None when storage has none."""
        if not self._ref_found:
            self._ref_key = find_reference(self._ctx.root, self._entry["field"], self._entry["filter"])
            self._ref_found = True
        if self._ref_key is not None and self._ref is None:
            hdul, idx = self._files.enter_context(open_image(self._ctx.url(self._ref_key)))
            self._ref = Reference(hdul[idx].data, hdul[idx].header, reference_zero_point(hdul[idx].header))
        return self._ref

    def release_reference(self) -> None:
        """Let the reference's resident pages go, once a consumer has cut all it needs."""
        if self._ref is not None:
            release_pages(self._ref.data)


@contextlib.contextmanager
def stack_frames(ctx: Night, entry: dict) -> Iterator[StackFrames]:
    """A ``StackFrames`` of stack ``entry``; every file it opened is closed on leaving."""
    with contextlib.ExitStack() as files:
        yield StackFrames(ctx, entry, files)


def release_pages(a) -> None:
    """Let go the resident pages of the read-only memory-mapped file ``a`` lies in (nothing
    when it is not one, or not on Linux). Safe only because nothing writes to these files'
    arrays: a page changed in memory would be lost."""
    while a is not None and not isinstance(a, mmap.mmap):
        a = getattr(a, "base", None)
    if a is None or a.closed or not sys.platform.startswith("linux") or not hasattr(a, "madvise"):
        return
    with contextlib.suppress(OSError, ValueError):  # advice only: refused, it costs memory, not data
        a.madvise(mmap.MADV_DONTNEED)
