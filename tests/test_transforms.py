"""Johnson-Cousins from g r i: the published coefficients, Vega->AB, the colour range."""

import numpy as np
import pytest
from astropy.table import Table

from gppy_stage.errors import ConfigError
from gppy_stage.science import refcat, transforms as T

# (g, r, i) of three stars and, by hand from the papers' equations, their Vega B V R I
STARS = [(15.0, 14.5, 14.3), (16.2, 15.1, 14.6), (13.4, 13.3, 13.28)]
LUPTON = {  # sdss.org Lupton (2005): B,V from g-r; R,I from r-i
    "B": [15.0 + 0.3130 * 0.5 + 0.2271, 16.2 + 0.3130 * 1.1 + 0.2271, 13.4 + 0.3130 * 0.1 + 0.2271],
    "V": [15.0 - 0.5784 * 0.5 - 0.0038, 16.2 - 0.5784 * 1.1 - 0.0038, 13.4 - 0.5784 * 0.1 - 0.0038],
    "R": [14.5 - 0.2936 * 0.2 - 0.1439, 15.1 - 0.2936 * 0.5 - 0.1439, 13.3 - 0.2936 * 0.02 - 0.1439],
    "I": [14.5 - 1.2444 * 0.2 - 0.3820, 15.1 - 1.2444 * 0.5 - 0.3820, 13.3 - 1.2444 * 0.02 - 0.3820],
}
TONRY = {  # Tonry et al. 2012 table 6, A0 + A1 x + A2 x^2 with x = (g-r)_P1
    "B": [15.0 + 0.212 + 0.556 * 0.5 + 0.034 * 0.25, 16.2 + 0.212 + 0.556 * 1.1 + 0.034 * 1.21,
          13.4 + 0.212 + 0.556 * 0.1 + 0.034 * 0.01],
    "V": [14.5 + 0.005 + 0.462 * 0.5 + 0.013 * 0.25, 15.1 + 0.005 + 0.462 * 1.1 + 0.013 * 1.21,
          13.3 + 0.005 + 0.462 * 0.1 + 0.013 * 0.01],
    "R": [14.5 - 0.137 - 0.108 * 0.5 - 0.029 * 0.25, 15.1 - 0.137 - 0.108 * 1.1 - 0.029 * 1.21,
          13.3 - 0.137 - 0.108 * 0.1 - 0.029 * 0.01],
    "I": [14.3 - 0.366 - 0.136 * 0.5 - 0.018 * 0.25, 14.6 - 0.366 - 0.136 * 1.1 - 0.018 * 1.21,
          13.28 - 0.366 - 0.136 * 0.1 - 0.018 * 0.01],
}
AB = {"B": -0.09, "V": 0.02, "R": 0.21, "I": 0.45}  # Blanton & Roweis 2007, table 1


def _ref(kind="sdss"):
    g, r, i = (np.array(c) for c in zip(*STARS))
    t = Table({"ra": [1.0, 2.0, 3.0], "dec": [0.0, 0.0, 0.0], "mag_g": g, "mag_r": r, "mag_i": i,
               "magerr_g": [0.01] * 3, "magerr_r": [0.02] * 3, "magerr_i": [0.01] * 3})
    t.meta["TRANSFORM"] = {"sdss": "lupton2005", "ps1": "tonry2012"}[kind]
    return t


@pytest.mark.parametrize("name,published", [("lupton2005", LUPTON), ("tonry2012", TONRY)])
def test_transformations_reproduce_the_published_equations_in_ab(name, published):
    ref = _ref("sdss" if name == "lupton2005" else "ps1")
    for band, vega in published.items():
        t = T.transform_for(name, band)
        out = T.derive_band(ref, t)
        np.testing.assert_allclose(out[f"mag_{band}"], np.array(vega) + AB[band], atol=1e-9)
        cards = t.header_cards()
        assert cards["ZPTRANS"][0].startswith(t.name) and cards["ZPVEGAAB"][0] == AB[band]
        assert cards["ZPCOLMIN"][0] < cards["ZPCOLMAX"][0]


def test_the_two_transformations_agree_on_a_solar_type_star():
    # the Sun: (g-r)_SDSS = 0.44 and B-V = 0.65 (Vega)
    lup = {b: T.transform_for("lupton2005", b) for b in "BV"}
    bv = lup["B"].vega(15.0, 15.0, 14.56) - lup["V"].vega(15.0, 15.0, 14.56)
    assert abs(bv - 0.65) < 0.05
    # the same star in PS1 (Tonry 2012 table 6: g_P1 - g_SDSS = -0.012 - 0.139 (g-r), r nearly the
    # same): two independent papers must give the same B and V to a few hundredths
    g1, r1 = 15.0 - 0.012 - 0.139 * 0.44, 14.556
    for band in "BV":
        ton = T.transform_for("tonry2012", band)
        base = g1 if ton.base == "g" else r1
        assert abs(ton.vega(base, g1, r1) - lup[band].vega(15.0, 15.0, 14.56)) < 0.03


def test_stars_outside_the_colour_range_are_left_out_and_errors_grow():
    ref = _ref()
    ref["mag_g"][2] = ref["mag_r"][2] + 1.8  # an M dwarf, redder than the range
    out = T.derive_band(ref, T.transform_for("lupton2005", "B"))
    assert np.isfinite(out["mag_B"][:2]).all() and np.isnan(out["mag_B"][2])
    assert np.isnan(out["magerr_B"][2])
    # catalogue errors of g and r (0.01, 0.02; g counted once) and the published rms
    assert out["magerr_B"][0] == pytest.approx(np.sqrt(0.01**2 + 0.02**2 + 0.0107**2))


def test_catalogue_kinds_name_their_transformation_and_unknown_ones_are_config_errors():
    ps1 = refcat.standardize(Table({"raMean": [1.0], "decMean": [2.0], "gMeanPSFMag": [16.0]}), "ps1")
    assert ps1.meta["TRANSFORM"] == "tonry2012"
    assert refcat.standardize(Table({"RAJ2000": [1.0], "DEJ2000": [2.0]}), "apass").meta["TRANSFORM"] == "lupton2005"
    assert T.transform_for("lupton2005", "g") is None and T.transform_for("", "B") is None
    with pytest.raises(ConfigError, match="unknown transform"):
        T.transform_for("jordi2099", "B")
    with pytest.raises(ValueError, match="needs i"):
        T.derive_band(Table({"mag_g": [1.0], "mag_r": [1.0]}), T.transform_for("lupton2005", "R"))
