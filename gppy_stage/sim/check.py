"""How a pipeline run did on a simulated night: the true transient against the candidates found."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _sep_arcsec(ra1, dec1, ra2, dec2) -> float:
    d = math.radians
    cos = (math.sin(d(dec1)) * math.sin(d(dec2)) + math.cos(d(dec1)) * math.cos(d(dec2)) * math.cos(d(ra1 - ra2)))
    return math.degrees(math.acos(min(1.0, max(-1.0, cos)))) * 3600.0


def match_transient(transient: dict, candidates: list[dict], radius_arcsec: float = 1.0) -> list[dict]:
    """Per filter: the candidate nearest the true transient within the radius (or None), with the
    separation and the magnitude difference. Pure: truth and candidates in, rows out."""
    rows = []
    for filt, true_mag in sorted(transient["mag"].items()):
        best = None
        for c in candidates:
            if c.get("filter") != filt or c.get("ra") is None:
                continue
            sep = _sep_arcsec(transient["ra"], transient["dec"], c["ra"], c["dec"])
            if sep <= radius_arcsec and (best is None or sep < best[0]):
                best = (sep, c)
        rows.append({"filter": filt, "true_mag": true_mag, "found": best is not None,
                     "sep_arcsec": best[0] if best else None, "candidate": best[1] if best else None,
                     "dmag": (best[1]["mag"] - true_mag) if best and best[1].get("mag") is not None else None})
    return rows


def check_night(root: str | Path, unit: str, night: str) -> tuple[dict, list[dict]]:
    """Read the simulator's truth and the night report of a local root."""
    root = Path(root)
    truth = json.loads((root / "truth" / unit / night / "transients.json").read_text())
    report = json.loads((root / "runs" / unit / night / "night_report.json").read_text())
    return truth["transient"], match_transient(truth["transient"], report.get("candidates", []))
