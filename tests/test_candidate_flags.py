"""Each candidate flag's rule on its own, on small synthetic cases: one that raises it, one that
does not. The whole detection with these flags is tested in test_detect.py."""

from __future__ import annotations

import numpy as np
import pytest

from gppy_stage.science import candidate_flags as flags
from gppy_stage.science.detect import FLAG_BITS

INF = np.inf


def _gauss(shape, x0, y0, flux, sigma=1.5):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return flux * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


@pytest.mark.parametrize("name", list(FLAG_BITS))
def test_every_flag_has_its_rule_and_names_its_bit(name):
    rule = getattr(flags, name)
    assert rule.__doc__.startswith(f"Bit {FLAG_BITS[name]}:"), rule.__doc__


def test_near_edge():
    x = np.array([3.0, 40.0, 76.0, 40.0, 6.5])
    y = np.array([50.0, 50.0, 50.0, 95.0, 50.0])
    # shape (rows, columns) = (100, 80): the last column is 79, the last row 99
    assert list(flags.near_edge(x, y, (100, 80), 6.0)) == [True, False, True, True, False]


def test_near_mask_looks_in_a_circle_not_a_box():
    bad = np.zeros((100, 100), bool)
    bad[50, 50] = True  # row 50, column 50: (x, y) = (50, 50)
    x = np.array([52.0, 53.0, 54.5, 52.5, 20.0])
    y = np.array([50.0, 50.0, 50.0, 52.5, 20.0])
    # distances 2, 3 (on the circle), 4.5, 3.54 (inside the box, outside the circle), far
    assert list(flags.near_mask(x, y, bad, 3.0)) == [True, True, False, False, False]


def test_dipole_from_an_opposite_detection_or_an_opposite_lobe():
    shape = (40, 40)
    noise = np.ones(shape)
    bad = np.zeros(shape, bool)
    alone = _gauss(shape, 20, 20, 1000.0)
    x, y, pos = np.array([20.0]), np.array([20.0]), np.array([1.0])
    assert not flags.dipole(x, y, pos, [INF], alone, noise, bad, 8.0, 0.35)[0]
    # a detection of the other sign 3 px away: a dipole whatever the pixels say
    assert flags.dipole(x, y, pos, [3.0], alone, noise, bad, 8.0, 0.35)[0]
    assert not flags.dipole(x, y, pos, [9.0], alone, noise, bad, 8.0, 0.35)[0]
    # a negative lobe 4 px away under the threshold: half the flux raises it, a fifth does not
    strong = alone + _gauss(shape, 24, 20, -500.0)
    weak = alone + _gauss(shape, 24, 20, -200.0)
    assert flags.dipole(x, y, pos, [INF], strong, noise, bad, 8.0, 0.35)[0]
    assert not flags.dipole(x, y, pos, [INF], weak, noise, bad, 8.0, 0.35)[0]
    # the same seen from the negative lobe (sign -1): its opposite is twice its own flux
    assert flags.dipole(np.array([24.0]), y, np.array([-1.0]), [INF], strong, noise, bad, 8.0, 0.35)[0]
    # masked pixels do not count: the lobe hidden under the mask no longer raises it
    hidden = bad.copy()
    hidden[15:26, 22:30] = True
    assert not flags.dipole(x, y, pos, [INF], strong, noise, hidden, 8.0, 0.35)[0]


def test_elongated():
    a, b = np.array([3.0, 1.5, 1.0]), np.array([1.0, 1.0, 0.0])
    assert list(flags.elongated(a, b, 2.0)) == [True, False, True]  # b = 0 is kept off zero
    assert flags.elongation(a, b)[0] == 3.0


def test_bad_fwhm():
    cand = np.array([4.0, 1.5, 9.0, np.nan, 2.0, 8.0])
    # PSF FWHM 4, allowed 0.5-2 times it: 2 and 8 are on the limits and pass
    assert list(flags.bad_fwhm(cand, 4.0, (0.5, 2.0))) == [False, True, True, True, False, False]


def test_negative():
    assert list(flags.negative(np.array([1.0, -1.0, 1.0]))) == [False, True, False]


def test_ref_star():
    # distances to the nearest reference star; inf: none within the search radius
    assert list(flags.ref_star(np.array([0.5, 2.5, INF, 2.0]), 2.0)) == [True, False, False, False]


def test_moving_only_for_positive_candidates_on_a_track():
    on_track = np.array([True, True, False])
    sign = np.array([1.0, -1.0, 1.0])
    assert list(flags.moving(on_track, sign)) == [True, False, False]
