#!/bin/sh
# Build the pipeline images with podman (or buildah), from nothing but Debian's mirror and PyPI.
#
#   images/build.sh cpu            gppy-stage:<version>          (FROM debian bookworm)
#   images/build.sh gpu            gppy-stage:<version>-cuda12   (FROM nvidia/cuda, needs its registry)
#   images/build.sh base           only the local bookworm base (debootstrap + podman import)
#
# Settings (environment):
#   BASE            base image for cpu; default: a local debootstrap of bookworm (no registry needed)
#   WITH_HOTPANTS   1 to compile HOTPANTS from upstream (needs GitHub); default 0
#   INDEX_PACKAGES  astrometry.net index packages; default the Containerfile's
#   CACHE_DIR       where the debootstrap tarball is kept (default /var/tmp/gppy-image-cache)
#   TAG             image name (default gppy-stage:<version>)
#   BUILD_CA_BUNDLE CA bundle pip trusts during the build (default $PIP_CERT or $SSL_CERT_FILE)
#   BASE_DIGEST     sha256:<64 hex>: use exactly that image of BASE (a tag alone can be moved)
#
# Python packages come from images/requirements*.lock, every file hash-checked (images/lock.sh
# regenerates them after a change to pyproject.toml's dependencies).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
what=${1:-cpu}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/pyproject.toml" | head -1)
cache=${CACHE_DIR:-/var/tmp/gppy-image-cache}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# chroot isolation and runc: what works inside an unprivileged CI container (no nested namespaces)
# a CA bundle for pip behind a TLS-inspecting proxy: the host's, when it names one (empty otherwise)
ca=${BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-}}}
if [ -z "$ca" ] || [ ! -s "$ca" ]; then ca=$(mktemp); trap 'rm -f "$ca"' EXIT; fi
digest=${BASE_DIGEST:-}
if [ -n "$digest" ] && ! printf '%s' "$digest" | grep -Eq '^sha256:[0-9a-f]{64}$'; then
    echo "BASE_DIGEST must be sha256:<64 lowercase hex>, got '$digest'" >&2; exit 2
fi
build() { podman build --isolation chroot --ignorefile "$here/containerignore" --secret id=ca,src="$ca" \
    --build-arg BASE_DIGEST="$digest" "$@"; }

base() {
    # keyed by date: a day's builds share one base, and tomorrow's picks up security updates
    tarball="$cache/bookworm-minbase-$(date +%Y%m%d).tar"
    image="localhost/gppy-base:bookworm-$(date +%Y%m%d)"
    if ! podman image exists "$image"; then
        if [ ! -s "$tarball" ]; then
            mkdir -p "$cache"
            root=$(mktemp -d "$cache/rootfs.XXXXXX")
            debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
            # apt inside the build must not try to drop privileges to _apt (no setgroups in chroot builds)
            echo 'APT::Sandbox::User "root";' > "$root/etc/apt/apt.conf.d/99-no-sandbox"
            rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
            tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
            rm -rf "$root"
        fi
        podman import "$tarball" "$image" >&2
    fi
    echo "$image"
}

case "$what" in
    base) base ;;
    cpu)
        b=${BASE:-$(base)}
        build -f "$here/Containerfile" --build-arg BASE="$b" \
            --build-arg WITH_HOTPANTS="${WITH_HOTPANTS:-0}" \
            ${INDEX_PACKAGES+--build-arg INDEX_PACKAGES="$INDEX_PACKAGES"} \
            -t "${TAG:-gppy-stage:$version}" "$repo" ;;
    gpu)
        build -f "$here/Containerfile" \
            --build-arg BASE="${BASE:-docker.io/nvidia/cuda:12.6.3-runtime-ubuntu24.04}" \
            --build-arg EXTRAS=cluster,gpu --build-arg LOCK=requirements-gpu.lock \
            --build-arg WITH_HOTPANTS="${WITH_HOTPANTS:-1}" \
            ${INDEX_PACKAGES+--build-arg INDEX_PACKAGES="$INDEX_PACKAGES"} \
            -t "${TAG:-gppy-stage:$version-cuda12}" "$repo" ;;
    *) echo "usage: $0 cpu|gpu|base" >&2; exit 2 ;;
esac
