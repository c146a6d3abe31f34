#!/usr/bin/env bash
# Builds the Debian layer of a golden image (base.squashfs) and takes the
# kernel from the same package lists. Called by image/build-image.sh, which
# caches the result by a hash of everything in image/debian/ (this script,
# customize.sh, the package lists, apt-preferences, the apt sources,
# SOURCE_DATE_EPOCH) plus the kind and the versions of mmdebstrap and
# mksquashfs: those are exactly what shapes the layer, so rebuilding
# airlock's binaries never rebuilds it.
#
# How: mmdebstrap installs Debian 12 (merged /usr, with mmdebstrap's own
# merged-usr hooks) into a directory, in its own mount
# namespace (--mode=unshare; nothing is mounted on the build host), with
# the .deb files synced in from and out to DEBS so that a rebuild downloads
# nothing new; customize.sh fixes what the build host would leak (hostname,
# resolv.conf) and fetches the kernel package; mksquashfs packs the
# directory with every time stamp set to SOURCE_DATE_EPOCH. Two builds from
# the same package versions give the same bytes.
#
# The Debian mirror moves on (point releases, security updates); a cached
# layer keeps the versions it was built with until its inputs change. To
# take newer packages, raise image/debian/SOURCE_DATE_EPOCH.
#
# Writes to OUT: base.squashfs, vmlinuz, kernel.deb (for the initrd's
# modules), base.json (kernel, packages, sources, epoch, tool versions,
# build time) and libs.txt (every shared library in the layer). Needs root.
#
# usage: image/debian/build-base.sh --kind browser|cli --debs DIR --work DIR --out DIR
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
kind="" debs="" work="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --kind) kind=$2; shift 2 ;;
        --debs) debs=$2; shift 2 ;;
        --work) work=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "build-base: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$kind" ] && [ -n "$debs" ] && [ -n "$work" ] && [ -n "$out" ] || {
    echo "usage: $0 --kind browser|cli --debs DIR --work DIR --out DIR" >&2; exit 2; }
case "$kind" in
    browser) variant=essential ;;
    cli) variant=minbase ;;
    *) echo "build-base: --kind must be browser or cli" >&2; exit 2 ;;
esac
for d in "$debs" "$work"; do
    case "$d" in *[[:space:]]*) echo "build-base: $d: paths with spaces are not supported (mmdebstrap hooks)" >&2; exit 2 ;; esac
done

start=$(date +%s)
epoch=$(tr -d '[:space:]' < "$here/SOURCE_DATE_EPOCH")
export SOURCE_DATE_EPOCH=$epoch
suite=bookworm
packages=$(sed 's/#.*//' "$here/$kind.packages" | tr -s '[:space:]' '\n' | sed '/^$/d' | paste -sd, -)
mapfile -t sources < <(sed 's/#.*//; /^[[:space:]]*$/d' "$here/sources.list")

mkdir -p "$debs" "$work" "$out"
root=$work/root
rm -rf "$root"

# A fixed locale and umask: the maintainer scripts' output must not depend
# on the caller's.
umask 022
LC_ALL=C.UTF-8 mmdebstrap --mode=unshare --variant="$variant" --format=directory \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --include="$packages" \
    --skip=essential/unlink --skip=check/signed-by \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/ "$1"/etc/apt/preferences.d/' \
    --setup-hook="upload $here/apt-preferences /etc/apt/preferences.d/airlock" \
    --setup-hook="sync-in $debs /var/cache/apt/archives/" \
    --customize-hook="\"$here/customize.sh\" \"\$1\" $kind $work" \
    --customize-hook="sync-out /var/cache/apt/archives $debs" \
    "$suite" "$root" "${sources[@]}"

# The .deb cache holds .deb files only: sync-out also copied apt's lock and
# partial/, whose owner depends on whether apt could sandbox its downloads,
# and sync-in would carry that into the next root. In the root, partial/
# is as a fresh apt leaves it to root (apt hands it to _apt when it runs).
rm -rf "$debs/partial" "$debs/lock"
rm -rf "$root/var/cache/apt/archives/partial"
install -d -m 0700 -o 0 -g 0 "$root/var/cache/apt/archives/partial"

# What mmdebstrap's cleanup must have left: no host file, no kernel.
[ ! -s "$root/etc/resolv.conf" ] && [ "$(cat "$root/etc/hostname")" = airlock ] \
    && [ ! -s "$root/etc/machine-id" ] || { echo "build-base: host files left in the root" >&2; exit 1; }
[ -z "$(ls -A "$root/boot")" ] && [ ! -e "$root/usr/lib/modules" ] || {
    echo "build-base: a kernel was installed into the root" >&2; exit 1; }

# The kernel, from the package customize.sh fetched.
kdir=$work/kernel
rm -rf "$kdir" && mkdir -p "$kdir"
dpkg-deb -x "$work/kernel.deb" "$kdir"
vmlinuz=$(ls "$kdir"/boot/vmlinuz-* | head -n 1)
release=${vmlinuz##*/vmlinuz-}
read -r meta meta_version kpkg < "$work/kernel.pkg"
kversion=$(dpkg-deb -f "$work/kernel.deb" Version)
[ "$(dpkg-deb -f "$work/kernel.deb" Package)" = "$kpkg" ] || { echo "build-base: kernel.deb is not $kpkg" >&2; exit 1; }
install -m 0644 "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
install -m 0644 "$work/kernel.deb" "$out/kernel.deb"

# Every installed package, and every shared library (for the check that the
# streamer finds all it links).
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n' \
    | awk -F'\t' '$1 ~ /^ii/ {print $2 "\t" $3 "\t" $4}' | LC_ALL=C sort > "$work/packages.tsv"
(cd "$root" && find usr/lib usr/lib64 usr/local/lib -name '*.so*' \( -type f -o -type l \) -printf '%f\n' 2>/dev/null || true) \
    | LC_ALL=C sort -u > "$out/libs.txt"

# The times come from the options (mksquashfs refuses SOURCE_DATE_EPOCH too).
env -u SOURCE_DATE_EPOCH mksquashfs "$root" "$out/base.squashfs.tmp" -comp zstd -Xcompression-level 15 -noappend \
    -all-time "$epoch" -mkfs-time "$epoch" -quiet -no-progress >/dev/null
mv "$out/base.squashfs.tmp" "$out/base.squashfs"

jq -n --arg kind "$kind" --arg variant "$variant" --arg suite "$suite" \
    --argjson epoch "$epoch" \
    --arg release "$release" --arg kpkg "$kpkg" --arg kversion "$kversion" \
    --arg meta "$meta" --arg meta_version "$meta_version" \
    --arg mmdebstrap "$(mmdebstrap --version)" \
    --arg mksquashfs "$(mksquashfs -version | head -n 1)" \
    --argjson seconds $(( $(date +%s) - start )) \
    --rawfile packages "$work/packages.tsv" \
    --rawfile sources "$here/sources.list" '{
        kind: $kind, variant: $variant, suite: $suite, sourceDateEpoch: $epoch,
        aptSources: ($sources | split("\n") | map(select(length > 0 and (startswith("#") | not)))),
        kernelVersion: $release, kernelPackage: $kpkg, kernelPackageVersion: $kversion,
        kernelMetaPackage: $meta, kernelMetaPackageVersion: $meta_version,
        packages: ($packages | split("\n") | map(select(length > 0) | split("\t")
            | {name: .[0], version: .[1], architecture: .[2]})),
        tools: {mmdebstrap: $mmdebstrap, mksquashfs: $mksquashfs},
        buildSeconds: $seconds
    }' > "$out/base.json"
rm -rf "$root" "$kdir"
