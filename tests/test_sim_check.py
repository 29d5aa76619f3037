"""`gppy sim check`: matching the simulated transient with the candidates of a run."""

from gppy_stage.sim.check import match_transient

TRANSIENT = {"ra": 11.4245655, "dec": -25.4464508, "mag": {"m425": 17.62, "m475": 17.59}}


def test_nearest_candidate_within_the_radius_per_filter():
    cands = [
        {"filter": "m425", "ra": 11.4245655 + 0.5 / 3600 / 0.9, "dec": -25.4464508, "mag": 17.58, "id": 1},
        {"filter": "m425", "ra": 11.4245655, "dec": -25.4464508 + 0.1 / 3600, "mag": 17.60, "id": 2},
        {"filter": "m475", "ra": 11.4245655, "dec": -25.4464508 + 3.0 / 3600, "mag": 17.5, "id": 3},
    ]
    rows = {r["filter"]: r for r in match_transient(TRANSIENT, cands)}
    assert rows["m425"]["found"] and rows["m425"]["candidate"]["id"] == 2
    assert abs(rows["m425"]["sep_arcsec"] - 0.1) < 1e-3 and abs(rows["m425"]["dmag"] + 0.02) < 1e-9
    assert not rows["m475"]["found"]  # 3" away is another source
