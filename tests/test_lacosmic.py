"""L.A.Cosmic on the array namespace against astroscrappy (the independent C implementation) and
against the simulator's cosmic rays, on a seeded frame with stars, a masked column and CR tracks."""

from __future__ import annotations

import astroscrappy
import numpy as np
import pytest

from gppy_stage.science.lacosmic import detect_cosmics
from gppy_stage.sim import detector, model, render

GAIN, RDNOISE = 0.78, 5.0
KW = dict(gain=GAIN, readnoise=RDNOISE, satlevel=60000 * GAIN, sigclip=4.5, sigfrac=0.3, objlim=5.0, niter=4)


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(3)
    shape = (512, 640)
    img = np.full(shape, 800.0, np.float32)
    n = 150
    render.render_stars(img, rng.uniform(0, shape[1], n), rng.uniform(0, shape[0], n), 10 ** rng.uniform(3, 6.5, n),
                        3.5, 2.5)
    detector.add_noise_adu(img, GAIN, RDNOISE, rng)
    idx, val, _ = detector.cosmic_rays(shape, 600.0, rng, rate=3 * model.CR_RATE)
    img.reshape(-1)[idx] += val / GAIN
    img = np.minimum(img, 60000).astype(np.float32)  # the brightest stars saturate
    mask = np.zeros(shape, bool)
    mask[200, 100:140] = True
    truth = np.zeros(shape, bool)
    truth.reshape(-1)[idx] = True
    return img, mask, truth


@pytest.fixture(scope="module")
def found(frame):
    img, mask, _ = frame
    return detect_cosmics(img, mask, **KW)


def test_agrees_with_astroscrappy(frame, found):
    img, mask, _ = frame
    ref, ref_clean = astroscrappy.detect_cosmics(img, inmask=mask, sepmed=True, cleantype="meanmask",
                                                 fsmode="median", **KW)
    ours, clean = found
    assert ref.sum() > 500
    both = (ref & ours).sum()
    assert both / ref.sum() >= 0.95 and both / ours.sum() >= 0.95, (ref.sum(), ours.sum(), both)
    # cleaned the same way (5x5 masked mean), up to float rounding
    np.testing.assert_allclose(clean, ref_clean, atol=0.05)
    assert not ours[mask].any()  # masked pixels are never cosmic rays


def test_finds_the_simulated_cosmic_rays(frame, found):
    img, mask, truth = frame
    ours, clean = found
    assert (ours & truth).sum() / truth.sum() > 0.9
    # cleaned pixels are back at the sky, not at the hit's value
    hit = truth & ours & (img > 2000)
    assert hit.sum() > 50 and np.median(clean[hit]) < 1200
