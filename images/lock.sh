#!/bin/sh
# Regenerate the image's lock files (exact versions and every file's sha256) from pyproject.toml:
#
#   images/lock.sh            images/requirements.lock (extras: cluster) and
#                             images/requirements-gpu.lock (extras: cluster,gpu)
#
# Run it with Python 3.11 (Debian bookworm's, the CPU image's): every file of each pinned version
# is hashed, so the CUDA image's Python 3.12 wheels are covered too. Needs pip-tools
# (`pip install pip-tools`) and PyPI; the local pip configuration (mirrors, constraints) is
# ignored so that the hashes are PyPI's. The Containerfile installs with
# `pip install --require-hashes`: a dependency added to pyproject.toml fails the image build until
# this is run again and its output committed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$(dirname "$here")"
compile() {
    out=$1; shift
    env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
        PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="images/lock.sh" \
        pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
        --no-emit-index-url --no-emit-find-links \
        "$@" -o "$out" pyproject.toml images/build-requirements.in
}
compile images/requirements.lock --extra cluster
compile images/requirements-gpu.lock --extra cluster --extra gpu
