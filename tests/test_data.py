"""The test data that lives in the repository: intact, documented, and only what tests read."""

import hashlib
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SETS = [DATA / "real", DATA / "argo-workflows-crds"]
PAPERS = {"README.md", "SHA256SUMS", "LICENSE"}


def _sums(folder: Path) -> dict[str, str]:
    out = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.lstrip("*")] = digest
    return out


@pytest.mark.parametrize("folder", SETS, ids=lambda p: p.name)
def test_checksums_match(folder):
    sums = _sums(folder)
    data = sorted(p.name for p in folder.iterdir() if p.name not in PAPERS)
    # every file has a checksum and every checksum a file: nothing unrecorded slips in
    assert sorted(sums) == data
    for name, digest in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{folder / name} changed"


@pytest.mark.parametrize("folder", SETS, ids=lambda p: p.name)
def test_provenance_names_every_file(folder):
    readme = (folder / "README.md").read_text()
    for name in _sums(folder):
        assert name in readme, f"{folder / 'README.md'} does not say where {name} comes from"


def test_every_real_frame_is_read_by_a_test():
    # the repository keeps only what a test reads: a frame no test names is dead weight
    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("*.py"))
    unused = [n for n in _sums(DATA / "real") if n not in sources]
    assert unused == []
