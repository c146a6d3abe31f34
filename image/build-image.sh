#!/usr/bin/env bash
# Builds a golden VM image, `browser` or `cli`, hermetically from Debian 12
# packages, and reproducibly. Called by `make image` (both kinds, into
# build/images/<kind>) and by tests/tests/images.rs (--rebuild, to check
# that a fresh build gives the same bytes).
#
# An image is a directory of six files:
#   vmlinuz           the kernel of Debian's linux-image-cloud-amd64, from
#                     the package lists the root was built from (never the
#                     build host's /boot)
#   initrd.cpio.gz    stage 1: the agent as /init, the modules it loads
#                     (virtio, vsock, virtio_blk, squashfs, overlay and what
#                     they depend on, uncompressed) listed in load order in
#                     /etc/airlock/modules, and the marker /etc/airlock/stage1
#   base.squashfs     the Debian layer (image/debian/build-base.sh): minutes
#                     to build, so cached by a hash of what shapes it
#   vendor.squashfs   the real vendor CLIs and their Node.js, as pinned by
#                     image/vendor/package-lock.json (image/vendor/
#                     build-vendor.sh); the same file in both kinds, cached
#                     by a hash of image/vendor
#   airlock.squashfs  airlock's own files, layered on top (seconds):
#                     /usr/lib/airlock/airlock-guest, and for browser the
#                     Chromium policy image/chromium-policy.json (no search
#                     engine or suggestions, no prediction or background
#                     requests: a login browser sends only what the page
#                     asks for), the streamer and fakes/fake-cli (as
#                     airlock-demo-cli: the demo provider has no real CLI);
#                     for cli the agent's systemd
#                     unit, enabled, and checked with systemd-analyze verify
#   manifest.json     kind, imageSha256 (sha256 of the `sha256sum` lines of
#                     vmlinuz, initrd.cpio.gz, base.squashfs, airlock.squashfs
#                     in that order: the image's identity), each file's
#                     sha256 and size, kernel, agent version and build id,
#                     binaries' hashes, the vendor CLIs' versions (vendorClis),
#                     every Debian package with version and
#                     architecture, apt sources, SOURCE_DATE_EPOCH, inputsKey
#                     (the cache key), nonReproducible, build time
#
# Caching (under --cache, default $AIRLOCK_CACHE or ~/.cache/airlock):
#   debs/                the downloaded .deb files, so a rebuild downloads
#                        only what changed on the mirror
#   base/<kind>-<key>/   Debian layers, by a hash of image/debian/*, the kind
#                        and the tool versions
#   npm/, vendor/<key>/  npm's download cache; the vendor layer, by a hash of
#                        image/vendor/* and the tool versions
#   images/<kind>-<key>/ whole images, by inputsKey: the base key plus the
#                        hashes of the binaries, the unit, this script and
#                        the module lists
# --out becomes a symlink to the cached image directory (base.squashfs,
# vendor.squashfs and vmlinuz are hard links into base/ and vendor/, so
# images share one copy). With every
# input unchanged the script only hashes the inputs and returns. With
# --rebuild no cached layer is used or written (the .deb cache still is):
# everything is built afresh into --out, a real directory.
#
# Needs root (mmdebstrap chroots into the root it builds). Nothing is
# mounted on the build host (mmdebstrap --mode=unshare) and no file of the
# build host enters an image: only our own binaries and repository files.
# Times are SOURCE_DATE_EPOCH from image/debian/SOURCE_DATE_EPOCH.
#
# usage: image/build-image.sh --kind browser|cli --agent PATH --out DIR
#            [--streamer PATH --fake-cli PATH]   (browser: both required)
#            [--unit PATH]                       (cli: required)
#            [--cache DIR] [--rebuild]
#            [--vendor-dir DIR]  (package.json + package-lock.json to install
#                                instead of image/vendor's: make vendor-check)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prog=build-image
kind="" agent="" streamer="" fake_cli="" unit="" out="" cache="" rebuild=0 vendor_src=""
usage() {
    sed -n '/^# usage:/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --kind) kind=${2:-}; shift 2 ;;
        --agent) agent=${2:-}; shift 2 ;;
        --streamer) streamer=${2:-}; shift 2 ;;
        --fake-cli) fake_cli=${2:-}; shift 2 ;;
        --unit) unit=${2:-}; shift 2 ;;
        --out) out=${2:-}; shift 2 ;;
        --cache) cache=${2:-}; shift 2 ;;
        --rebuild) rebuild=1; shift ;;
        --vendor-dir) vendor_src=${2:-}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "$prog: unknown argument $1" >&2; usage ;;
    esac
done
die() { echo "$prog: $*" >&2; exit 1; }

[ -n "$kind" ] && [ -n "$agent" ] && [ -n "$out" ] || usage
case "$kind" in
    browser)
        [ -n "$streamer" ] && [ -n "$fake_cli" ] || die "--kind browser needs --streamer and --fake-cli"
        [ -z "$unit" ] || die "--unit is for --kind cli (the browser image has no systemd)" ;;
    cli)
        [ -n "$unit" ] || die "--kind cli needs --unit (systemd/airlock-guest.service)"
        [ -z "$streamer$fake_cli" ] || die "--streamer and --fake-cli are for --kind browser" ;;
    *) die "--kind must be browser or cli, not '$kind'" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap installs Debian into a directory with chroot): run it, or make image, as root or with sudo"
need_input() { # path what
    [ -f "$1" ] || die "$1 is missing: $2"
}
need_input "$agent" "run make build"
[ -x "$agent" ] || die "$agent is not executable: run make build"
if [ "$kind" = browser ]; then
    need_input "$streamer" "run make build"
    need_input "$fake_cli" "run make build"
else
    need_input "$unit" "it is systemd/airlock-guest.service in the repository"
fi
for tool in mmdebstrap mksquashfs unsquashfs cpio gzip dpkg-deb modinfo jq objdump flock \
    systemd-analyze systemctl sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is not installed: run make setup"
done

cache=${cache:-${AIRLOCK_CACHE:-$HOME/.cache/airlock}}
case "$cache" in *[[:space:]]*) die "cache directory '$cache' contains spaces (mmdebstrap hooks cannot take it)" ;; esac
mkdir -p "$cache"/{debs,base,vendor,npm,images,tmp,logs}
cache=$(cd "$cache" && pwd)
start=$(date +%s)

sha() { sha256sum "$1" | cut -d' ' -f1; }
sha_text() { sha256sum | cut -d' ' -f1; }
size_of() { stat -c %s "$1"; }

# --- cache keys --------------------------------------------------------------
epoch=$(tr -d '[:space:]' < "$here/debian/SOURCE_DATE_EPOCH")
[[ "$epoch" =~ ^[0-9]+$ ]] || die "image/debian/SOURCE_DATE_EPOCH must hold a number"
base_key=$({
    echo "airlock-base 1 $kind"
    (cd "$here/debian" && find . -type f | LC_ALL=C sort | xargs sha256sum)
    mmdebstrap --version
    mksquashfs -version | head -n 1
} | sha_text)
vendor_src=${vendor_src:-$here/vendor}
[ -f "$vendor_src/package.json" ] && [ -f "$vendor_src/package-lock.json" ] \
    || die "$vendor_src has no package.json and package-lock.json"
vendor_key=$({
    echo "airlock-vendor 1"
    echo "epoch $epoch"
    sha256sum "$here/vendor/build-vendor.sh" | cut -d' ' -f1
    (cd "$vendor_src" && sha256sum package.json package-lock.json)
    mksquashfs -version | head -n 1
} | sha_text)
agent_sha=$(sha "$agent")
streamer_sha="" fake_cli_sha="" unit_sha=""
[ "$kind" = browser ] && { streamer_sha=$(sha "$streamer"); fake_cli_sha=$(sha "$fake_cli"); }
[ "$kind" = cli ] && unit_sha=$(sha "$unit")
inputs_key=$({
    echo "airlock-image 1 $kind"
    echo "base $base_key"
    echo "vendor $vendor_key"
    echo "script $(sha "$here/build-image.sh")"
    echo "modules $(cat "$here/modules.txt" "$here/stage1-modules.txt" | sha_text)"
    echo "chromium-policy $(sha "$here/chromium-policy.json")"
    echo "agent $agent_sha"
    echo "streamer $streamer_sha"
    echo "fake-cli $fake_cli_sha"
    echo "unit $unit_sha"
    mksquashfs -version | head -n 1
    gzip --version | head -n 1
    cpio --version | head -n 1
} | sha_text)

image_dir=$cache/images/$kind-${inputs_key:0:16}
base_dir=$cache/base/$kind-${base_key:0:16}
vendor_dir=$cache/vendor/${vendor_key:0:16}

total_mib() { # dir
    local sum=0 f
    for f in "$1"/*; do sum=$((sum + $(stat -L -c %s "$f"))); done
    echo $(( (sum + 1048575) / 1048576 ))
}
point_out_at() { # dir: make --out a symlink to it
    if [ -e "$out" ] && [ ! -L "$out" ]; then
        [ -d "$out" ] && [ -f "$out/manifest.json" ] || die "$out exists and is not an image directory: move it away"
        rm -rf "$out"
    fi
    mkdir -p "$(dirname "$out")"
    ln -sfn "$1" "$out.tmp.$$" && mv -T "$out.tmp.$$" "$out"
}
summary() { # dir base-state vendor-state layer-state seconds
    local where=$out
    [ "$1" = "$out" ] || where="$out -> $1"
    printf '%s image: %s, %s MiB, imageSha256 %s, base layer %s, vendor layer %s, airlock layer %s, %ss\n' \
        "$kind" "$where" "$(total_mib "$1")" "$(jq -r .imageSha256 "$1/manifest.json")" "$2" "$3" "$4" "$5"
}

# One build at a time per cache: the .deb cache and the layers are shared.
exec 9>"$cache/lock"
if ! flock -n 9; then
    echo "$prog: waiting for another image build using $cache" >&2
    flock 9
fi

if [ "$rebuild" = 0 ] && [ -f "$image_dir/manifest.json" ] \
    && [ "$(jq -r .inputsKey "$image_dir/manifest.json")" = "$inputs_key" ]; then
    touch "$image_dir"
    point_out_at "$image_dir"
    summary "$image_dir" cached cached cached $(( $(date +%s) - start ))
    exit 0
fi

# Leftovers of builds that were killed (we hold the lock: none is running).
rm -rf "${cache:?}"/tmp/*
work=$(mktemp -d "$cache/tmp/$kind.XXXXXX")
trap 'rm -rf "$work"' EXIT
umask 022

# --- the Debian layer (cached by base_key) ------------------------------------
log=$cache/logs/$kind-base.log
build_base() { # out-dir
    echo "$prog: building the $kind image's Debian layer (a few minutes; log: $log)" >&2
    if ! "$here/debian/build-base.sh" --kind "$kind" --debs "$cache/debs" --work "$work/base-work" \
        --out "$1" > "$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "building the $kind Debian layer failed (whole log: $log)"
    fi
    rm -rf "$work/base-work"
}
if [ "$rebuild" = 1 ]; then
    base_dir=$work/base
    build_base "$base_dir"
    base_state=built
elif [ -f "$base_dir/base.json" ]; then
    touch "$base_dir"
    base_state=cached
else
    build_base "$work/base"
    rm -rf "$base_dir"
    mv "$work/base" "$base_dir"
    base_state=built
fi
base_json=$base_dir/base.json
release=$(jq -r .kernelVersion "$base_json")

# --- the vendor layer (cached by vendor_key, shared by both kinds) --------------
vlog=$cache/logs/vendor.log
build_vendor() { # out-dir
    echo "$prog: building the vendor CLI layer (a few minutes; log: $vlog)" >&2
    mkdir -p "$1"
    if ! "$here/vendor/build-vendor.sh" --src "$vendor_src" --npm-cache "$cache/npm" --work "$work/vendor-work" \
        --out "$1/vendor.squashfs" --versions-out "$1/versions.json.tmp" > "$vlog" 2>&1; then
        tail -n 25 "$vlog" >&2
        die "building the vendor CLI layer failed (whole log: $vlog)"
    fi
    rm -rf "$work/vendor-work"
    sha "$1/vendor.squashfs" > "$1/vendor.squashfs.sha256"
    mv "$1/versions.json.tmp" "$1/versions.json"
}
if [ "$rebuild" = 1 ]; then
    vendor_dir=$work/vendor
    build_vendor "$vendor_dir"
    vendor_state=built
elif [ -f "$vendor_dir/versions.json" ]; then
    touch "$vendor_dir"
    vendor_state=cached
else
    build_vendor "$work/vendor"
    rm -rf "$vendor_dir"
    mv "$work/vendor" "$vendor_dir"
    vendor_state=built
fi

stage=$work/image
mkdir -p "$stage"
link_or_copy() { ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"; }
link_or_copy "$base_dir/base.squashfs" "$stage/base.squashfs"
link_or_copy "$base_dir/vmlinuz" "$stage/vmlinuz"
link_or_copy "$vendor_dir/vendor.squashfs" "$stage/vendor.squashfs"

# --- initrd.cpio.gz: stage 1 ---------------------------------------------------
# The modules, resolved against the kernel package (dependencies first, by
# modinfo) and decompressed, are kept beside the Debian layer by a hash of
# the module lists: unpacking the kernel package takes seconds.
mods_key=$(cat "$here/modules.txt" "$here/stage1-modules.txt" | sha_text)
mods=$base_dir/initrd-modules-${mods_key:0:16}
if [ ! -f "$mods/order" ]; then
    kdir=$work/kernel
    mkdir -p "$kdir"
    dpkg-deb -x "$base_dir/kernel.deb" "$kdir"
    moddir=$kdir/lib/modules/$release
    [ -d "$moddir" ] || moddir=$kdir/usr/lib/modules/$release
    [ -d "$moddir" ] || die "the kernel package has no modules for $release"
    declare -A modpath=()
    while IFS= read -r f; do
        name=${f##*/}; name=${name%.xz}; name=${name%.zst}; name=${name%.ko}
        modpath[${name//-/_}]=$f
    done < <(find "$moddir/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
    declare -A loaded=()
    order=()
    kernel_deb_name=$(jq -r '.kernelPackage + " " + .kernelPackageVersion' "$base_json")
    add_module() { # name: its dependencies first, then itself
        local name=${1//-/_} f dep
        [ -z "${loaded[$name]:-}" ] || return 0
        f=${modpath[$name]:-}
        [ -n "$f" ] || die "module $name is not in $kernel_deb_name (image/modules.txt, image/stage1-modules.txt)"
        loaded[$name]=1
        for dep in $(modinfo -F depends "$f" | tr ',' ' '); do add_module "$dep"; done
        order+=("$f")
    }
    for mod in $(sed 's/#.*//' "$here/modules.txt" "$here/stage1-modules.txt"); do add_module "$mod"; done
    new_mods=$work/mods
    mkdir -p "$new_mods/tree"
    : > "$new_mods/order.tmp"
    for f in "${order[@]}"; do
        rel=${f#"$moddir/"}; rel=${rel%.xz}; rel=${rel%.zst}
        mkdir -p "$new_mods/tree/$(dirname "$rel")"
        case "$f" in
            *.xz) xz -dc "$f" > "$new_mods/tree/$rel" ;;
            *.zst) zstd -qdc "$f" > "$new_mods/tree/$rel" ;;
            *) cp "$f" "$new_mods/tree/$rel" ;;
        esac
        chmod 0644 "$new_mods/tree/$rel"
        echo "$rel" >> "$new_mods/order.tmp"
    done
    mv "$new_mods/order.tmp" "$new_mods/order"
    rm -rf "$kdir" "$mods"
    mv "$new_mods" "$mods"
fi
mapfile -t modules_json < "$mods/order"

ird=$work/initrd
mkdir -p "$ird"/{dev,proc,sys,run,tmp,etc/airlock,lib/modules}
install -m 0755 "$agent" "$ird/init"
: > "$ird/etc/airlock/stage1"
cp -r "$mods/tree" "$ird/lib/modules/$release"
install -m 0644 "$mods/order" "$ird/etc/airlock/modules"
chmod 0644 "$ird/etc/airlock/stage1"
find "$ird" -exec touch -h -d "@$epoch" {} +
(cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    | gzip -n -9 > "$stage/initrd.cpio.gz"

# --- airlock.squashfs: our files -----------------------------------------------
layer=$work/layer
mkdir -p "$layer/usr/lib/airlock"
chmod 0755 "$layer"
install -m 0755 "$agent" "$layer/usr/lib/airlock/airlock-guest"
if [ "$kind" = browser ]; then
    # Every library the streamer links must be in the Debian layer.
    missing=()
    for lib in $(objdump -p "$streamer" | awk '$1 == "NEEDED" {print $2}'); do
        grep -qxF "$lib" "$base_dir/libs.txt" || missing+=("$lib")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        hint=$(for lib in "${missing[@]}"; do dpkg -S "*/$lib" 2>/dev/null | head -n 1 | cut -d: -f1; done | sort -u | paste -sd' ' -)
        die "$streamer links ${missing[*]}, which the browser image lacks: add the package(s) (on this host: ${hint:-unknown}) to image/debian/browser.packages"
    fi
    install -m 0755 "$streamer" "$layer/usr/lib/airlock/airlock-streamer"
    mkdir -p "$layer/etc/chromium/policies/managed"
    install -m 0644 "$here/chromium-policy.json" "$layer/etc/chromium/policies/managed/airlock.json"
    mkdir -p "$layer/usr/lib/airlock/fakes"
    install -m 0755 "$fake_cli" "$layer/usr/lib/airlock/fakes/fake-cli"
    ln -s fake-cli "$layer/usr/lib/airlock/fakes/airlock-demo-cli"
else
    unit_name=$(basename "$unit")
    mkdir -p "$layer/etc/systemd/system"
    install -m 0644 "$unit" "$layer/etc/systemd/system/$unit_name"
    # The symlinks its [Install] section asks for, as systemctl enable makes them.
    systemctl --root="$layer" --quiet enable "$unit_name" 2>"$work/enable.err" \
        || die "systemctl enable $unit_name failed: $(cat "$work/enable.err")"
    # Verify the unit against the image's own systemd units and binaries.
    vt=$work/verify
    unsquashfs -q -n -d "$vt" "$base_dir/base.squashfs" lib usr/lib/systemd etc/systemd >/dev/null
    cp -a "$layer/." "$vt/"
    if ! verify_out=$(systemd-analyze verify --root="$vt" "$unit_name" 2>&1) || [ -n "$verify_out" ]; then
        die "systemd-analyze verify $unit_name against the cli image: ${verify_out:-failed}"
    fi
fi
find "$layer" -exec touch -h -d "@$epoch" {} +
mksquashfs "$layer" "$stage/airlock.squashfs" -comp zstd -Xcompression-level 15 -noappend \
    -all-root -no-xattrs -all-time "$epoch" -mkfs-time "$epoch" -quiet -no-progress >/dev/null

# --- manifest.json ------------------------------------------------------------
components=(vmlinuz initrd.cpio.gz base.squashfs vendor.squashfs airlock.squashfs)
# The Debian layer's hash is computed once per layer (it is 50-350 MB).
[ -f "$base_dir/base.squashfs.sha256" ] || sha "$base_dir/base.squashfs" > "$base_dir/base.squashfs.sha256"
files_json='{}'
sums=""
for c in "${components[@]}"; do
    case "$c" in
        base.squashfs) s=$(cat "$base_dir/base.squashfs.sha256") ;;
        vendor.squashfs) s=$(cat "$vendor_dir/vendor.squashfs.sha256") ;;
        *) s=$(sha "$stage/$c") ;;
    esac
    sums+="$s  $c"$'\n'
    files_json=$(jq -c --arg c "$c" --arg s "$s" --argjson n "$(size_of "$stage/$c")" \
        '. + {($c): {sha256: $s, size: $n}}' <<< "$files_json")
done
image_sha=$(printf '%s' "$sums" | sha_text)
version_line=$("$agent" --version)          # "airlock-guest X build ID"
read -r _ agent_version _ agent_build_id <<< "$version_line"
[ -n "$agent_build_id" ] || die "$agent --version printed '$version_line', not 'airlock-guest X build ID'"
# Known non-reproducible parts (none: two builds agree bit for bit).
non_reproducible='[]'
jq -n --arg kind "$kind" --arg image_sha "$image_sha" --argjson files "$files_json" \
    --argjson order "$(printf '%s\n' "${components[@]}" | jq -R . | jq -s .)" \
    --slurpfile base "$base_json" --slurpfile vendor "$vendor_dir/versions.json" \
    --argjson modules "$(printf '%s\n' "${modules_json[@]}" | jq -R . | jq -s .)" \
    --arg agent_version "$agent_version" --arg agent_build_id "$agent_build_id" \
    --arg agent_sha "$agent_sha" --arg streamer_sha "$streamer_sha" \
    --arg fake_cli_sha "$fake_cli_sha" --arg unit_sha "$unit_sha" \
    --arg inputs_key "$inputs_key" --arg base_key "$base_key" \
    --argjson non_reproducible "$non_reproducible" \
    --argjson seconds $(( $(date +%s) - start )) '
    $base[0] as $b
    | {
        kind: $kind,
        imageSha256: $image_sha,
        imageSha256Of: "sha256 of the sha256sum lines (\"<sha256>  <file>\\n\") of files in this order",
        files: $files,
        fileOrder: $order,
        kernelVersion: $b.kernelVersion,
        kernelPackage: $b.kernelPackage,
        kernelPackageVersion: $b.kernelPackageVersion,
        kernelMetaPackage: $b.kernelMetaPackage,
        kernelMetaPackageVersion: $b.kernelMetaPackageVersion,
        initrdModules: $modules,
        agentVersion: $agent_version,
        agentBuildId: $agent_build_id,
        agentSha256: $agent_sha
      }
    + (if $kind == "browser" then {streamerSha256: $streamer_sha, fakeCliSha256: $fake_cli_sha}
       else {unitSha256: $unit_sha} end)
    + {
        vendorClis: $vendor[0],
        debianVariant: $b.variant,
        suite: $b.suite,
        aptSources: $b.aptSources,
        sourceDateEpoch: $b.sourceDateEpoch,
        packages: $b.packages,
        tools: $b.tools,
        inputsKey: $inputs_key,
        baseKey: $base_key,
        nonReproducible: $non_reproducible,
        baseBuildSeconds: $b.buildSeconds,
        buildSeconds: $seconds
      }' > "$stage/manifest.json"
chmod 0444 "$stage"/*

# --- publish --------------------------------------------------------------------
seconds=$(( $(date +%s) - start ))
if [ "$rebuild" = 1 ]; then
    if [ -L "$out" ]; then rm -f "$out"
    elif [ -e "$out" ]; then
        [ -d "$out" ] && { [ -f "$out/manifest.json" ] || [ -z "$(ls -A "$out")" ]; } \
            || die "$out exists and is not an image directory: move it away"
        rm -rf "$out"
    fi
    mkdir -p "$(dirname "$out")"
    mv "$stage" "$out"
    summary "$out" "$base_state" "$vendor_state" built "$seconds"
else
    rm -rf "$image_dir"
    mv "$stage" "$image_dir"
    point_out_at "$image_dir"
    summary "$image_dir" "$base_state" "$vendor_state" built "$seconds"
    # Keep the three newest images and two newest Debian layers of this kind.
    ls -1dt "$cache/images/$kind-"* | tail -n +4 | while read -r d; do [ "$d" = "$image_dir" ] || rm -rf "$d"; done
    ls -1dt "$cache/base/$kind-"* | tail -n +3 | while read -r d; do [ "$d" = "$base_dir" ] || rm -rf "$d"; done
    ls -1dt "$cache/vendor/"* | tail -n +3 | while read -r d; do [ "$d" = "$vendor_dir" ] || rm -rf "$d"; done
fi
