"""Names and labels of the Workflows the watcher, a backlog and a resubmission create.

The name is fixed by unit and night (and the resubmission's attempt), so the Kubernetes API
itself refuses a second Workflow for the same night: that is what makes submission exactly once.
"""

from __future__ import annotations

import hashlib
import re

from ..names import NightName


def workflow_name(unit: str, night: str, attempt: int = 0) -> str:
    """A DNS-safe name fixed by unit and night: ``gppy-7dt03-2025-01-01-gain2750-3f9a1c``.

    The readable part is lowercased (Kubernetes names must be), so the short hash of the exact
    folder name keeps ``..._ToO`` and ``..._too`` (or ``_ToO_gain`` vs ``_gain_ToO``) apart.
    A resubmission ``attempt`` n > 0 ends in ``-r<n>``: fixed too, so two operators resubmitting
    at once still make one workflow.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", f"{unit}-{night}".lower()).strip("-")
    digest = hashlib.sha256(f"{unit}/{night}".encode()).hexdigest()[:6]
    suffix = f"-r{attempt}" if attempt else ""
    # 63 keeps pod names derived from it within Kubernetes' label-length limits
    return f"gppy-{readable[: 63 - 5 - 7 - len(suffix)]}-{digest}{suffix}".replace("--", "-")


def _label(value: str) -> str:
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63]
    return value.strip("-._")


def night_labels(unit: str, night: NightName, kind: str) -> dict[str, str]:
    return {
        "gppy.io/obs": _label(unit),
        "gppy.io/night": _label(night.folder),
        "gppy.io/submitted-by": kind,
        "gppy.io/too": "true" if night.too else "false",
    }
