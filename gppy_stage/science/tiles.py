"""Tiles of a frame, as HOTPANTS' regions: each solved on its own, stitched without seams.

A tile's ``core`` partitions the frame; its result is used over the core plus ``overlap`` px each
side, with linear weights that sum to one across every border (two tiles' solutions hand over
gradually, no step); its stamps come from a margin beyond that.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` partitions the frame; ``apply`` = core + overlap (where its result is
    used, with weights ``wy``/``wx``); ``fit`` = apply + margin (its stamps); ``cut`` = fit + the
    stamp and kernel reach (the pixels it reads). Boxes are (y0, y1, x0, x1) in frame pixels."""

    core: tuple
    apply: tuple
    fit: tuple
    wy: numpy.ndarray
    wx: numpy.ndarray


def _edges(n: int, tile: int) -> list[int]:
    k = max(1, math.ceil(n / max(int(tile), 1)))
    return [round(i * n / k) for i in range(k + 1)]


def _ramp(a: int, b: int, n: int, o: int):
    """1-D blending weight of core [a, b) over [a - o, b + o): neighbours' ramps sum to one."""
    lo, hi = max(a - o, 0), min(b + o, n)
    x = numpy.arange(lo, hi) + 0.5
    w = numpy.ones(hi - lo)
    if a > 0:
        w = numpy.minimum(w, numpy.clip((x - (a - o)) / (2 * o), 0, 1))
    if b < n:
        w = numpy.minimum(w, numpy.clip((b + o - x) / (2 * o), 0, 1))
    return lo, hi, w.astype(numpy.float32)


def make_tiles(shape, tile: int, overlap: int, margin: int) -> list[Tile]:
    H, W = shape
    ey, ex = _edges(H, tile), _edges(W, tile)
    smallest = min(min(b - a for a, b in zip(e[:-1], e[1:])) for e in (ey, ex))
    o = max(min(int(overlap), (smallest - 1) // 2), 1)  # each tile keeps a plateau of its own
    out = []
    for a, b in zip(ey[:-1], ey[1:]):
        y0, y1, wy = _ramp(a, b, H, o)
        for c, d in zip(ex[:-1], ex[1:]):
            x0, x1, wx = _ramp(c, d, W, o)
            fit = (max(y0 - margin, 0), min(y1 + margin, H), max(x0 - margin, 0), min(x1 + margin, W))
            out.append(Tile(core=(a, b, c, d), apply=(y0, y1, x0, x1), fit=fit, wy=wy, wx=wx))
    return out


def grow(box, r, shape):
    y0, y1, x0, x1 = box
    return max(y0 - r, 0), min(y1 + r, shape[0]), max(x0 - r, 0), min(x1 + r, shape[1])


def local(box, origin):
    return box[0] - origin[0], box[1] - origin[0], box[2] - origin[2], box[3] - origin[2]


def plateau(w):
    """[first, last + 1) of the weights equal to 1 (a ramp's plateau, never empty)."""
    idx = numpy.nonzero(w >= 1.0)[0]
    return int(idx[0]), int(idx[-1]) + 1


class Mosaic:
    """The frame-sized outputs, filled tile by tile: weighted sums in the overlaps, the mask from
    each tile's core (it does not depend on the tile's solution)."""

    def __init__(self, shape, xp):
        self.diff = xp.zeros(shape, dtype=xp.float32)
        self.noise = xp.zeros(shape, dtype=xp.float32)
        self.mask = xp.zeros(shape, dtype=bool)
        self.xp, self.lock = xp, threading.Lock()

    def add(self, tile: Tile, diff, noise, mask):
        y0, y1, x0, x1 = tile.apply
        a, b, c, d = tile.core
        # where both weights are 1 no other tile reaches: copy; blend only the frame around it
        (r0, r1), (q0, q1) = plateau(tile.wy), plateau(tile.wx)
        strips = [(slice(0, r0), slice(None)), (slice(r1, None), slice(None)),
                  (slice(r0, r1), slice(0, q0)), (slice(r0, r1), slice(q1, None))]
        with self.lock:
            self.diff[y0 + r0:y0 + r1, x0 + q0:x0 + q1] = diff[r0:r1, q0:q1]
            self.noise[y0 + r0:y0 + r1, x0 + q0:x0 + q1] = noise[r0:r1, q0:q1]
            for sy, sx in strips:
                w = self.xp.asarray(tile.wy[sy])[:, None] * self.xp.asarray(tile.wx[sx])[None, :]
                out = (slice(y0 + sy.indices(y1 - y0)[0], y0 + sy.indices(y1 - y0)[1]),
                       slice(x0 + sx.indices(x1 - x0)[0], x0 + sx.indices(x1 - x0)[1]))
                self.diff[out] += w * diff[sy, sx]
                self.noise[out] += w * noise[sy, sx]
            self.mask[a:b, c:d] = mask[a - y0:b - y0, c - x0:d - x0]

    def finish(self, hw: int):
        xp = self.xp
        for sl in (numpy.s_[:hw, :], numpy.s_[-hw:, :], numpy.s_[:, :hw], numpy.s_[:, -hw:]):
            self.mask[sl] = True  # edges where the convolution is partial
        self.diff[self.mask] = 0.0
        self.noise[~(self.noise > 0)] = xp.inf
        return self.diff, self.noise, self.mask
