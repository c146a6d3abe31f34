#!/usr/bin/env bash
# Builds the test initramfs: the agent as /init, busybox for commands, and
# the virtio/vsock modules of Debian's cloud kernel. Also copies that kernel
# next to it and writes a manifest (agent build id, kernel, hashes).
#
# Called by `make image` and by tests that need a variant (a stale agent).
# Takes seconds; needs no root (the agent mounts devtmpfs itself, so the
# archive needs no device nodes). Two runs with the same inputs produce the
# same bytes (sorted entries, fixed mtimes, gzip -n).
#
# usage: image/build-initramfs.sh --agent PATH --out DIR [--name NAME]
#                                 [--kernel-version VERSION]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
agent="" out="" name="initramfs" kver=""
while [ $# -gt 0 ]; do
    case "$1" in
        --agent) agent=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --kernel-version) kver=$2; shift 2 ;;
        *) echo "build-initramfs: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$agent" ] && [ -n "$out" ] || { echo "usage: $0 --agent PATH --out DIR [--name NAME] [--kernel-version V]" >&2; exit 2; }
[ -x "$agent" ] || { echo "build-initramfs: agent $agent is missing or not executable (run make build)" >&2; exit 1; }

if [ -z "$kver" ]; then
    # The newest installed Debian cloud kernel.
    kver=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V | tail -n 1)
fi
[ -n "$kver" ] && [ -r "/boot/vmlinuz-$kver" ] || {
    echo "build-initramfs: no Debian cloud kernel in /boot (install linux-image-cloud-amd64: make setup)" >&2; exit 1; }
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && file -L "$busybox" | grep -q "statically linked" || {
    echo "build-initramfs: a static busybox is needed (install busybox-static: make setup)" >&2; exit 1; }

mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,etc/airlock}
install -m 0755 "$agent" "$stage/init"
install -m 0755 "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
printf 'root:x:0:\n' > "$stage/etc/group"

# Resolve module names to files; decompress so the agent can finit_module
# them without the kernel's compressed-module support.
moddir=/lib/modules/$kver
: > "$stage/etc/airlock/modules"
for mod in $(grep -v '^#' "$here/modules.txt"); do
    src=$(find "$moddir/kernel" -name "$mod.ko" -o -name "$mod.ko.xz" -o -name "$mod.ko.zst" | head -n 1)
    [ -n "$src" ] || { echo "build-initramfs: module $mod not found under $moddir" >&2; exit 1; }
    rel=${src#"$moddir/"}
    rel=${rel%.xz}; rel=${rel%.zst}
    mkdir -p "$stage/lib/modules/$kver/$(dirname "$rel")"
    case "$src" in
        *.xz) xz -dc "$src" > "$stage/lib/modules/$kver/$rel" ;;
        *.zst) zstd -qdc "$src" > "$stage/lib/modules/$kver/$rel" ;;
        *) cp "$src" "$stage/lib/modules/$kver/$rel" ;;
    esac
    echo "$rel" >> "$stage/etc/airlock/modules"
done

# Reproducible archive: sorted names, one mtime, root-owned.
epoch=${SOURCE_DATE_EPOCH:-1700000000}
find "$stage" -exec touch -h -d "@$epoch" {} +
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) \
    | gzip -n -1 > "$out/$name.cpio.gz.tmp"
mv "$out/$name.cpio.gz.tmp" "$out/$name.cpio.gz"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"

version_line=$("$agent" --version)          # "airlock-guest X build ID"
agent_version=$(echo "$version_line" | awk '{print $2}')
build_id=$(echo "$version_line" | awk '{print $4}')
cat > "$out/$name.manifest.json" <<EOF
{
  "image": "$name.cpio.gz",
  "agentVersion": "$agent_version",
  "agentBuildId": "$build_id",
  "agentSha256": "$(sha256sum "$agent" | cut -d' ' -f1)",
  "kernelVersion": "$kver",
  "kernelSha256": "$(sha256sum "$out/vmlinuz" | cut -d' ' -f1)",
  "initramfsSha256": "$(sha256sum "$out/$name.cpio.gz" | cut -d' ' -f1)",
  "busybox": "$("$busybox" | head -n 1 | awk '{print $2}')",
  "modules": [$(sed 's/.*/"&"/' "$stage/etc/airlock/modules" | paste -sd, -)]
}
EOF
echo "built $out/$name.cpio.gz ($(du -h "$out/$name.cpio.gz" | cut -f1), agent build $build_id, kernel $kver)"
