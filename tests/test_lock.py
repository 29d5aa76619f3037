"""The image installs from hashed lock files (`pip install --require-hashes`): a dependency added to
pyproject.toml but not to the locks fails the image build at `pip check`, minutes in. Caught here
in a second instead: every runtime dependency (and the cluster and gpu extras) is pinned in the locks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pinned(lock: Path) -> set[str]:
    return {m.group(1).lower().replace("_", "-")
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==", lock.read_text(), flags=re.M)}


@pytest.mark.parametrize("lock, extras", [("requirements.lock", ("cluster",)),
                                          ("requirements-gpu.lock", ("cluster", "gpu"))])
def test_every_dependency_is_in_the_image_lock(lock, extras):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        wanted |= {_name(r) for r in project["optional-dependencies"][extra]}
    missing = sorted(wanted - _pinned(REPO / "images" / lock))
    assert not missing, f"images/{lock} lacks {missing}: run images/lock.sh and commit its output"
